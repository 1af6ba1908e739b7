#!/usr/bin/env bash
# The engine's `ddpm bench` against the PyTorch peer's `torch_unet.py bench --threads 2`, alternating
# the two (engine, peer, engine, peer, ...) so that a machine's drift hits both alike; prints every
# reading and the medians and ratios (engine / peer) per preset, then peak memory (max RSS) of a
# base-preset run of each under /usr/bin/time. Ratios are engine / peer, pair by pair, median and range.
#
#   scripts/bench-vs-torch.sh [--isa avx512|avx2|128|scalar] [REPS] [PRESETS...]   default: the machine's best, 3 reps, tiny small base
#
# --isa holds both to one instruction level: the engine through its in-process setting (`bench --simd`), PyTorch
# through ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA (avx512: their defaults; avx2: avx2/AVX2; 128 and scalar:
# default/SSE41, PyTorch's baseline, which has no scalar level).
#
# Needs /usr/bin/python3 with torch (apt-get install python3-torch), GNU time (apt-get install time)
# and the peer script at ../shared/reference/torch_unet.py (or PEER=path).
set -euo pipefail
cd "$(dirname "$0")/.."
isa=
if [ "${1:-}" = --isa ]; then isa=$2; shift 2; fi
case "$isa" in
  ""|avx512) peer_env=() ;;
  avx2) peer_env=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
  128|scalar) peer_env=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41) ;;
  *) echo "bench-vs-torch: --isa $isa: expected avx512, avx2, 128 or scalar" >&2; exit 2 ;;
esac
simd=(); [ -n "$isa" ] && simd=(--simd "$isa")
reps=${1:-3}; shift || true
presets=${*:-tiny small base}
peer=${PEER:-../shared/reference/torch_unet.py}
dotnet build src/Cli -c Release >/dev/null
engine=(dotnet src/Cli/bin/Release/net10.0/ddpm.dll)
out=$(mktemp)
for preset in $presets; do
  for rep in $(seq "$reps"); do
    e=$("${engine[@]}" bench --preset "$preset" --batch 64 --steps 5 --device cpu "${simd[@]}")
    p=$(env "${peer_env[@]}" /usr/bin/python3 "$peer" bench --preset "$preset" --batch 64 --steps 5 --threads 2)
    echo "engine $e" | tee -a "$out"
    echo "peer   $p" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    d = json.loads(js)
    rows.setdefault((d["preset"], who), []).append(d)
print("\n| preset | engine train ms | peer train ms | train ratio (range) | engine denoise ms | peer denoise ms | denoise ratio (range) | pairs |")
print("|---|---|---|---|---|---|---|---|")
for preset in dict.fromkeys(k[0] for k in rows):
    e, p = rows[(preset, "engine")], rows[(preset, "peer")]
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    # Ratios pair by pair (each engine run against the peer run right after it), then their median and range.
    def ratios(k):
        r = sorted(x[k] / y[k] for x, y in zip(e, p))
        return f"{statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})"
    print(f"| {preset} | {med(e, 'train_step_ms'):.1f} | {med(p, 'train_step_ms'):.1f} | {ratios('train_step_ms')} | "
          f"{med(e, 'denoise_step_ms'):.1f} | {med(p, 'denoise_step_ms'):.1f} | {ratios('denoise_step_ms')} | {len(e)} |")
PY
if [ -x /usr/bin/time ]; then
  for who in engine peer; do
    if [ $who = engine ]; then cmd=("${engine[@]}" bench --preset base --batch 64 --steps 2 --device cpu "${simd[@]}")
    else cmd=(env "${peer_env[@]}" /usr/bin/python3 "$peer" bench --preset base --batch 64 --steps 2 --threads 2); fi
    rss=$( { /usr/bin/time -f "%M" "${cmd[@]}" >/dev/null; } 2>&1 | tail -1 )
    echo "peak memory ($who, base, batch 64, train and denoise steps): $((rss / 1024)) MiB"
  done
fi
