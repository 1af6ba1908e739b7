#!/usr/bin/env bash
# NVIDIA's compiler on the engine's kernels, with no GPU: fetches ptxas and cuobjdump into a cache folder
# (scripts/cuda-toolkit.sh), then `ddpm check --sass`: every kernel compiled for sm_80 and sm_90, one table an
# architecture (registers, spills, stack, shared memory, groups per SM, the main loop's instruction mix) and the
# prediction derived from it; exit 1 when a tiled kernel breaks a rule (docs/gpu.md). .ci/run runs it.
#
#   scripts/compiler-check.sh [--no-build]   --no-build: use the Release build already there (as .ci/run does)
set -euo pipefail
cd "$(dirname "$0")/.."
build=()
[ "${1:-}" = --no-build ] && build=(--no-build)
tools=$(scripts/cuda-toolkit.sh)
exec dotnet run --project src/Cli -c Release "${build[@]}" -- check --sass "$tools"
