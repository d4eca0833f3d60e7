#!/usr/bin/env bash
# Drives nvmirror's NVMe/TCP target with nvmirror's NVMe/TCP initiator over loopback:
# 4 KiB random writes, queue depth 32, one queue pair, SECONDS each (default 10), once with
# a loop that spins on poll and once with one that yields the CPU after an empty poll.
#
#   scripts/bench-nvme-tcp.sh [SECONDS]
#
# The target is the serve_mem example on one reactor with a 1 GiB RAM namespace, on
# 127.0.0.1:$PORT (default 4420). ROUNDS=N repeats both runs N times (default 1). Each line
# is the tcp_randwrite example's: iops, p50/p99/p99.9 latency in microseconds.
set -euo pipefail

secs=${1:-10}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-4420}
rounds=${ROUNDS:-1}
nqn=nqn.2024-01.io.nvmirror:mem0

echo "building"
(cd "$root" && cargo build --release -q -p nvmirror-target --example serve_mem &&
    cargo build --release -q -p nvmirror-nvme --example tcp_randwrite)
bin=${CARGO_TARGET_DIR:-$root/build}/release/examples

RUST_LOG=warn "$bin/serve_mem" --listen "127.0.0.1:$port" --nqn "$nqn" --leg mem://1GiB --cores 1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

uri="nvme-tcp://127.0.0.1:$port/$nqn"
for round in $(seq "$rounds"); do
    for mode in spin yield; do
        flag=""
        [ "$mode" = yield ] && flag=--yield
        echo "round $round $mode: $("$bin/tcp_randwrite" "$uri" "$secs" --qd 32 --bs 4096 $flag)"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
