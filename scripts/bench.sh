#!/usr/bin/env bash
# The canonical benchmark suite, in one command:
#
#   scripts/bench.sh [SECONDS]        (default 5: seconds per measured job)
#
# Runs, one after another on this machine:
#   1. the harness: nvmirror-bench on a null leg vs fio's null engine, and on one mem leg;
#   2. the engine: single vs mirrored on 20 us mem legs, zero-latency mem and null legs on one
#      core, io_uring on two files vs fio (scripts/bench-mirror.sh);
#   3. the io_uring back end vs fio on one file (scripts/bench-uring.sh, one round);
#   4. the write-intent bitmap on and off (mirror/examples/bitmap_bench.rs);
#   5. resync: copied/dirty, resync vs raw copy, host p99 during a resync (bench-resync.sh);
#   6. NVMe/TCP end to end, serve on CPU 0 and the initiator on CPU 1 (bench-target.sh);
#   7. NBD: fio's nbd engine against serve vs nbdkit memory (fio-nbd.sh);
#   8. a remote nvme-tcp:// leg inside serve vs the bare initiator on the same namespace
#      (bench-remote-leg.sh);
#   9. the host's cost of async-journal and async-cycle legs, async-cycle's link bytes
#      on a hot spot, and async-journal's shipping rate to a 100 us far leg (bench-async.sh);
# then prints one table of results with the goal next to each, and draws the latency curves.
#
# Everything goes to bench-results/<UTC time>-<commit>/ (git-ignored): machine.txt, one log
# per part, the fio-shaped JSON of every nvmirror-bench run, results.tsv, summary.txt and
# latency.svg. A part that fails is reported as FAILED and the suite goes on. PARTS selects
# parts by number (PARTS="1 2"), SIZE overrides the hot set of the CPU-bound runs.
set -uo pipefail

secs=${1:-5}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/lib/results.sh
. scripts/lib/results.sh

need=()
for tool in fio jq python3 taskset; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v nbdkit >/dev/null || need+=(nbdkit)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    pkgs=()
    for t in "${need[@]}"; do [ "$t" = taskset ] && pkgs+=(util-linux) || pkgs+=("$t"); done
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out=$root/bench-results/$(date -u +%Y%m%dT%H%M%SZ)-$rev
mkdir -p "$out"
export BENCH_RESULTS=$out/results.tsv
: >"$BENCH_RESULTS"

{
    echo "date: $(date -u)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc)"
    lscpu | grep -E 'Model name|Thread|Core|Socket|L[123]'
    free -g | sed -n 1,2p
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rustc: $(rustc -V)"
    echo "fio: $(fio --version)"
    echo "nbdkit: $(nbdkit --version 2>/dev/null | head -1)"
} >"$out/machine.txt"
cat "$out/machine.txt"

echo "== building"
cargo build --release -q -p nvmirror-bench -p nvmirror-target --bins || exit 1
cargo build --release -q -p nvmirror-mirror --example bitmap_bench --example resync_bench || exit 1
bin=${CARGO_TARGET_DIR:-$root/build}/release
bench=$bin/nvmirror-bench

want() { [ -z "${PARTS:-}" ] || [[ " $PARTS " == *" $1 "* ]]; }

# part N NAME COMMAND...: runs it with its output shown and logged; a failure is a result.
part() {
    local n=$1 name=$2
    shift 2
    want "$n" || return 0
    echo
    echo "== $n. $name"
    "$@" 2>&1 | tee "$out/$n-$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "  part $n ($name) FAILED: exit $rc"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "exit $rc" - - FAILED >>"$BENCH_RESULTS"
    fi
}

