#!/usr/bin/env bash
# The engine's denoising step (`ddpm bench`) against ONNX Runtime running the same network, exported by the PyTorch
# peer (`torch_unet.py onnx`), alternating the two, REPS times per preset; prints every reading and the median of the
# pairwise ratios (engine / ONNX Runtime). The ONNX Runtime peer (benchmarks/OnnxPeer, NuGet Microsoft.ML.OnnxRuntime)
# is built on demand and is not part of the solution.
#
#   scripts/bench-vs-onnx.sh [REPS] [PRESETS...]      default: 3 reps, tiny small base
#
# Needs /usr/bin/python3 with torch (apt-get install python3-torch) and the peer script at
# ../shared/reference/torch_unet.py (or PEER=path).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}; shift || true
presets=${*:-tiny small base}
peer=${PEER:-../shared/reference/torch_unet.py}
dotnet build src/Cli -c Release >/dev/null
dotnet build benchmarks/OnnxPeer -c Release >/dev/null
work=$(mktemp -d)
out=$work/readings
for preset in $presets; do
  /usr/bin/python3 "$peer" onnx --preset "$preset" --batch 64 --out "$work/$preset.onnx" >/dev/null 2>&1
  for rep in $(seq "$reps"); do
    e=$(dotnet src/Cli/bin/Release/net10.0/ddpm.dll bench --preset "$preset" --batch 64 --steps 5 --device cpu)
    o=$(dotnet benchmarks/OnnxPeer/bin/Release/net10.0/OnnxPeer.dll "$work/$preset.onnx" --batch 64 --steps 5 --threads 2)
    echo "engine $preset $e" | tee -a "$out"
    echo "onnx   $preset $o" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, preset, js = line.split(None, 2)
    rows.setdefault((preset, who), []).append(json.loads(js)["denoise_step_ms"])
print("\n| preset | engine denoise ms | ONNX Runtime denoise ms | ratio (range) | pairs |")
print("|---|---|---|---|---|")
for preset in dict.fromkeys(k[0] for k in rows):
    e, o = rows[(preset, "engine")], rows[(preset, "onnx")]
    r = sorted(a / b for a, b in zip(e, o))
    print(f"| {preset} | {statistics.median(e):.1f} | {statistics.median(o):.1f} | {statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f}) | {len(e)} |")
PY
rm -rf "$work"
