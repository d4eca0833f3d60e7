#!/usr/bin/env bash
# NVMe/TCP end to end: `nvmirror serve` on one core (CPU 0) exporting a volume of two
# zero-latency mem legs, driven over loopback by nvmirror-bench through the project's own
# NVMe/TCP initiator on the other core (CPU 1). 4 KiB randwrite and randread at QD32 and
# QD128 over a warmed 256 MiB hot set (SIZE overrides), then the same through a single-leg
# volume. Prints IOPS and p50/p99/p99.9.
# Goal (mirrored QD32 randwrite): >= 250k IOPS with p99 <= 230 us.
#
#   scripts/bench-target.sh [SECONDS]      (default 10)
set -euo pipefail

secs=${1:-10}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-$root/build/bench-target}
mkdir -p "$dir"
for tool in jq taskset cargo; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done
(cd "$root" && cargo build --release -q -p nvmirror-target --bin nvmirror && cargo build --release -q -p nvmirror-bench)
bin=${CARGO_TARGET_DIR:-$root/build}/release
nqn=nqn.2026-11.io.nvmirror:vol0
port=$((30000 + RANDOM % 20000))
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

serve() { # legs...
    local args=()
    for l in "$@"; do args+=(--leg "$l"); done
    rm -rf "$dir/data"
    "$bin/nvmirror" serve --data-dir "$dir/data" --cores 0 --listen "127.0.0.1:$port" \
        --nbd-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --config <(printf '[reactors]\nidle = "spin"\n[nvme_tcp]\nlisten = "127.0.0.1:%s"\n[[volume]]\nname = "vol0"\nlegs = ["mem://1GiB"]\n[[subsystem]]\nnqn = "%s"\nnamespaces = ["vol0"]\n' "$port" "$nqn") \
        "${args[@]}" >"$dir/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q serving "$dir/serve.log" 2>/dev/null && return; sleep 0.1; done
    cat "$dir/serve.log" >&2
    echo "nvmirror serve did not start" >&2
    exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

run() { # label rw qd
    taskset -c 1 "$bin/nvmirror-bench" --leg "nvme-tcp://127.0.0.1:$port/$nqn?queue_size=256" \
        --rw "$2" --bs 4k --iodepth "$3" --runtime "${secs}s" --time_based --ramp_time 2s --size "${SIZE:-256MiB}" \
        --output-format json >"$dir/$1-$2-qd$3.json"
    local d=write
    [ "$2" = randread ] && d=read
    jq -r --arg l "$1 $2 QD$3" ".jobs[0].$d | \"\(\$l): \(.iops | floor) IOPS  p50 \(.lat_ns.percentile[\"50.000000\"] / 1000) us  p99 \(.lat_ns.percentile[\"99.000000\"] / 1000) us  p99.9 \(.lat_ns.percentile[\"99.900000\"] / 1000) us\"" \
        "$dir/$1-$2-qd$3.json"
}

for setup in mirrored single; do
    if [ $setup = mirrored ]; then serve mem://1GiB mem://1GiB; else serve mem://1GiB; fi
    for rw in randwrite randread; do
        for qd in 32 128; do run $setup $rw $qd; done
    done
    stop
done
m=$(jq '.jobs[0].write.iops' "$dir/mirrored-randwrite-qd32.json")
p99=$(jq '.jobs[0].write.lat_ns.percentile["99.000000"] / 1000' "$dir/mirrored-randwrite-qd32.json")
echo "goal: mirrored QD32 randwrite >= 250000 IOPS with p99 <= 230 us: got ${m%.*} IOPS, p99 ${p99} us"
# shellcheck source=scripts/lib/results.sh
. "$root/scripts/lib/results.sh"
result "NVMe/TCP: mirrored 4K randwrite QD32 (k IOPS)" "$(python3 -c "print(round($m / 1000))")" ">=" 250
result "NVMe/TCP: mirrored 4K randwrite QD32 p99 (us)" "$p99" "<=" 230
