#!/usr/bin/env bash
# The hostile-input set against the built tool: each case runs `ddpm` as a user (or an attacker) would, under a time
# limit and GNU time's maximum RSS, and is judged: answered in one line ("ddpm: ..." on stderr and a non-zero exit) or
# handled (exit 0 where the input is allowed), no hang (the limit), no process over 2 GB, and nothing lost (the files
# a case guards are checked after it). Prints one line a case and the counts; exits non-zero if any case fails.
# Run from anywhere (about 3 minutes on two cores):
#   scripts/hostile-inputs.sh            # builds Release first
#   NO_BUILD=1 scripts/hostile-inputs.sh
# The unit tests hold each class too (tests/HardeningTests.cs, ReliabilityTests.cs); this runs the built program.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ -n "${NO_BUILD:-}" ] || dotnet build src/Cli -c Release 2>&1 | grep -E " error |rror\(s\)" | sort -u
dll="$root/src/Cli/bin/Release/net10.0/ddpm.dll"
[ -f "$dll" ] || { echo "hostile-inputs: $dll not built"; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "hostile-inputs: needs GNU time (apt-get install time)"; exit 1; }

work=$(mktemp -d -t ddpm-hostile.XXXXXX)
trap 'rm -rf "$work"' EXIT
export XDG_CACHE_HOME="$work/cache"   # the classifier and self-check caches of this run only
unset DDPM_GPU_KERNELS DDPM_SIMD DDPM_SELF_CHECK DDPM_DEBUG DDPM_TEST_SAVE_DELAY_MS
limit=${LIMIT:-120}
max_kb=$((2 * 1024 * 1024))
total=0 good=0 hung=0 big=0 lost=0 bad=0

# A small data set: 256 shapes (two of eval's classifier batches) in the four MNIST files, labels 0..9.
python3 - "$work/data" <<'PY'
import os, struct, sys, random
d = sys.argv[1]; os.makedirs(d, exist_ok=True); r = random.Random(1)
for prefix, n in (("train", 256), ("t10k", 64)):
    img = bytearray()
    for i in range(n):
        side = 6 + r.randrange(12); x0 = r.randrange(28 - side); y0 = r.randrange(28 - side)
        img += bytes(255 if x0 <= x < x0 + side and y0 <= y < y0 + side else 0 for y in range(28) for x in range(28))
    open(f"{d}/{prefix}-images-idx3-ubyte", "wb").write(struct.pack(">iiii", 0x803, n, 28, 28) + img)
    open(f"{d}/{prefix}-labels-idx1-ubyte", "wb").write(struct.pack(">ii", 0x801, n) + bytes(i % 10 for i in range(n)))
PY
ddpm() { dotnet "$dll" "$@"; }
export dll work
export -f ddpm
ddpm train --data "$work/data" --out "$work/run" --max-steps 4 --batch 4 --grid 0 --device cpu >/dev/null 2>&1 \
    || { echo "hostile-inputs: could not train the fixture run"; exit 1; }
ckpt="$work/run/model.safetensors"

# case NAME EXPECT COMMAND...: EXPECT is "fail" (a non-zero exit with one "ddpm:" line) or "ok" (exit 0). After it,
# a function named by GUARD (if set) must succeed: what the case must not lose.
case_() {
    local name=$1 expect=$2 rc kb lines verdict=ok
    shift 2
    total=$((total + 1))
    # Through bash -c, so a case may be one of the functions below (exported); GNU time reports the largest RSS of the
    # processes it waited for.
    /usr/bin/time -f "%M" -o "$work/rss" timeout -k 5 "$limit" bash -c '"$@"' _ "$@" >"$work/out" 2>"$work/err" </dev/null
    rc=$?
    kb=$(tail -1 "$work/rss" 2>/dev/null | grep -E '^[0-9]+$' || echo 0)
    lines=$(grep -c '^ddpm: ' "$work/err")
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="HUNG"; hung=$((hung + 1))
    elif [ "$kb" -gt "$max_kb" ]; then verdict="OVER 2 GB"; big=$((big + 1))
    elif [ "$expect" = fail ] && { [ "$rc" -eq 0 ] || [ "$lines" -ne 1 ] || grep -q '   at \|Exception:' "$work/err"; }; then verdict="NOT ONE LINE"; bad=$((bad + 1))
    elif [ "$expect" = ok ] && [ "$rc" -ne 0 ]; then verdict="REFUSED"; bad=$((bad + 1))
    elif [ -n "${GUARD:-}" ] && ! "$GUARD"; then verdict="LOST"; lost=$((lost + 1))
    fi
    [ "$verdict" = ok ] && good=$((good + 1))
    printf '%-4s %-60s exit %3s %5s MiB  %s\n' "$verdict" "$name" "$rc" "$((kb / 1024))" "$(grep -m1 '^ddpm: ' "$work/err" | cut -c1-110)"
    GUARD=
}

