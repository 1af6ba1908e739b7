#!/usr/bin/env bash
# The long reliability setting: the fault-injection chain with many SIGKILLs (KILLS, default 200) and the
# fuzz tests with many cases (CASES, default 100000), then their count lines. Run from the repository root:
#   scripts/reliability-long.sh             # about 5 minutes of the chain on two cores, plus the fuzzers
#   KILLS=50 CASES=10000 scripts/reliability-long.sh
set -euo pipefail

cd "$(dirname "$0")/.."
log=$(mktemp -t ddpm-reliability.XXXXXX)
trap 'rm -f "$log"' EXIT

dotnet build Ddpm.sln -c Release 2>&1 | grep -E " error |rror\(s\)" | sort -u

status=0
DDPM_FAULT_KILLS=${KILLS:-200} DDPM_FUZZ_CASES=${CASES:-100000} \
    dotnet test Ddpm.sln --no-build -c Release \
    --filter "FullyQualifiedName~FaultInjection|FullyQualifiedName~Fuzz" \
    --logger "console;verbosity=detailed" >"$log" 2>&1 || status=$?

echo "--- counts"
grep -iE "fault-injection:|fuzz[a-z-]*:" "$log" | grep -vE "^\s*(Passed|Failed|Skipped) " | sed 's/^[[:space:]]*//' || true
echo "--- results"
grep -E "^\s*(Passed|Failed|Skipped) |Total tests|Passed:|Failed:|Skipped:" "$log" | sed 's/^[[:space:]]*//' || true
if [ "$status" -ne 0 ]; then
    echo "--- failures"
    grep -A 30 -E "^\s*Failed " "$log" || tail -50 "$log"
fi
exit "$status"
