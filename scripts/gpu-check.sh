#!/usr/bin/env bash
# The GPU run: checks every ILGPU kernel on a CUDA GPU (each op against the managed CPU backend and
# each backward against finite differences), then benchmarks the engine against the PyTorch peer on
# the same GPU, and prints one table. Exits non-zero if a kernel check fails.
#
#   scripts/gpu-check.sh --build    publish only (where dotnet exists): device/ then holds all a GPU box
#                                   needs: ddpm (self-contained single file, ~40 MB, no .NET needed),
#                                   torch_unet.py (the peer, from ../shared/reference or PEER=path) and
#                                   a copy of this script. Copy device/ over and run device/gpu-check.sh.
#   scripts/gpu-check.sh            publish (where dotnet exists) into device/, then check and benchmark
#   --check-only | --bench-only     one phase (default: both)
#   --device cuda|opencl|ilgpu-cpu  the ILGPU device (default cuda); the peer runs on PEER_DEVICE (default cuda)
#   --preset P --batches "128 64"   what the benchmark runs (default base at 128 and 64; a smoke test
#                                   without a GPU: --device ilgpu-cpu --preset tiny --batches 2 with PEER_DEVICE=cpu)
#   --budget SECONDS                wall-clock budget for everything after the build (default 480: 8 minutes)
#
# Every step runs under its own timeout; steps 1-7 (the first batch's benchmarks, the check, ptxas 25 s and the
# compiler table 40 s) add up to 465 s, inside the default budget, so a run where every one of them times out still
# ends in time; the other batches' benchmarks (step 8) run as far as the budget has room left. With a smaller --budget a step
# that would not fit is skipped and says so, in this order (the most important first):
#   1. `ddpm bench --peak`: an FMA loop, the measured fp32 peak (30 s)
#   2. `ddpm bench --math tf32` (the default) at the first batch with --profile: step times, per-op times and
#      per-convolution GFLOP/s read against that peak, launches and host synchronisations per step (90 s)
#   3. `torch_unet.py bench --tf32 off` (strict fp32, the reference of --math fp32 and 3xtf32) at the first batch (40 s)
#   4. `torch_unet.py bench --tf32 default` (PyTorch's default: TF32 convolutions, --math tf32's reference) (40 s)
#   5. `ddpm bench --math 3xtf32`, then `--math fp32`, at the first batch (50 s each)
#   6. `ddpm check`: every kernel against the CPU backend and finite differences, the products again in each
#      tensor-core mode at its tolerance (100 s)
#   7. `ddpm check --ptx` and `ptxas -v` on every tiled kernel: hardware registers and spills (25 s;
#      reported only where ptxas, from a CUDA toolkit, is on PATH), then `ddpm check --sass` with that toolkit (40 s,
#      where nvdisasm sits beside ptxas): the compiler table and the prediction, kept in sass.txt
#   8. the same five benchmarks at the other batches (50 + 35 + 35 + 40 + 40 s each)
# Device memory: each program's allocator peak (the engine's pool peak of live tensors, bench's
# peak_mem_mib; the peer's torch.cuda.max_memory_allocated) and, for both, the rise of nvidia-smi's
# memory.used over the run (sampled every 100 ms: CUDA context included, the same measure for both).
#
# Outputs are kept: every step's stdout and stderr, the full profile, the kernel check, the PTX and the
# ptxas reports, and the printed table go to $OUT/gpu-check when OUT is set (a machine that returns
# $OUT), else to results/<UTC time>/ beside this script (device/results/... when run from scripts/).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [ "$(basename "$here")" = scripts ] && [ -f "$here/../src/Cli/Ddpm.Cli.csproj" ]; then
  repo=$(cd "$here/.." && pwd)
  dev="$repo/device"
else
  repo=""          # running from the copied device/ folder
  dev="$here"
fi

build_only=0 device=cuda check=1 bench=1 preset=base batches="128 64" budget=480
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build_only=1 ;;
    --device) device="$2"; shift ;;
    --check-only) bench=0 ;;
    --bench-only) check=0 ;;
    --preset) preset="$2"; shift ;;
    --batches) batches="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    *) echo "gpu-check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
