#!/usr/bin/env bash
# What --breakdown costs: mirrored 4 KiB random writes at QD32 over two null:// legs and over
# two mem:// legs, without and with --breakdown, in interleaved rounds (so drift on a shared
# machine hits every variant alike). With BASE=path/to/nvmirror-bench (a build of an earlier
# commit) the same runs of that binary are added, to show that "off" did not slow the engine.
# Prints the median IOPS of each variant over the rounds, and every round's figures.
#
#   scripts/bench-breakdown.sh [SECONDS] [ROUNDS]     (default 5 s, 3 rounds; 1 s ramp each)
set -euo pipefail

secs=${1:-5}
rounds=${2:-3}
for n in "$secs" "$rounds"; do
    case $n in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [ROUNDS]" >&2; exit 2 ;; esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 2; }
(cd "$root" && cargo build --release -q -p nvmirror-bench)
new=${CARGO_TARGET_DIR:-$root/build}/release/nvmirror-bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# run BINARY NAME LEGTYPE [FLAGS...] -> appends "NAME LEGTYPE IOPS" to $out/results
run() {
    local bin=$1 name=$2 leg=$3
    shift 3
    local iops
    iops=$("$bin" --leg "$leg" --leg "$leg" --rw randwrite --bs 4k --iodepth 32 \
        --runtime "${secs}s" --ramp_time 1s --size 256MiB --output-format json "$@" |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
    echo "$name $leg $iops" | tee -a "$out/results"
}

for round in $(seq "$rounds"); do
    echo "# round $round"
    for leg in null://1TiB mem://1GiB; do
        if [[ -n ${BASE:-} ]]; then run "$BASE" base "$leg"; fi
        run "$new" off "$leg"
        run "$new" on "$leg" --breakdown
    done
done

echo "# median IOPS over $rounds rounds (mirrored, 4k randwrite, QD32, ${secs}s)"
python3 - "$out/results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, leg, iops = line.split()
    runs.setdefault((leg, name), []).append(int(iops))
for leg in ("null://1TiB", "mem://1GiB"):
    off = statistics.median(runs[(leg, "off")])
    for name in ("base", "off", "on"):
        if (leg, name) in runs:
            m = statistics.median(runs[(leg, name)])
            print(f"{leg:12} {name:5} {m/1e6:7.3f} M IOPS  ({m/off:6.1%} of off)")
EOF