fresh() { rm -rf "$1"; mkdir -p "$1"; }

# --- files lost -----------------------------------------------------------------------------------------------
fresh "$work/t1"; echo mine >"$work/t1/.thesis.docx.tmp"; echo old >"$work/t1/.model.safetensors.ddpm-99999999-00.tmp"
users_kept() { [ "$(cat "$work/t1/.thesis.docx.tmp")" = mine ]; }
stale_kept() { users_kept && [ -f "$work/t1/.model.safetensors.ddpm-99999999-00.tmp" ]; }
GUARD=stale_kept case_ "train --resume refused: nothing in --out deleted" fail ddpm train --resume --out "$work/t1" --data "$work/data" --device cpu
GUARD=users_kept case_ "train: a user's .NAME.tmp in --out is kept" ok ddpm train --out "$work/t1" --data "$work/data" --max-steps 1 --batch 4 --grid 0 --device cpu

fresh "$work/s1"; printf 'previous png' >"$work/s1/samples.png"
whole_png() { local f="$work/s1/samples.png"; printf 'previous png' | cmp -s - "$f" || [ "$(head -c 4 "$f" | od -An -tx1 | tr -d ' ')" = 89504e47 ]; }
sigterm_sample() { dotnet "$dll" sample --checkpoint "$ckpt" --n 1000 --sampler ddim --steps 40 --out "$work/s1" --device cpu & local p=$!; sleep "${1:-3}"; kill -TERM "$p"; wait "$p"; }
export ckpt
export -f sigterm_sample
GUARD=whole_png case_ "SIGTERM while sample runs: samples.png whole (old or new)" fail-or-ok sigterm_sample 4
GUARD=whole_png case_ "SIGTERM a second later: samples.png whole" fail-or-ok sigterm_sample 5

fresh "$work/s2"
two_samples() {
    dotnet "$dll" sample --checkpoint "$ckpt" --n 3000 --sampler ddim --steps 4 --out "$work/s2" --device cpu 2>"$work/s2a" & local a=$!
    sleep 3
    dotnet "$dll" sample --checkpoint "$ckpt" --n 100 --sampler ddim --steps 3 --out "$work/s2" --device cpu; local rc=$?
    wait "$a"; return "$rc"
}
export -f two_samples
# The folder holds the first run's files only: its IDX counts 3,000 digits (0x0bb8 in bytes 6-7).
one_idx() { [ "$(od -An -tx1 -j6 -N2 "$work/s2/samples-idx3-ubyte" | tr -d ' ')" = 0bb8 ]; }
GUARD=one_idx case_ "two samples into one --out at once: the second refused" fail two_samples