# The harness must not be the bottleneck: null leg vs fio's null engine, and one mem leg.
harness() {
    local iops fio_iops
    iops=$("$bench" --leg null://1TiB --rw randwrite --bs 4k --iodepth 32 --runtime "${secs}s" \
        --time_based --output-format json | tee "$out/harness-null.json" | jq '.jobs[0].write.iops')
    fio --name=null --ioengine=null --rw=randwrite --bs=4k --iodepth=32 --size=1T --time_based \
        --runtime="$secs" --output-format=json --output="$out/fio-null.json" >/dev/null || return 1
    fio_iops=$(jq '.jobs[0].write.iops' "$out/fio-null.json")
    echo "nvmirror-bench null:// ${iops%.*} IOPS, fio ioengine=null ${fio_iops%.*} IOPS"
    result "harness: nvmirror-bench null / fio null" "$(python3 -c "print(round($iops / $fio_iops, 2))")" ">=" 1
    iops=$("$bench" --leg mem://1GiB --rw randwrite --bs 4k --iodepth 32 --runtime "${secs}s" \
        --ramp_time 1s --time_based --size "${SIZE:-16MiB}" --output-format json |
        tee "$out/harness-mem.json" | jq '.jobs[0].write.iops')
    result "harness: one zero-latency mem leg (M IOPS)" "$(python3 -c "print(round($iops / 1e6, 2))")" ">=" 2
}

bitmap() {
    "$bin/examples/bitmap_bench" seq | tee "$out/bitmap-seq.txt" || return 1
    local per1000
    per1000=$(sed -n 's/.*= \([0-9.]*\) per 1000.*/\1/p' "$out/bitmap-seq.txt" | head -1)
    result "bitmap: seq 128K metadata writes per 1000" "$per1000" "<=" 1
    "$bin/examples/bitmap_bench" rand --rounds 3 --secs "$(( secs > 3 ? 3 : secs ))" |
        tee "$out/bitmap-rand.txt" || return 1
    local line iops p99
    line=$(grep '^median:' "$out/bitmap-rand.txt")
    iops=$(sed -n 's/.*IOPS on\/off = \([0-9.]*\).*/\1/p' <<<"$line")
    p99=$(sed -n 's/.*p99 on\/off = \([0-9.]*\).*/\1/p' <<<"$line")
    result "bitmap: 4K rand IOPS on/off" "$iops" ">=" 0.97
    result "bitmap: 4K rand p99 on/off" "$p99" "<=" 1.05
}

part 1 harness harness
part 2 engine env BENCH_DIR="$out/engine" IMG_DIR="$root/build/bench-mirror" scripts/bench-mirror.sh "$secs"
part 3 uring env ROUNDS=1 scripts/bench-uring.sh "$secs"
part 4 bitmap bitmap
part 5 resync scripts/bench-resync.sh
part 6 nvme-tcp env BENCH_DIR="$out/nvme-tcp" scripts/bench-target.sh "$secs"
part 7 nbd scripts/fio-nbd.sh "$secs"
part 8 remote-leg env BENCH_DIR="$out/remote-leg" scripts/bench-remote-leg.sh "$secs"
part 9 async env BENCH_DIR="$out/async" scripts/bench-async.sh "$secs"

# Latency percentile curves of the runs that have a fio-shaped JSON.
plots=()
for f in engine/lat-single engine/lat-mirror nvme-tcp/mirrored-randwrite-qd32 nvme-tcp/single-randwrite-qd32; do
    [ -s "$out/$f.json" ] && plots+=("$out/$f.json")
done
if [ ${#plots[@]} -gt 0 ]; then
    "$bench" plot "${plots[@]}" -o "$out/latency.svg" && echo "plot: $out/latency.svg"
fi

echo
echo "== results ($out)"
{
    printf '%-52s %14s   %-12s %s\n' "figure" "value" "goal" "verdict"
    while IFS=$'\t' read -r label value op goal verdict; do
        [ "$goal" = - ] && op= && goal=reported
        printf '%-52s %14s   %-12s %s\n' "$label" "$value" "$op $goal" "$verdict"
    done <"$BENCH_RESULTS"
    echo "machine: $(nproc) CPUs, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/summary.txt"
