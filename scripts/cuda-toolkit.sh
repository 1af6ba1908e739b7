#!/usr/bin/env bash
# Fetches NVIDIA's CUDA compiler tools (ptxas, cuobjdump, nvdisasm: CUDA 11.8 from Debian bookworm's non-free
# nvidia-cuda-toolkit package) into a cache folder, without a GPU and without touching the machine's apt
# configuration: a private sources list, lists and cache folder for `apt-get download`, then `dpkg -x`. The tools
# need only libc. Prints the folder that holds them (what `ddpm check --sass` takes).
#
#   scripts/cuda-toolkit.sh [CACHE]   CACHE defaults to $DDPM_CUDA_TOOLS, else ~/.cache/ddpm/cuda-11.8
#   DEBIAN_MIRROR=URL                  the archive (default http://deb.debian.org/debian)
#
# A second run finds the tools in the cache and downloads nothing. When Debian's archive cannot be reached the
# script says so in one line and exits 1.
set -euo pipefail

cache=${1:-${DDPM_CUDA_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm/cuda-11.8}}
tools=(ptxas cuobjdump nvdisasm)
have() { local t; for t in "${tools[@]}"; do [ -x "$cache/$t" ] || return 1; done; }
if have; then echo "$cache"; exit 0; fi

for cmd in apt-get dpkg; do
  command -v "$cmd" >/dev/null || { echo "cuda-toolkit: $cmd not found (a Debian-based machine is needed to fetch the toolkit)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
echo "deb $mirror bookworm non-free" > "$work/sources.list"
apt=(apt-get -q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Debug::NoLocking=true
  -o APT::Sandbox::User="$(id -un)" -o Acquire::Retries=2)
if ! "${apt[@]}" update > "$work/update.log" 2>&1 || grep -qE '^(Err|W: Failed)' "$work/update.log"; then
  echo "cuda-toolkit: Debian's archive ($mirror, bookworm non-free) cannot be reached: $(grep -m1 -E '^(Err|W|E):' "$work/update.log" | cut -c1-160 || tail -1 "$work/update.log")" >&2
  exit 1
fi
if ! (cd "$work/deb" && "${apt[@]}" download nvidia-cuda-toolkit > "$work/download.log" 2>&1); then
  echo "cuda-toolkit: apt-get download nvidia-cuda-toolkit failed: $(tail -1 "$work/download.log")" >&2
  exit 1
fi
dpkg -x "$work"/deb/nvidia-cuda-toolkit_*.deb "$work/x"
mkdir -p "$cache"
for t in "${tools[@]}"; do
  [ -x "$work/x/usr/bin/$t" ] || { echo "cuda-toolkit: the package has no usr/bin/$t" >&2; exit 1; }
  cp "$work/x/usr/bin/$t" "$cache/.$t.part" && mv "$cache/.$t.part" "$cache/$t"
done
echo "$cache"
