#!/usr/bin/env bash
# nvmirror's fio external ioengine (fio/, docs/fio.md), as a user runs it:
#   1. builds build/fio/libnvmirror_fio.so (fio/build.sh);
#   2. fio --verify=crc32c writes and reads back a mirrored volume of two mem legs through
#      the engine: must pass with no errors;
#   3. negative control: the same job on two null:// legs (reads return zeros) must fail its
#      verify, so step 2 can fail;
#   4. 4 KiB random writes at QD32 for SECONDS (default 5) on the same two mem legs, through
#      fio with the engine and through nvmirror-bench, one after the other: IOPS ratio
#      fio/nvmirror-bench (goal >= 0.9: fio's own overhead is the limit) and both p50s.
# Exits non-zero when step 2 or 3 goes wrong; the ratio is reported with its goal.
#
#   scripts/fio-engine.sh [SECONDS]
set -euo pipefail

secs=${1:-5}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-$root/build/fio-engine}
mkdir -p "$dir"
for tool in fio jq cargo python3 cc; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done
so=$("$root/fio/build.sh")
(cd "$root" && cargo build --release -q -p nvmirror-bench)
bench=${CARGO_TARGET_DIR:-$root/build}/release/nvmirror-bench
# shellcheck source=scripts/lib/results.sh
. "$root/scripts/lib/results.sh"
calc() { python3 -c "print($1)"; }
engine=(--thread "--ioengine=external:$so")

echo "== fio --verify=crc32c through the engine, two mem legs"
fio "${engine[@]}" --leg=mem://256MiB --leg=mem://256MiB --name=verify --rw=randwrite --bs=4k \
    --iodepth=32 --size=64m --verify=crc32c --do_verify=1 --output-format=json \
    >"$dir/verify.json" 2>"$dir/verify.err" || { cat "$dir/verify.err" >&2; echo "FAIL: fio verify"; exit 1; }
read -r err written verified < <(jq -r '.jobs[0] | "\(.error) \(.write.total_ios) \(.read.total_ios)"' "$dir/verify.json")
echo "  error $err, $written blocks written, $verified read back and verified"
[ "$err" = 0 ] && [ "$written" -gt 0 ] && [ "$verified" = "$written" ] || { echo "FAIL: fio verify"; exit 1; }

echo "== negative control: the same verify on two null:// legs must fail"
if fio "${engine[@]}" --leg=null://256MiB --leg=null://256MiB --name=control --rw=randwrite \
    --bs=4k --iodepth=32 --size=8m --verify=crc32c --do_verify=1 >"$dir/control.out" 2>&1; then
    echo "FAIL: fio's verify passed on legs that keep nothing"
    exit 1
fi
grep -q "verify" "$dir/control.out" || { cat "$dir/control.out" >&2; echo "FAIL: the control failed, but not on verify"; exit 1; }
echo "  verify failed as it must: $(grep -m1 -i "bad magic\|verify" "$dir/control.out")"

echo "== 4 KiB randwrite QD32, ${secs} s: fio with the engine vs nvmirror-bench, two mem legs"
fio "${engine[@]}" --leg=mem://1GiB --leg=mem://1GiB --name=perf --rw=randwrite --bs=4k \
    --iodepth=32 --size=256m --time_based --runtime="$secs" --ramp_time=2 \
    --output-format=json >"$dir/fio.json"
read -r f_iops f_p50 < <(jq -r '.jobs[0].write | "\(.iops) \(.clat_ns.percentile["50.000000"])"' "$dir/fio.json")
"$bench" --leg mem://1GiB --leg mem://1GiB --rw randwrite --bs 4k --iodepth 32 --size 256MiB \
    --runtime "${secs}s" --time_based --ramp_time 2s --output-format json >"$dir/bench.json"
read -r b_iops b_p50 < <(jq -r '.jobs[0].write | "\(.iops) \(.clat_ns.percentile["50.000000"])"' "$dir/bench.json")
echo "  fio + engine:   $(calc "round($f_iops)") IOPS, p50 $(calc "round($f_p50 / 1000, 1)") us"
echo "  nvmirror-bench: $(calc "round($b_iops)") IOPS, p50 $(calc "round($b_p50 / 1000, 1)") us"
result "fio engine: 4k randwrite QD32 IOPS fio/nvmirror-bench" "$(calc "round($f_iops / $b_iops, 3)")" ">=" 0.9
echo "PASS"
