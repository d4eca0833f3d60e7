#!/usr/bin/env bash
# The mirror engine's benchmarks, each single vs mirrored in one run, 4 KiB random writes at
# QD32 on one core (nvmirror-bench, in-process), after a 2 s ramp (the sparse mem legs'
# first-touch page faults are over before measuring):
#   1. device-bound: mem legs with 20 us latency   goals: IOPS ratio >= 0.97, +p50 <= 1 us, +p99 <= 3 us
#   2. CPU-bound: zero-latency mem legs            goal: mirrored >= 1 M IOPS
#                 null legs                        goal: mirrored >= 4.5 M IOPS
#   2b. DRAM-resident, preconditioned: two 1 GiB hugepage mem legs after a full sequential
#      pass, as SPDK's malloc bdevs are              goal: mirrored/single >= 0.45
#      and the volume layer's own cost per write (null legs: mirrored minus single, in ns)
#   3. io_uring on two files vs fio with two jobs (one file each); the physical limit of
#      mirrored host writes is half of fio's aggregate   goal: mirrored >= 0.9 x fio/2
#
# Working sets. Parts 1 and 2 run on a cache-resident hot set (HOT, default 16 MiB per leg),
# where the legs' latency or the engine sets the pace; and again on a DRAM-resident one (DRAM,
# default 256 MiB per leg), reported without a goal: there every write costs one cold 4 KiB
# copy per leg (about 0.4 us each on a 2-core VM), so a mirrored write costs a second copy that
# a single-leg write does not, and the ratio measures the memory system, not the engine.
#
#   scripts/bench-mirror.sh [SECONDS]        (default 10; BENCH_DIR for the results, IMG_DIR
#                                             for the two 1 GiB images, default BENCH_DIR)
set -euo pipefail

secs=${1:-10}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-$root/build/bench-mirror}
mkdir -p "$dir"
for tool in fio jq cargo python3; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done
(cd "$root" && cargo build --release -q -p nvmirror-bench)
bench=${CARGO_TARGET_DIR:-$root/build}/release/nvmirror-bench

# run NAME LEG... -> prints "iops p50_ns p99_ns" and keeps the JSON
run() {
    local name=$1
    shift
    local args=()
    for l in "$@"; do args+=(--leg "$l"); done
    "$bench" "${args[@]}" --rw randwrite --bs 4k --iodepth 32 --runtime "${secs}s" --time_based \
        --ramp_time 2s --size "$size" --output-format json >"$dir/$name.json"
    jq -r '.jobs[0].write | "\(.iops) \(.lat_ns.percentile["50.000000"]) \(.lat_ns.percentile["99.000000"])"' \
        "$dir/$name.json"
}
# run_filled NAME LEG... -> like run, on legs filled by one sequential pass first (a job file:
# the fill and the measured job share the opened legs)
run_filled() {
    local name=$1
    shift
    {
        echo "[global]"
        for l in "$@"; do echo "leg=$l"; done
        echo "size=1GiB"
        echo "iodepth=32"
        echo "[fill]"
        echo "rw=write"
        echo "bs=128k"
        echo "[measure]"
        echo "rw=randwrite"
        echo "bs=4k"
        echo "runtime=${secs}s"
        echo "time_based"
    } >"$dir/$name.fio"
    "$bench" "$dir/$name.fio" --output-format json >"$dir/$name.json"
    jq -r '.jobs[1].write | "\(.iops) \(.lat_ns.percentile["50.000000"]) \(.lat_ns.percentile["99.000000"])"' \
        "$dir/$name.json"
}
calc() { python3 -c "print($1)"; }
# shellcheck source=scripts/lib/results.sh
. "$root/scripts/lib/results.sh"

