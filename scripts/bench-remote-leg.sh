#!/usr/bin/env bash
# A remote (nvme-tcp://) leg inside `nvmirror serve` against the bare initiator on the same
# namespace: 4 KiB random writes at QD32 and QD1, SECONDS each (default 5).
#
#   scripts/bench-remote-leg.sh [SECONDS]
#
# Site B: `nvmirror serve` exporting a mem leg over NVMe/TCP (the remote namespace).
#   served: site A, `nvmirror serve --cores 0` (idle = "spin") with a mem leg and
#           nvme-tcp://B as legs, its reactor running the initiator on CPU 0, driven by the
#           tcp_randwrite example from CPU 1;
#   bare:   tcp_randwrite (nvmirror's initiator) drives B directly, from CPU 0 (where A's
#           reactor ran the initiator; A is paused meanwhile).
# With 3 CPUs or more B has CPU 2 and every poller spins on its own CPU. With 2, B shares
# CPU 1 with the host, which then yields the CPU after an empty poll (`--yield`), and the bare
# initiator runs on CPU 1 the same way, so both figures pay the same sharing (each CPU-1
# hand-over costs up to a scheduler tick). Reports served/bare for IOPS (goal >= 0.8) and the
# p50 latencies. ROUNDS=N repeats and reports medians; NVMIRROR=PATH runs another build of
# serve (a before/after).
set -euo pipefail

secs=${1:-5}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${ROUNDS:-1}
dir=${BENCH_DIR:-$root/build/bench-remote-leg}
mkdir -p "$dir"
for tool in taskset python3 cargo; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done
(cd "$root" && cargo build --release -q -p nvmirror-target --bin nvmirror &&
    cargo build --release -q -p nvmirror-nvme --example tcp_randwrite)
bin=${CARGO_TARGET_DIR:-$root/build}/release
# NVMIRROR=PATH runs another build of serve (e.g. the parent commit's) for a before/after.
nvm=${NVMIRROR:-$bin/nvmirror}
nqn=nqn.2026-11.io.nvmirror:vol0
cpus=$(nproc)
b_cpu=1 host_yield=--yield bare_cpu=1
if [ "$cpus" -ge 3 ]; then b_cpu=2 host_yield= bare_cpu=0; fi
bport=$((30000 + RANDOM % 10000))
aport=$((bport + 1))
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null || true' EXIT

# serve NAME CPU PORT IDLE LEGS...
serve() {
    local name=$1 cpu=$2 port=$3 idle=$4
    shift 4
    local args=()
    for l in "$@"; do args+=(--leg "$l"); done
    rm -rf "$dir/$name"
    mkdir -p "$dir/$name"
    printf '[reactors]\nidle = "%s"\n[[volume]]\nname = "vol0"\nlegs = ["mem://1GiB"]\n[[subsystem]]\nnqn = "%s"\nnamespaces = ["vol0"]\n' \
        "$idle" "$nqn" >"$dir/$name/nvmirror.toml"
    RUST_LOG=warn "$nvm" serve --config "$dir/$name/nvmirror.toml" --data-dir "$dir/$name" \
        --cores "$cpu" --listen "127.0.0.1:$port" --nbd-listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 "${args[@]}" >"$dir/$name/serve.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do grep -q serving "$dir/$name/serve.log" 2>/dev/null && return; sleep 0.1; done
    cat "$dir/$name/serve.log" >&2
    echo "site $name did not start" >&2
    exit 1
}

# run LABEL CPU URI QD [--yield]: prints "iops p50_us"
run() {
    local out
    out=$(taskset -c "$2" "$bin/examples/tcp_randwrite" "$3" "$secs" --qd "$4" --bs 4096 ${5:-})
    echo "  $1 QD$4: $out" >&2
    python3 -c 'import sys, re
kv = dict(re.findall(r"(\w+)=([0-9.]+)", sys.argv[1]))
print(kv["iops"], kv["p50_us"])' "$out"
}

serve b "$b_cpu" "$bport" sleep mem://1GiB
bytes=$(sed -n 's/^volume vol0: \([0-9]*\) bytes.*/\1/p' "$dir/b/serve.log")
serve a 0 "$aport" spin "mem://$bytes" "nvme-tcp://127.0.0.1:$bport/$nqn?kato=30s"
a_pid=${pids[-1]}

declare -A got
for round in $(seq "$rounds"); do
    for qd in 32 1; do
        got[served-$qd]+="$(run "round $round served" 1 "nvme-tcp://127.0.0.1:$aport/$nqn" "$qd" $host_yield);"
        # The bare initiator takes A's reactor CPU: A is paused meanwhile.
        kill -STOP "$a_pid"
        got[bare-$qd]+="$(run "round $round bare" "$bare_cpu" "nvme-tcp://127.0.0.1:$bport/$nqn" "$qd" $host_yield);"
        kill -CONT "$a_pid"
    done
done

median() { # "iops p50;iops p50;..." FIELD
    python3 -c 'import sys, statistics
rows = [r.split() for r in sys.argv[1].split(";") if r.strip()]
print(statistics.median(float(r[int(sys.argv[2])]) for r in rows))' "$1" "$2"
}
# shellcheck source=scripts/lib/results.sh
. "$root/scripts/lib/results.sh"
for qd in 32 1; do
    s_iops=$(median "${got[served-$qd]}" 0) b_iops=$(median "${got[bare-$qd]}" 0)
    s_p50=$(median "${got[served-$qd]}" 1) b_p50=$(median "${got[bare-$qd]}" 1)
    echo "QD$qd: served ${s_iops%.*} IOPS p50 $s_p50 us, bare ${b_iops%.*} IOPS p50 $b_p50 us"
    result "remote leg: served/bare 4K randwrite QD$qd IOPS" \
        "$(python3 -c "print(round($s_iops / max($b_iops, 1), 2))")" ">=" 0.8
    result "remote leg: served QD$qd p50 (us)" "$s_p50" - -
done
echo "cpus: $cpus (B on CPU $b_cpu, bare initiator on CPU $bare_cpu), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
