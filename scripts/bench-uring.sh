#!/usr/bin/env bash
# Compares nvmirror's io_uring back end with fio's io_uring engine on the same file:
# 4 KiB random writes, O_DIRECT, queue depth 32, one job, SECONDS each (default 10).
# Goal: ours/fio >= 0.95.
#
#   scripts/bench-uring.sh [SECONDS]
#
# The 1 GiB file lives on the disk under build/ (BENCH_DIR overrides the directory) and is
# written in full once, so neither run pays for block allocation. Our side runs through
# `nvmirror-bench` when it accepts the fio-style job below, and always through the
# `uring_randwrite` example, so a ratio is printed either way. The example runs four ways:
# spinning on poll like a dedicated reactor core, or yielding the CPU after an empty poll
# (`--yield`; on a small shared machine the spin starves the kernel's completion work), each
# with and without registered buffers (`--fixed`). fio sleeps in io_uring_enter between
# completions. ROUNDS=N repeats everything interleaved and reports medians (default 1).
set -euo pipefail

secs=${1:-10}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-$root/build/bench-uring}
file=$dir/randwrite.img
size=$((1 << 30))
goal=0.95
mkdir -p "$dir"

for tool in fio jq cargo; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done

if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -ne "$size" ]; then
    echo "writing $file (1 GiB)"
    rm -f "$file"
    dd if=/dev/zero of="$file" bs=1M count=1024 oflag=direct status=none
fi

echo "building"
(cd "$root" && cargo build --release -q -p nvmirror-bench &&
    cargo build --release -q -p nvmirror-nvme --example uring_randwrite)
target=${CARGO_TARGET_DIR:-$root/build}/release

rounds=${ROUNDS:-1}
run_fio() { # round
    fio --name=randwrite --filename="$file" --size="$size" --ioengine=io_uring --direct=1 \
        --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 --time_based --runtime="$secs" \
        --output-format=json --output="$dir/fio.$1.json" >/dev/null
    jq '.jobs[0].write.iops' "$dir/fio.$1.json"
}
run_bench() { # round; prints nothing when nvmirror-bench cannot run the job
    if "$target/nvmirror-bench" --leg "file://$file" --rw randwrite --bs 4k --iodepth 32 \
        --runtime "${secs}s" --time_based --output-format json >"$dir/ours.$1.json" 2>"$dir/ours.err"; then
        jq -e '.jobs[0].write.iops' "$dir/ours.$1.json" 2>/dev/null || true
    fi
}
run_example() { # extra args...
    "$target/examples/uring_randwrite" "$file" "$secs" --qd 32 --bs 4096 "$@" |
        sed -n 's/^iops=\([0-9.]*\).*/\1/p'
}
median() { python3 -c "import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }

# Interleaved rounds, so drift on a shared machine hits every contender alike.
fio_all=() bench_all=() spin_all=() spin_fixed_all=() yield_all=() yield_fixed_all=()
for round in $(seq "$rounds"); do
    echo "round $round/$rounds: fio, nvmirror-bench, uring_randwrite x4 (${secs}s each)"
    fio_all+=("$(run_fio "$round")")
    b=$(run_bench "$round")
    [ -z "$b" ] || bench_all+=("$b")
    spin_all+=("$(run_example)")
    spin_fixed_all+=("$(run_example --fixed)")
    yield_all+=("$(run_example --yield)")
    yield_fixed_all+=("$(run_example --yield --fixed)")
done
[ ${#bench_all[@]} -gt 0 ] ||
    echo "  (nvmirror-bench does not run this job yet: $(head -c 200 "$dir/ours.err"))"
fio_iops=$(median "${fio_all[@]}")

ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$1" "$2"; }
verdict() {
    python3 -c "import sys; print('meets' if float(sys.argv[1]) >= float(sys.argv[2]) else 'MISSES')" "$1" "$goal"
}
report() { # name iops...
    local name=$1 iops r
    shift
    iops=$(median "$@")
    r=$(ratio "$iops" "$fio_iops")
    printf '%-26s iops=%.0f  fio=%.0f  ratio=ours/fio=%s  %s the goal (>= %s)  [%s]\n' \
        "$name" "$iops" "$fio_iops" "$r" "$(verdict "$r")" "$goal" "$*"
}

echo
printf '%-26s iops=%.0f  [%s]\n' "fio io_uring" "$fio_iops" "${fio_all[*]}"
[ ${#bench_all[@]} -eq 0 ] || report "nvmirror-bench" "${bench_all[@]}"
report "uring_randwrite" "${spin_all[@]}"
report "uring_randwrite --fixed" "${spin_fixed_all[@]}"
report "uring_randwrite --yield" "${yield_all[@]}"
report "... --yield --fixed" "${yield_fixed_all[@]}"
# shellcheck source=scripts/lib/results.sh
. "$root/scripts/lib/results.sh"
[ ${#bench_all[@]} -eq 0 ] ||
    result "io_uring: nvmirror-bench / fio, one file" "$(ratio "$(median "${bench_all[@]}")" "$fio_iops")" ">=" "$goal"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
