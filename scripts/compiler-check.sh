#!/usr/bin/env bash
# NVIDIA's compiler on the engine's kernels, with no GPU: fetches ptxas and nvdisasm into a cache folder
# (scripts/cuda-toolkit.sh), then `ddpm check --sass`: every kernel compiled for sm_80 and sm_90, one table an
# architecture (registers, spills, stack, shared memory, groups per SM, the main loop's instruction mix) and the
# prediction derived from it; exit 1 when a tiled kernel breaks a rule (docs/gpu.md). Then holds docs/gpu.md to the
# prediction: every step row it prints (each math mode's "| H100 SXM |", "| H200 |", "| H100 PCIe" rows) and every
# row of the strict-fp32 per-pass table must be in docs/gpu.md word for word; exit 1 naming the first that is not.
# .ci/run runs it.
#
#   scripts/compiler-check.sh [--no-build] [--ptx-from DIR]
#     --no-build: use the Release build already there (as .ci/run does)
#     --ptx-from DIR: take the PTX the tests left in DIR (DDPM_SASS_PTX=DIR dotnet test, as .ci/run does) when it is this
#                     build's; ddpm compiles it itself otherwise
set -euo pipefail
cd "$(dirname "$0")/.."
build=()
from=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=(--no-build); shift ;;
    --ptx-from) [ $# -ge 2 ] || { echo "compiler-check: --ptx-from needs a folder" >&2; exit 2; }; from=(--ptx-from "$2"); shift 2 ;;
    *) echo "compiler-check: unknown argument $1 (usage: scripts/compiler-check.sh [--no-build] [--ptx-from DIR])" >&2; exit 2 ;;
  esac
done
tools=$(scripts/cuda-toolkit.sh)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
dotnet run --project src/Cli -c Release "${build[@]}" -- check --sass "$tools" "${from[@]}" | tee "$out" || rc=$?
[ "$rc" -eq 0 ] || exit "$rc"

# The rows docs/gpu.md must carry: the step rows of every mode, and the fp32 section's per-pass rows.
rows=$(awk '/^#### --math fp32/ { fp32 = 1 } /^#### --math tf32/ { fp32 = 0 }
  /^\| (H100 SXM|H200|H100 PCIe)/ || (fp32 && /^\| (fwd|dx|dw) \|/)' "$out")
if [ -z "$rows" ]; then
  echo "compiler-check: ddpm check --sass printed no prediction rows to hold docs/gpu.md to" >&2
  exit 1
fi
stale=$(grep -F -x -v -f docs/gpu.md <<<"$rows" || true)
if [ -n "$stale" ]; then
  echo "compiler-check: docs/gpu.md is stale: $(wc -l <<<"$stale") row(s) of the prediction are not in it word for word; the first: $(head -n 1 <<<"$stale")" >&2
  exit 1
fi
echo "compiler-check: docs/gpu.md carries the prediction's $(wc -l <<<"$rows") step and per-pass rows"