peer_device=${PEER_DEVICE:-cuda}

if [ -n "$repo" ] && command -v dotnet >/dev/null 2>&1; then
  mkdir -p "$dev"
  # No trimming and no NativeAOT: both break ILGPU 1.5 (it reflects over its own intrinsics).
  dotnet publish "$repo/src/Cli/Ddpm.Cli.csproj" -c Release -r linux-x64 --self-contained \
    -p:PublishSingleFile=true -p:EnableCompressionInSingleFile=true -p:PublishTrimmed=false \
    -p:InvariantGlobalization=true -p:DebugType=none -o "$dev" >/dev/null
  peer_src=${PEER:-$repo/../shared/reference/torch_unet.py}
  if [ -f "$peer_src" ]; then
    install -m 0644 "$peer_src" "$dev/torch_unet.py"
  else
    echo "gpu-check.sh: no peer script at $peer_src (set PEER=path): the benchmark will run the engine only" >&2
  fi
  cp "$here/gpu-check.sh" "$dev/gpu-check.sh"
  echo "published $dev: ddpm ($(du -h "$dev/ddpm" | cut -f1))$([ -f "$dev/torch_unet.py" ] && echo ", torch_unet.py"), gpu-check.sh"
fi
[ "$build_only" = 1 ] && exit 0

ddpm="$dev/ddpm"
if [ ! -x "$ddpm" ]; then
  echo "gpu-check.sh: $ddpm is missing and dotnet is not installed to build it" >&2
  exit 2
fi
peer=${PEER:-$dev/torch_unet.py}
[ -f "$peer" ] || peer=""
python=""
if [ -n "$peer" ]; then
  for p in ${PYTHON:-} python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then python=$p; break; fi
  done
fi

if [ -n "${OUT:-}" ]; then
  work="$OUT/gpu-check"
else
  work="$dev/results/$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$work"
trap 'kill "${sampler:-}" 2>/dev/null || true' EXIT
SECONDS=0

# Seconds left for a step that wants $1, or 0 (skip) when fewer than 10 would remain.
allot() {
  local left=$((budget - SECONDS))
  if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# The value of "key" in a one-line JSON object (both json.dumps' and System.Text.Json's spacing).
jf() { printf '%s\n' "$1" | sed -n "s/.*\"$2\": *\"\{0,1\}\([^\",}]*\).*/\1/p" | head -1; }

has_smi=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_smi=1
gpu_line="no nvidia-smi"
[ "$has_smi" = 1 ] && gpu_line=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 | head -1)
echo "gpu: $gpu_line"

# Runs "$@" (stdout to $1.out, stderr to $1.err) under timeout $2, sampling nvidia-smi's memory.used;
# sets rc and mem_delta (MiB above the level before the run, or n/a).
measure() {
  local name=$1 limit=$2; shift 2
  local base="" log="$work/$name.mem"
  mem_delta=n/a
  : > "$log"
  if [ "$has_smi" = 1 ]; then
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$log" 2>/dev/null &
    sampler=$!
  fi
  set +e
  timeout "$limit" "$@" > "$work/$name.out" 2> "$work/$name.err"
  rc=$?
  set -e
  if [ -n "${sampler:-}" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=""
    local peak
    peak=$(sort -n "$log" | tail -1)
    [ -n "$peak" ] && [ -n "$base" ] && mem_delta=$((peak - base))
  fi
  return 0
}

# Why a step gave no figures: its timeout, or the last line it wrote on stderr.
failure() {
  if [ "$rc" = 124 ]; then echo "timed out after $2 s"; else echo "exit $rc: $(tail -1 "$1" | cut -c1-100)"; fi
}

check_verdict="not run"
status=0
# The kernel check: its verdict and whether the script fails.
run_check() {
  local limit
  limit=$(allot 100)
  if [ "$limit" = 0 ]; then check_verdict="skipped (budget)"; return; fi
  set +e
  timeout "$limit" "$ddpm" check --device "$device" 2>&1 | tee "$work/check.txt"
  local check_rc=${PIPESTATUS[0]}
  set -e
  local summary
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$work/check.txt" | tail -1 || true)
  case "$check_rc" in
    0) check_verdict="pass ($summary)" ;;
    124) check_verdict="TIMED OUT after ${limit} s"; status=1 ;;
    *) check_verdict="FAIL (exit $check_rc; ${summary:-$(tail -1 "$work/check.txt" | cut -c1-100)})"; status=1 ;;
  esac
}