hot=${HOT:-16MiB}
dram=${DRAM:-256MiB}
for set in hot dram; do
    if [ $set = hot ]; then size=$hot; sfx=; else size=$dram; sfx=-dram; fi
    echo "== 1. device-bound: mem legs with 20 us latency, $size hot set"
    read -r s_iops s_p50 s_p99 < <(run "lat-single$sfx" "mem://1GiB?latency=20us")
    read -r m_iops m_p50 m_p99 < <(run "lat-mirror$sfx" "mem://1GiB?latency=20us" "mem://1GiB?latency=20us")
    echo "  single:   ${s_iops} IOPS, p50 ${s_p50} ns, p99 ${s_p99} ns"
    echo "  mirrored: ${m_iops} IOPS, p50 ${m_p50} ns, p99 ${m_p99} ns"
    if [ $set = hot ]; then
        result "engine 20us legs ($size): IOPS mirrored/single" "$(calc "round($m_iops / $s_iops, 3)")" ">=" 0.97
        result "engine 20us legs ($size): added p50 (us)" "$(calc "round(($m_p50 - $s_p50) / 1000, 2)")" "<=" 1
        result "engine 20us legs ($size): added p99 (us)" "$(calc "round(($m_p99 - $s_p99) / 1000, 2)")" "<=" 3
    else
        result "engine 20us legs ($size): IOPS mirrored/single" "$(calc "round($m_iops / $s_iops, 3)")" ">=" -
    fi

    echo "== 2. CPU-bound, one core, $size hot set"
    read -r ms _ _ < <(run "mem-single$sfx" "mem://1GiB")
    read -r mm _ _ < <(run "mem-mirror$sfx" "mem://1GiB" "mem://1GiB")
    echo "  mem single ${ms} IOPS, mirrored ${mm}"
    if [ $set = hot ]; then
        read -r ns _ _ < <(run null-single "null://1TiB")
        read -r nm _ _ < <(run null-mirror "null://1TiB" "null://1TiB")
        echo "  null single ${ns} IOPS, mirrored ${nm}"
        result "engine: mirrored zero-latency mem, $size (M IOPS)" "$(calc "round($mm / 1e6, 3)")" ">=" 1
        result "engine: mirrored null (M IOPS)" "$(calc "round($nm / 1e6, 3)")" ">=" 4.5
    else
        result "engine: mirrored zero-latency mem, $size (M IOPS)" "$(calc "round($mm / 1e6, 3)")" ">=" -
    fi
done

echo "== 2b. DRAM-resident, preconditioned: 1 GiB hugepage mem legs after a full pass"
read -r fs _ _ < <(run_filled filled-single "mem://1GiB?hugepages=1")
read -r fm _ _ < <(run_filled filled-mirror "mem://1GiB?hugepages=1" "mem://1GiB?hugepages=1")
echo "  filled mem single ${fs} IOPS, mirrored ${fm}"
result "engine: filled 1GiB hugepage legs, IOPS mirrored/single" "$(calc "round($fm / $fs, 3)")" ">=" 0.45
result "engine: filled 1GiB hugepage legs, mirrored (M IOPS)" "$(calc "round($fm / 1e6, 3)")" ">=" -
result "engine: volume layer per write, null legs (ns)" "$(calc "round(1e9 / $nm - 1e9 / $ns)")" ">=" -

echo "== 3. io_uring on two files vs fio, two jobs"
size=$((1 << 30))
img=${IMG_DIR:-$dir}
mkdir -p "$img"
for f in a b; do
    if [ ! -f "$img/$f.img" ] || [ "$(stat -c %s "$img/$f.img")" -ne "$size" ]; then
        dd if=/dev/zero of="$img/$f.img" bs=1M count=1024 oflag=direct status=none
    fi
done
fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32 --time_based \
    --runtime="$secs" --size="$size" --group_reporting --output-format=json --output="$dir/fio.json" \
    --name=a --filename="$img/a.img" --name=b --filename="$img/b.img" >/dev/null
fio_iops=$(jq '.jobs[0].write.iops' "$dir/fio.json")
read -r u_iops _ _ < <(run uring-mirror "file://$img/a.img" "file://$img/b.img")
echo "  fio aggregate ${fio_iops} IOPS (limit for mirrored writes: half), nvmirror mirrored ${u_iops}"
result "engine: io_uring mirrored / (fio 2 jobs / 2)" "$(calc "round($u_iops / ($fio_iops / 2), 3)")" ">=" 0.9
