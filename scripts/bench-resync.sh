#!/usr/bin/env bash
# Resync measurements on mem:// legs (mirror/examples/resync_bench.rs):
#   1. a leg that missed writes to 10 % of the regions is re-attached: bytes copied / dirty
#      bytes (goal <= 1.0);
#   2. full resync of a new leg on an idle volume vs a raw copy of the same bytes between the
#      same back ends with the same windows and I/O size (goal: resync/raw >= 0.8);
#   3. host 4 KiB random writes at QD 32: p99 during a full resync vs before, adaptive pacing on
#      and off (goal with adaptive on: <= 2x).
#
#   scripts/bench-resync.sh [SIZE_BYTES]        (default 1 GiB per leg)
#
# LATENCY=20us gives every mem leg that fixed completion latency. Timings on a shared machine
# with few cores mostly measure the scheduler: the host thread, the resync thread and
# everything else compete for the same cores.
set -euo pipefail

size=${1:-$((1 << 30))}
case $size in '' | *[!0-9]*) echo "usage: $0 [SIZE_BYTES]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p nvmirror-mirror --example resync_bench
bin=build/release/examples/resync_bench
lat=()
[ -n "${LATENCY:-}" ] && lat=(--latency "$LATENCY")

# shellcheck source=scripts/lib/results.sh
. scripts/lib/results.sh
# field TEXT PATTERN: the number after PATTERN in TEXT.
field() { sed -n "s/.*$2 \([0-9.]*\).*/\1/p" <<<"$1" | head -1; }

out=$("$bin" dirty --size "$size" --pct 10 "${lat[@]}") || exit 1
echo "$out"
result "resync: copied / dirty bytes" "$(field "$out" "copied\/dirty =")" "<=" 1.0
out=$("$bin" copy --size "$size" "${lat[@]}") || exit 1
echo "$out"
result "resync: resync / raw copy throughput" "$(field "$out" "resync\/raw throughput =")" ">=" 0.8
out=$("$bin" hostlat --size "$size" --secs 3 "${lat[@]}") || exit 1
echo "$out"
result "resync: host p99 during / before (adaptive)" "$(field "$out" "; ratio")" "<=" 2
"$bin" hostlat --size "$size" --secs 3 --no-adaptive "${lat[@]}"
