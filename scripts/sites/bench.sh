#!/usr/bin/env bash
# The two-site benchmark (docs/sites.md, "Performance"): the host writes 4 KiB random writes at
# QD32 (nvmirror-bench over NVMe/TCP from the host namespace) to site A's volume, one run each:
#   1. local-only:      A's volume has only its local leg
#   2. mirrored:        local leg + nvme-tcp leg to site B over the veth       goal: IOPS ratio reported
#   3. mirrored, proxy: the remote leg through nvmirror-netdelay with no delay (the proxy's own cost)
#   4. mirrored, +1 ms: the remote leg through nvmirror-netdelay adding 1 ms each way (RTT 2 ms)
#                       goal: added p50 over run 3 <= RTT + 30 us
# and nvmirror-netdelay --measure: what the proxy itself adds to a 4 KiB round trip on
# loopback beyond its delay (no delay, and 1 ms each way).
#
#   scripts/sites/bench.sh [SECONDS]     (default 10, after a 2 s ramp; LEG=file (default, the
#                                         images in LEG_DIR, default /dev/shm) or mem for the
#                                         legs' kind; BENCH_DIR for the results)
set -euo pipefail
secs=${1:-10}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
. "$(dirname "$0")/lib.sh"
# shellcheck source=scripts/lib/results.sh
. "$SITES_ROOT/scripts/lib/results.sh"
dir=${BENCH_DIR:-$SITES_ROOT/build/bench-sites}
mkdir -p "$dir"
need_tools
command -v jq >/dev/null || { apt-get install -y -qq jq >/dev/null; }
(cd "$SITES_ROOT" && nice cargo build --release -q -p nvmirror-target --bin nvmirror \
    -p nvmirror-bench --bin nvmirror-bench --bin nvmirror-netdelay)

legdir=${LEG_DIR:-/dev/shm}
# leg NAME BYTES: a leg of the chosen kind
leg() {
    case ${LEG:-file} in
    file) echo "file://$legdir/$SITES-$1.img?create=$2" ;;
    mem) echo "mem://$2" ;;
    *) die "LEG must be file or mem" ;;
    esac
}
trap 'sites_down; rm -f "$legdir/$SITES"-*.img' EXIT
sites_up

# run NAME QD REMOTE|- [PROXY ARGS...] -> "iops p50_ns p99_ns"; the JSON in $dir/NAME.json
run() {
    local name=$1 qd=$2 remote=$3
    shift 3
    sites_stop
    rm -rf "${SITES_DIR:?}/a" "${SITES_DIR:?}/b" "$legdir/$SITES"-*.img
    start_b "$(leg b 256MiB)"
    local a_leg
    a_leg=$(leg a "$(b_capacity)")
    if [ "$remote" = - ]; then
        start_a 5s "$a_leg"
    else
        if [ "$remote" = proxy ]; then
            proxy_start "$@"
            remote=$(b_uri "$A_REPL_ADDR:$PROXY_PORT")
        fi
        start_a 5s "$a_leg" "$remote"
    fi
    host_bench --rw randwrite --bs 4k --iodepth "$qd" --size 64MiB --runtime "${secs}s" \
        --time_based --ramp_time 2s --output-format json >"$dir/$name.json"
    jq -r '.jobs[0].write | "\(.iops) \(.lat_ns.percentile["50.000000"]) \(.lat_ns.percentile["99.000000"])"' \
        "$dir/$name.json"
}
calc() { python3 -c "print($1)"; }
show() { echo "  $1: $2 IOPS, p50 $3 ns, p99 $4 ns"; }

echo "== 4 KiB randwrite QD32, host -> site A over veth, ${LEG:-file} legs, ${secs}s"
read -r l_iops l_p50 l_p99 < <(run local 32 -)
show local-only "$l_iops" "$l_p50" "$l_p99"
read -r m_iops m_p50 m_p99 < <(run mirrored 32 "$(b_uri)")
show mirrored "$m_iops" "$m_p50" "$m_p99"
read -r p_iops p_p50 p_p99 < <(run proxy0 32 proxy --delay 0us)
show "mirrored via proxy (0 delay)" "$p_iops" "$p_p50" "$p_p99"
read -r d_iops d_p50 d_p99 < <(run delay1ms 32 proxy --delay 1ms)
show "mirrored via proxy (+1 ms one way)" "$d_iops" "$d_p50" "$d_p99"
echo "== nvmirror-netdelay's own cost: 4 KiB round trips on loopback, direct vs through it"
"$SITES_BIN/nvmirror-netdelay" --measure 5000 --delay 0us | tee "$dir/netdelay-0.txt"
"$SITES_BIN/nvmirror-netdelay" --measure 2000 --delay 1ms | tee "$dir/netdelay-1ms.txt"
added() { sed -n 's/.*added beyond the delay: p50 \(-\{0,1\}[0-9.]*\) us/\1/p' "$1"; }

result "sites QD32: IOPS mirrored/local-only" "$(calc "round($m_iops / $l_iops, 3)")" ">=" -
result "sites QD32: added p50 mirrored vs local-only (us)" "$(calc "round(($m_p50 - $l_p50) / 1000, 1)")" "<=" -
result "sites QD32 +1ms: added p50 vs proxy 0 delay (us)" "$(calc "round(($d_p50 - $p_p50) / 1000, 1)")" "<=" 2030
result "sites QD32 +1ms: added p50 - RTT 2 ms (us)" "$(calc "round(($d_p50 - $p_p50) / 1000 - 2000, 1)")" "<=" 30
result "sites QD32 +1ms: added p50 vs local-only (us)" "$(calc "round(($d_p50 - $l_p50) / 1000, 1)")" "<=" -
result "netdelay, no delay: added p50 per round trip (us)" "$(added "$dir/netdelay-0.txt")" "<=" -
result "netdelay, 1 ms each way: added p50 beyond 2 ms (us)" "$(added "$dir/netdelay-1ms.txt")" "<=" -