rows=()      # "label|batch|train|denoise|mem_delta|alloc_peak|note"
peak="n/a"
first_batch=${batches%% *}

# The engine's bench at batch $1 in math mode $2 (fp32 | tf32 | 3xtf32) with $3 seconds wanted (the first batch in the
# default mode adds --profile).
bench_engine() {
  local b=$1 math=$2 want=$3 extra=() limit j note="" label
  label="ddpm ($device, $math)"
  [ "$b" = "$first_batch" ] && [ "$math" = tf32 ] && extra=(--profile)
  limit=$(allot "$want")
  if [ "$limit" = 0 ]; then rows+=("$label|$b|||||skipped (budget)"); return; fi
  measure "ddpm-$math-$b" "$limit" "$ddpm" bench --preset "$preset" --batch "$b" --steps 5 --device "$device" --math "$math" "${extra[@]}"
  if [ "$rc" = 0 ]; then
    j=$(tail -1 "$work/ddpm-$math-$b.out")
    [ "${#extra[@]}" -gt 0 ] && { cp "$work/ddpm-$math-$b.err" "$work/profile.txt"; note="timed steps before the profiled ones; "; }
    rows+=("$label|$b|$(jf "$j" train_step_ms)|$(jf "$j" denoise_step_ms)|$mem_delta|$(jf "$j" peak_mem_mib)|${note}ran in $(jf "$j" math)")
  else
    rows+=("$label|$b|||$mem_delta|n/a|$(failure "$work/ddpm-$math-$b.err" "$limit")")
  fi
}

# The peer's bench at batch $1, --tf32 $2, with $3 seconds wanted.
bench_torch() {
  local b=$1 tf=$2 want=$3 label limit j
  label="torch fp32 (--tf32 off)"; [ "$tf" = default ] && label="torch default (TF32 convs)"
  if [ -z "$python" ]; then rows+=("$label|$b|||||no ${peer:+torch for }${peer:-peer script}"); return; fi
  limit=$(allot "$want")
  if [ "$limit" = 0 ]; then rows+=("$label|$b|||||skipped (budget)"); return; fi
  measure "torch-$tf-$b" "$limit" "$python" "$peer" bench --preset "$preset" --batch "$b" --steps 5 --device "$peer_device" --tf32 "$tf"
  if [ "$rc" = 0 ]; then
    j=$(tail -1 "$work/torch-$tf-$b.out")
    rows+=("$label|$b|$(jf "$j" train_step_ms)|$(jf "$j" denoise_step_ms)|$mem_delta|$(jf "$j" peak_mem_mib)|torch $(jf "$j" torch) on $peer_device")
  else
    rows+=("$label|$b|||$mem_delta|n/a|$(failure "$work/torch-$tf-$b.err" "$limit")")
  fi
}