# --- hangs and memory -------------------------------------------------------------------------------------------
fresh "$work/l1"; mkfifo "$work/l1/.ddpm.lock"
case_ "a FIFO as the run's .ddpm.lock" ok ddpm train --out "$work/l1" --data "$work/data" --max-steps 1 --batch 4 --grid 0 --device cpu
fresh "$work/l2"; ln -s /dev/zero "$work/l2/.ddpm.lock"
case_ "a lock linked to /dev/zero" ok ddpm train --out "$work/l2" --data "$work/data" --max-steps 1 --batch 4 --grid 0 --device cpu
fresh "$work/l3"; mkfifo "$work/l3/.ddpm.lock"
case_ "a FIFO as sample's lock" ok ddpm sample --checkpoint "$ckpt" --n 2 --sampler ddim --steps 1 --out "$work/l3" --device cpu
fresh "$work/l4"; head -c 3000000 /dev/zero | tr '\0' 'x' >"$work/l4/.ddpm.lock"
case_ "a 3 MB lock file" ok ddpm train --out "$work/l4" --data "$work/data" --max-steps 1 --batch 4 --grid 0 --device cpu
case_ "sample --n 10000 (tiny)" ok ddpm sample --checkpoint "$ckpt" --n 10000 --sampler ddim --steps 1 --out "$work/s3" --device cpu
case_ "sample --n 2000" ok ddpm sample --checkpoint "$ckpt" --n 2000 --sampler ddim --steps 2 --out "$work/s4" --device cpu
ddpm train --preset base --data "$work/data" --out "$work/base" --max-steps 1 --batch 2 --grid 0 --device cpu >/dev/null 2>&1
case_ "eval of a base checkpoint on the CPU (1,000 digits)" ok ddpm eval --samples "$work/base" --sampler ddim --steps 1 --data "$work/data" --report none --device cpu
case_ "train --preset base --batch 4096" fail ddpm train --preset base --batch 4096 --out "$work/t2" --data "$work/data" --device cpu
case_ "bench --preset base --batch 4096" fail ddpm bench --preset base --batch 4096 --steps 1 --device cpu
case_ "sample --memory 1000000" fail ddpm sample --checkpoint "$ckpt" --memory 1000000 --out "$work/s5" --device cpu

