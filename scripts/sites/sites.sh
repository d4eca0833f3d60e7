#!/usr/bin/env bash
# Two sites and a host in network namespaces, by hand (docs/sites.md):
#
#   scripts/sites/sites.sh up                     namespaces nvm-sites-{h,a,b}, veth pairs, addresses
#   scripts/sites/sites.sh start [DELAY]          site B (file leg exported over NVMe/TCP), site A
#                                                 (local file leg + nvme-tcp leg to B, io_timeout
#                                                 $IO_TIMEOUT, default 2s); with DELAY (e.g. 1ms)
#                                                 A's leg goes through nvmirror-netdelay adding
#                                                 DELAY one way in each direction
#   scripts/sites/sites.sh writer [SECONDS]       verifying writer on the host against A
#                                                 (nvmirror-bench --verify crc32c, 4 KiB QD32)
#   scripts/sites/sites.sh cut | restore          ip link set down / up on A's interface to B
#   scripts/sites/sites.sh blackhole | heal       nftables drop of A<->B traffic (no RST) / remove it
#   scripts/sites/sites.sh rejoin                 leg_attach the remote leg until accepted, wait in sync
#   scripts/sites/sites.sh status [a|b]           volume_status
#   scripts/sites/sites.sh rpc a|b METHOD [JSON]  any RPC
#   scripts/sites/sites.sh exec h|a|b CMD...      a command inside a namespace
#   scripts/sites/sites.sh stop | down            stop the servers / and delete the namespaces
#
# SITES (namespace prefix, default nvm-sites) and SITES_DIR (default build/sites) choose where.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

cmd=${1:-}
shift || true
case $cmd in
up)
    need_tools
    sites_up
    echo "up: $(ns h) $HOST_ADDR | $(ns a) $A_HOST_ADDR, $A_REPL_ADDR | $(ns b) $B_ADDR"
    ;;
start)
    (cd "$SITES_ROOT" && nice cargo build --release -q -p nvmirror-target --bin nvmirror \
        -p nvmirror-bench --bin nvmirror-bench --bin nvmirror-netdelay)
    start_b
    remote=$(b_uri)
    if [ -n "${1:-}" ]; then
        proxy_start --delay "$1"
        remote=$(b_uri "$A_REPL_ADDR:$PROXY_PORT")
    fi
    start_a "${IO_TIMEOUT:-2s}" "file://@DATA_DIR@/local.img?create=$(b_capacity)" "$remote"
    echo "site B: $(b_uri) (log $SITES_DIR/b/serve.log)"
    echo "site A: $(a_uri), legs local + $remote (log $SITES_DIR/a/serve.log)"
    ;;
writer)
    secs=${1:-30}
    host_bench --rw randwrite --bs 4k --iodepth 32 --size 16MiB --runtime "${secs}s" \
        --time_based --verify crc32c
    ;;
cut) link_cut ;;
restore) link_restore ;;
blackhole) blackhole ;;
heal) heal ;;
rejoin)
    until site_rpc a leg_attach '{"volume":"vol0","leg":1}' >/dev/null 2>"$SITES_DIR/attach.err"; do
        echo "waiting: $(cat "$SITES_DIR/attach.err")"
        sleep 1
    done
    until site_rpc a volume_status '{"name":"vol0"}' | python3 -c '
import json, sys
st = json.load(sys.stdin)
sys.exit(0 if all(l["state"] in ("in_sync", "removed") for l in st["legs"]) and st["resync"]["state"] != "running" else 1)'; do
        sleep 0.5
    done
    echo "rejoined: legs in sync"
    ;;
status) site_rpc "${1:-a}" volume_status '{"name":"vol0"}' ;;
rpc) site_rpc "$@" ;;
exec)
    site=$1
    shift
    ip netns exec "$(ns "$site")" "$@"
    ;;
stop) sites_stop ;;
down) sites_down ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