# Hardware registers and spills of every tiled kernel: the engine writes its PTX (compiled without a GPU) for this
# GPU's architecture at the PTX ISA of the installed ptxas, and ptxas -v reports what it allocated.
ptxas_line="" ptxas_rows=()
run_ptxas() {
  local ptxas sm cuda limit f name report regs spill_st spill_ld smem
  ptxas=$(command -v ptxas || true)
  [ -z "$ptxas" ] && [ -x /usr/local/cuda/bin/ptxas ] && ptxas=/usr/local/cuda/bin/ptxas
  if [ -z "$ptxas" ]; then ptxas_line="ptxas: not on PATH (no CUDA toolkit here): registers and spills per tiled kernel not reported"; return; fi
  sm=90
  if [ "$has_smi" = 1 ]; then
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -d ' .' || true)
    [[ "$cap" =~ ^[0-9]+$ ]] && sm=$cap
  fi
  cuda=$("$ptxas" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
  limit=$(allot 25)
  if [ "$limit" = 0 ]; then ptxas_line="ptxas: skipped (budget)"; return; fi
  set +e
  timeout "$limit" "$ddpm" check --ptx "$work/ptx" --sm "$sm" --cuda "${cuda:-12.0}" > "$work/ptx.out" 2>&1
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then ptxas_line="ptxas: ddpm check --ptx failed ($(failure "$work/ptx.out" "$limit"))"; return; fi
  ptxas_line="ptxas -v --gpu-name sm_$sm ($("$ptxas" --version | tail -1 | cut -c1-60)) on $(tail -1 "$work/ptx.out" | sed 's/^wrote the PTX of //')"
  for f in "$work"/ptx/tiled/*.ptx; do
    name=$(basename "$f" .ptx)
    report="${f%.ptx}.ptxas.txt"
    if ! "$ptxas" -v --gpu-name "sm_$sm" "$f" -o /dev/null > "$report" 2>&1; then
      ptxas_rows+=("$name|failed (${report##*/})|||")
      continue
    fi
    regs=$(sed -n 's/.*Used \([0-9]*\) registers.*/\1/p' "$report" | head -1)
    spill_st=$(sed -n 's/.* \([0-9]*\) bytes spill stores.*/\1/p' "$report" | head -1)
    spill_ld=$(sed -n 's/.* \([0-9]*\) bytes spill loads.*/\1/p' "$report" | head -1)
    smem=$(sed -n 's/.* \([0-9]*\) bytes smem.*/\1/p' "$report" | head -1)
    ptxas_rows+=("$name|${regs:-?}|${spill_st:-0}|${spill_ld:-0}|${smem:-0}")
  done
  # The whole compiler table and the prediction derived from it (ddpm check --sass), where nvdisasm sits beside ptxas:
  # kept in sass.txt, so the measured step times above can be read against the predicted ones.
  if [ -x "$(dirname "$ptxas")/nvdisasm" ]; then
    limit=$(allot 40)
    if [ "$limit" = 0 ]; then sass_line="compiler table: skipped (budget)"; return; fi
    set +e
    timeout "$limit" "$ddpm" check --sass "$(dirname "$ptxas")" > "$work/sass.txt" 2>&1
    rc=$?
    set -e
    sass_line="compiler table (ddpm check --sass, with this machine's ptxas): $(tail -1 "$work/sass.txt" | cut -c1-100), exit $rc; in sass.txt"
  fi
}
sass_line=

# The plan, the most important first (see the header); each step's allowance is its timeout.
bench_first=0
if [ "$bench" = 1 ]; then
  limit=$(allot 30)
  if [ "$limit" != 0 ]; then
    measure peak "$limit" "$ddpm" bench --peak --device "$device"
    [ "$rc" = 0 ] && peak=$(jf "$(tail -1 "$work/peak.out")" peak_gflops)
  fi
  bench_engine "$first_batch" tf32 90
  bench_torch "$first_batch" off 40
  bench_torch "$first_batch" default 40
  bench_engine "$first_batch" 3xtf32 50
  bench_engine "$first_batch" fp32 50
  bench_first=1
fi
[ "$check" = 1 ] && run_check
run_ptxas
if [ "$bench" = 1 ]; then
  for b in $batches; do
    [ "$b" = "$first_batch" ] && continue
    bench_engine "$b" tf32 50
    bench_torch "$b" off 35
    bench_torch "$b" default 35
    bench_engine "$b" 3xtf32 40
    bench_engine "$b" fp32 40
  done
fi