# A classifier whose metadata claims width 4096 (its tensors are width 32), and one claiming 4096 classes.
ddpm eval --data "$work/data" --train-classifier --classifier "$work/clf.safetensors" --device cpu >/dev/null 2>&1
claim() {
    python3 - "$work/clf.safetensors" "$work/$1.safetensors" "$2" "$3" <<'PY'
import json, struct, sys
src, dst, key, value = sys.argv[1:5]
b = open(src, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
h["__metadata__"][key] = value; h["__metadata__"].pop("sha256", None)
j = json.dumps(h).encode(); j += b" " * (-len(j) % 8)
open(dst, "wb").write(struct.pack("<Q", len(j)) + j + b[8 + n:])
PY
}
claim wide width 4096; claim wide8 width 64; claim many classes 4096
case_ "a classifier claiming width 4096" fail ddpm eval --samples "$work/s3/samples-idx3-ubyte" --classifier "$work/wide.safetensors" --data "$work/data" --report none --device cpu
case_ "a classifier claiming width 64 over width-32 tensors" fail ddpm eval --samples "$work/s3/samples-idx3-ubyte" --classifier "$work/wide8.safetensors" --data "$work/data" --report none --device cpu
case_ "a 4096-class classifier" fail ddpm eval --samples "$work/s3/samples-idx3-ubyte" --classifier "$work/many.safetensors" --data "$work/data" --report none --device cpu

# --- caches and runs that know their data -----------------------------------------------------------------------
cp -r "$work/data" "$work/other"; python3 - "$work/other/train-images-idx3-ubyte" <<'PY'
import sys; p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[16:16 + 784] = bytes(255 - x for x in b[16:16 + 784]); open(p, "wb").write(b)
PY
cp -r "$work/run" "$work/r2"
case_ "--resume with other data of the same size" fail ddpm train --resume --out "$work/r2" --data "$work/other" --device cpu
case_ "eval --classifier of another data set" fail ddpm eval --samples "$work/s3/samples-idx3-ubyte" --classifier "$work/clf.safetensors" --data "$work/other" --report none --device cpu
mkdir -p "$XDG_CACHE_HOME/ddpm"; echo '[null]' >"$XDG_CACHE_HOME/ddpm/gpu-self-check.json"
case_ "a self-check cache holding [null] (CPU: not read)" ok ddpm info

# --- every input named ---------------------------------------------------------------------------------------------
case_ "DDPM_GPU_KERNELS=weird" fail env DDPM_GPU_KERNELS=weird dotnet "$dll" info
case_ "DDPM_SIMD=avx9000" fail env DDPM_SIMD=avx9000 dotnet "$dll" info
case_ "DDPM_SELF_CHECK=maybe" fail env DDPM_SELF_CHECK=maybe dotnet "$dll" info
case_ "XDG_CACHE_HOME relative" fail env XDG_CACHE_HOME=relative/cache dotnet "$dll" info
case_ "DDPM_TEST_SAVE_DELAY_MS=-1" fail env DDPM_TEST_SAVE_DELAY_MS=-1 dotnet "$dll" info
for flag in "train --out" "train --data" "sample --out" "sample --checkpoint" "eval --samples" "eval --report" "eval --classifier" "eval --data" "check --ptx"; do
    case_ "$flag ''" fail ddpm $flag ""
done
case_ "check --ptx into a file" fail ddpm check --ptx "$ckpt"
case_ "train --seed -1" fail ddpm train --seed -1
case_ "sample --seed x" fail ddpm sample --seed x
case_ "train --lr fast" fail ddpm train --lr fast
case_ "train --epochs 2.5" fail ddpm train --epochs 2.5
case_ "train --batch 0" fail ddpm train --batch 0
case_ "train --ema 1" fail ddpm train --ema 1
case_ "train --ema-warmup 2" fail ddpm train --ema-warmup 2
case_ "train --min-snr -1" fail ddpm train --min-snr -1
case_ "train --recipe wild" fail ddpm train --recipe wild
fresh "$work/d1"; mkdir "$work/d1/loss.png"
case_ "a folder where loss.png goes" fail ddpm train --out "$work/d1" --data "$work/data" --device cpu
fresh "$work/d2"; mkdir "$work/d2/.ddpm.lock"
case_ "a folder where the lock goes" fail ddpm train --out "$work/d2" --data "$work/data" --device cpu
fresh "$work/d3"; mkdir "$work/d3/samples.png"
case_ "a folder where sample's samples.png goes" fail ddpm sample --checkpoint "$ckpt" --out "$work/d3" --device cpu
case_ "eval --classifier DIR" fail ddpm eval --classifier "$work" --data "$work/data"
case_ "eval --samples a label file" fail ddpm eval --samples "$work/data/train-labels-idx1-ubyte" --classifier "$work/clf.safetensors" --data "$work/data" --report none
case_ "eval --samples a folder without a run" fail ddpm eval --samples "$work/data" --classifier "$work/clf.safetensors" --data "$work/data"

# --- the core's classes (the first attack's): checkpoints, data, flags -------------------------------------------
head -c 1000 "$ckpt" >"$work/trunc.safetensors"
case_ "a truncated checkpoint" fail ddpm sample --checkpoint "$work/trunc.safetensors" --out "$work/s6" --device cpu
mkfifo "$work/fifo.safetensors"
case_ "a FIFO as the checkpoint" fail ddpm sample --checkpoint "$work/fifo.safetensors" --out "$work/s7" --device cpu
case_ "/dev/zero as the checkpoint" fail ddpm sample --checkpoint /dev/zero --out "$work/s8" --device cpu
case_ "a missing checkpoint" fail ddpm sample --checkpoint "$work/none.safetensors" --out "$work/s9" --device cpu
case_ "the checkpoint is a folder" fail ddpm sample --checkpoint "$work/run" --out "$work/s10" --device cpu
fresh "$work/bad"; head -c 100 "$work/data/train-images-idx3-ubyte" >"$work/bad/train-images-idx3-ubyte"; cp "$work/data/train-labels-idx1-ubyte" "$work/bad/"
case_ "truncated training images" fail ddpm train --out "$work/t3" --data "$work/bad" --device cpu
case_ "--data is a file" fail ddpm train --out "$work/t4" --data "$ckpt" --device cpu
case_ "--out is a file" fail ddpm train --out "$ckpt" --data "$work/data" --device cpu
case_ "--resume without a checkpoint" fail ddpm train --resume --out "$work/t5" --data "$work/data" --device cpu
case_ "train into a folder that holds a run" fail ddpm train --out "$work/run" --data "$work/data" --device cpu
case_ "--resume --batch 8 (cannot change)" fail ddpm train --resume --batch 8 --out "$work/r2" --data "$work/data" --device cpu
case_ "sample --digit 3 of an unconditional model" fail ddpm sample --checkpoint "$ckpt" --digit 3 --out "$work/s11" --device cpu
case_ "sample --steps 5 with ddpm" fail ddpm sample --checkpoint "$ckpt" --steps 5
case_ "an unknown command" fail ddpm frobnicate

echo "hostile-inputs: $total cases: $good answered in one line or handled, $bad not, $hung hung, $big over 2 GB, $lost lost a file"
[ "$good" -eq "$total" ]
