#!/usr/bin/env bash
# Checks every ILGPU kernel on a CUDA GPU: each op against the managed CPU backend and each
# backward against finite differences, printed as one table; exits non-zero if any check fails.
#
#   scripts/gpu-check.sh            publish (where dotnet exists) into device/, then run the check
#   scripts/gpu-check.sh --build    publish only: device/ddpm is a self-contained single-file
#                                   binary (~40 MB) for a Linux x64 box with an NVIDIA driver and no .NET
#   scripts/gpu-check.sh --device opencl   check another ILGPU device (default cuda)
#
# On a GPU box without .NET, copy the repository with device/ (or just device/ddpm and this
# script) and run scripts/gpu-check.sh: it finds no dotnet and runs the binary already there.
set -euo pipefail
cd "$(dirname "$0")/.."

build_only=0
device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build_only=1 ;;
    --device) device="$2"; shift ;;
    *) echo "gpu-check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

if command -v dotnet >/dev/null 2>&1; then
  # No trimming and no NativeAOT: both break ILGPU 1.5 (it reflects over its own intrinsics).
  dotnet publish src/Cli/Ddpm.Cli.csproj -c Release -r linux-x64 --self-contained \
    -p:PublishSingleFile=true -p:EnableCompressionInSingleFile=true -p:PublishTrimmed=false \
    -p:DebugType=none -o device >/dev/null
  echo "published device/ddpm ($(du -h device/ddpm | cut -f1))"
fi
[ "$build_only" = 1 ] && exit 0

if [ ! -x device/ddpm ]; then
  echo "gpu-check.sh: device/ddpm is missing and dotnet is not installed to build it" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec timeout 300 device/ddpm check --device "$device"