report() {
echo
echo "== gpu-check: $gpu_line; ${SECONDS} s =="
echo "kernel check ($device vs cpu): $check_verdict"
if [ "$bench" = 1 ]; then
  echo "fp32 FMA peak, measured (ddpm bench --peak): ${peak} GFLOP/s"
  echo
  # Ratios: the engine's time over the strict-fp32 peer's and over PyTorch's default (TF32 convolutions) at the same
  # batch (the targets: --math 3xtf32 and fp32 at most 1.0x the strict peer, --math tf32 at most 1.0x the default).
  printf '%s\n' "${rows[@]}" | awk -F'|' '
    { label[NR]=$1; batch[NR]=$2; train[NR]=$3; den[NR]=$4; mem[NR]=$5; alloc[NR]=$6; note[NR]=$7
      if ($1 ~ /^torch fp32/ && $3 != "") { tref[$2]=$3; dref[$2]=$4 }
      if ($1 ~ /^torch default/ && $3 != "") { tdef[$2]=$3; ddef[$2]=$4 } }
    function ratio(a, r) { return (a != "" && r != "" && r > 0) ? sprintf("%.2fx", a / r) : "" }
    END {
      printf "| %-26s | %5s | %10s | %10s | %9s | %9s | %12s | %12s | %13s | %16s | %s\n", "run", "batch", "train ms", "denoise ms", "train/fp32", "den./fp32", "train/default", "den./default", "GPU mem rise", "allocator peak", "note"
      printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|-\n", "----------------------------", "-------", "------------", "------------", "-----------", "-----------", "--------------", "--------------", "---------------", "------------------"
      for (i = 1; i <= NR; i++)
        printf "| %-26s | %5s | %10s | %10s | %9s | %9s | %12s | %12s | %9s MiB | %12s MiB | %s\n", label[i], batch[i], train[i], den[i],
          ratio(train[i], tref[batch[i]]), ratio(den[i], dref[batch[i]]), ratio(train[i], tdef[batch[i]]), ratio(den[i], ddef[batch[i]]), mem[i], alloc[i], note[i]
    }'
  if [ -f "$work/profile.txt" ]; then
    echo
    echo "per-kernel (ddpm bench --profile at batch ${batches%% *}; each pass timed alone, synchronised): GFLOP/s and share of the measured peak"
    awk -v peak="$peak" '
      /train step profile/ { sec = "train"; shape = 0; next }
      /denoising step profile/ { sec = "denoise"; shape = 0; next }
      /GFLOP\/s/ { shape = 1; next }
      shape && NF == 0 { shape = 0; next }
      shape && $NF ~ /^[0-9.]+$/ {
        key = $1; for (i = 2; i <= NF - 3; i++) key = key " " $i
        share = (peak ~ /^[0-9.]+$/ && peak > 0) ? sprintf("%5.1f%%", 100 * $NF / peak) : "n/a"
        printf "| %-7s | %-40s | %9s | %6s | %9s | %7s |\n", sec, key, $(NF-2), $(NF-1), $NF, share
      }' "$work/profile.txt" | sort -t'|' -k2,2r -k4,4nr | awk -F'|' '{ n[$2]++ } n[$2] <= 12' \
      | { printf "| %-7s | %-40s | %9s | %6s | %9s | %7s |\n" step pass "ms (all)" calls GFLOP/s "of peak"; cat; }
    grep -Eiq 'launch|sync' "$work/profile.txt" && grep -Ei 'launch|sync' "$work/profile.txt" | sed 's/^ */  /' | head -6
  fi
fi
echo
echo "$ptxas_line"
[ -n "$sass_line" ] && echo "$sass_line"
if [ "${#ptxas_rows[@]}" -gt 0 ]; then
  # Spills are the register tile not fitting: the PTX test already proves no .local arrays; spills would be ptxas's own.
  printf '| %-34s | %9s | %18s | %17s | %10s |\n' "tiled kernel" registers "spill stores (B)" "spill loads (B)" "smem (B)"
  printf '|%s|%s|%s|%s|%s|\n' "------------------------------------" "-----------" "--------------------" "-------------------" "------------"
  for r in "${ptxas_rows[@]}"; do
    IFS='|' read -r name regs st ld smem <<< "$r"
    printf '| %-34s | %9s | %18s | %17s | %10s |\n' "$name" "$regs" "$st" "$ld" "$smem"
  done
fi
echo
echo "outputs kept in $work: each step's .out and .err, profile.txt, check.txt, ptx/ (where ptxas ran), this table in table.txt"
}
report | tee "$work/table.txt"
exit "$status"
