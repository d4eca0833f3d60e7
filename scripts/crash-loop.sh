#!/usr/bin/env bash
# Crash loop for persistent volumes: N times, run the crash_writer workload on two io_uring
# file legs, kill -9 it at a random moment, then recover and verify (legs byte-identical over
# the exported range, every logged ack on disk). Prints "N passed, M failed".
#
#   scripts/crash-loop.sh [N=50] [DIR=build/crash-loop]
set -euo pipefail

n=${1:-50}
dir=${2:-build/crash-loop}
cd "$(dirname "$0")/.."

cargo build --release -q -p nvmirror-mirror --example crash_writer
bin=build/release/examples/crash_writer
[ -x "$bin" ] || bin=$(find build -path '*release/examples/crash_writer' -type f | head -1)

rm -rf "$dir"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
passed=0
failed=0
start=$(date +%s.%N)
for i in $(seq 1 "$n"); do
    "$bin" run "$dir" >"$dir/run.out" 2>&1 &
    pid=$!
    # 50..1500 ms of writing (including start-up and recovery of the previous crash).
    sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.3f", 0.05 + r / 32767 * 1.45 }')"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if "$bin" recover "$dir" >"$dir/recover.out" 2>&1; then
        passed=$((passed + 1))
        echo "iteration $i: ok: $(cat "$dir/run.out" "$dir/recover.out" | tr '\n' ' ')"
    else
        failed=$((failed + 1))
        echo "iteration $i: FAILED"
        sed 's/^/    /' "$dir/run.out" "$dir/recover.out"
        cp -r "$dir" "$dir.failed.$i" 2>/dev/null || true
    fi
done
end=$(date +%s.%N)
echo "$passed passed, $failed failed ($(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s)"
[ "$failed" -eq 0 ]
