# shellcheck shell=bash
# The two-site rig for a person at a shell (docs/sites.md): the same namespaces, addresses and
# faults as the Rust rig of the site drills (target/tests/sites/mod.rs).
#
#   host ns ($SITES-h) 10.77.1.1 --veth ha/ah-- 10.77.1.2 site A ($SITES-a) 10.77.2.1 --veth ab/ba-- 10.77.2.2 site B ($SITES-b)
#
# Sourced by scripts/sites/sites.sh and scripts/sites/bench.sh. Needs root, iproute2 and, for
# the black hole, nftables.

SITES=${SITES:-nvm-sites}
SITES_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SITES_DIR=${SITES_DIR:-$SITES_ROOT/build/sites}
SITES_BIN=${CARGO_TARGET_DIR:-$SITES_ROOT/build}/release
HOST_ADDR=10.77.1.1
A_HOST_ADDR=10.77.1.2
A_REPL_ADDR=10.77.2.1
B_ADDR=10.77.2.2
PORT=4420
PROXY_PORT=14420
NQN_A=nqn.2026-11.io.nvmirror:vol0
NQN_B=nqn.2026-11.io.nvmirror:siteb
BLACKHOLE_TABLE=nvmirror_drill

die() { echo "sites: $*" >&2; exit 2; }

# need_tools: iproute2 (and nftables) installed, from apt when missing.
need_tools() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, veth, nftables)"
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ns() { echo "$SITES-$1"; }   # ns h|a|b

sites_up() {
    sites_down 2>/dev/null || true
    local s
    for s in h a b; do
        ip netns add "$(ns $s)"
        ip -n "$(ns $s)" link set lo up
    done
    ip link add ha netns "$(ns h)" type veth peer name ah netns "$(ns a)"
    ip link add ab netns "$(ns a)" type veth peer name ba netns "$(ns b)"
    ip -n "$(ns h)" addr add $HOST_ADDR/24 dev ha
    ip -n "$(ns a)" addr add $A_HOST_ADDR/24 dev ah
    ip -n "$(ns a)" addr add $A_REPL_ADDR/24 dev ab
    ip -n "$(ns b)" addr add $B_ADDR/24 dev ba
    for pair in "h ha" "a ah" "a ab" "b ba"; do
        set -- $pair
        ip -n "$(ns "$1")" link set "$2" up
    done
    mkdir -p "$SITES_DIR"
}

sites_down() {
    sites_stop
    local s
    for s in h a b; do
        ip netns del "$(ns $s)" 2>/dev/null || true
    done
}

# serve SITE LISTEN CONFIG: nvmirror serve in SITE's namespace, its pid in $SITES_DIR/SITE.pid.
serve() {
    local site=$1 listen=$2 cfg=$3 d=$SITES_DIR/$1
    mkdir -p "$d"
    printf '%s\n' "$cfg" >"$d/nvmirror.toml"
    : >"$d/serve.log"
    ip netns exec "$(ns "$site")" "$SITES_BIN/nvmirror" serve --config "$d/nvmirror.toml" \
        --data-dir "$d" --listen "$listen" --nbd-listen 127.0.0.1:10809 \
        --metrics-listen 127.0.0.1:9420 >"$d/serve.log" 2>&1 &
    echo $! >"$SITES_DIR/$site.pid"
    local i
    for i in $(seq 200); do
        grep -q '^RPC ' "$d/serve.log" && return 0
        kill -0 "$(cat "$SITES_DIR/$site.pid")" 2>/dev/null || break
        sleep 0.1
    done
    cat "$d/serve.log" >&2
    die "site $site: nvmirror serve did not start"
}

# start_b LEG: site B exporting LEG (default a 64 MiB file leg) as $NQN_B.
start_b() {
    local leg=${1:-"file://@DATA_DIR@/local.img?create=64MiB"}
    serve b "$B_ADDR:$PORT" "[rpc]
socket = \"@DATA_DIR@/nvmirror.sock\"

[[volume]]
name = \"vol0\"
legs = [\"$leg\"]

[[subsystem]]
nqn = \"$NQN_B\"
namespaces = [\"vol0\"]"
}

# start_a IO_TIMEOUT LEG...: site A's volume over LEG... exported as $NQN_A to the host.
start_a() {
    local timeout=$1 legs="" l
    shift
    for l in "$@"; do legs="$legs${legs:+, }\"$l\""; done
    serve a "$A_HOST_ADDR:$PORT" "[rpc]
socket = \"@DATA_DIR@/nvmirror.sock\"

[[volume]]
name = \"vol0\"
io_timeout = \"$timeout\"
legs = [$legs]

[[subsystem]]
nqn = \"$NQN_A\"
namespaces = [\"vol0\"]"
}

# b_uri [VIA]: site B's export as A sees it, directly or through a proxy at VIA.
b_uri() { echo "nvme-tcp://${1:-$B_ADDR:$PORT}/$NQN_B"; }
a_uri() { echo "nvme-tcp://$A_HOST_ADDR:$PORT/$NQN_A"; }

# proxy_start ARGS...: nvmirror-netdelay in A, from $A_REPL_ADDR:$PROXY_PORT to B.
proxy_start() {
    ip netns exec "$(ns a)" "$SITES_BIN/nvmirror-netdelay" --listen "$A_REPL_ADDR:$PROXY_PORT" \
        --connect "$B_ADDR:$PORT" "$@" >"$SITES_DIR/netdelay.log" 2>&1 &
    echo $! >"$SITES_DIR/proxy.pid"
    local i
    for i in $(seq 100); do
        grep -q 'listening on' "$SITES_DIR/netdelay.log" && return 0
        sleep 0.05
    done
    die "nvmirror-netdelay did not start: $(cat "$SITES_DIR/netdelay.log")"
}

# stop_one NAME: SIGTERM the process in $SITES_DIR/NAME.pid and wait for it.
stop_one() {
    local f=$SITES_DIR/$1.pid pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    rm -f "$f"
    kill "$pid" 2>/dev/null || return 0
    local i
    for i in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

sites_stop() {
    stop_one a
    stop_one proxy
    stop_one b
}

site_rpc() {   # site_rpc SITE METHOD [PARAMS]
    local site=$1
    shift
    "$SITES_BIN/nvmirror" rpc --socket "$SITES_DIR/$site/nvmirror.sock" "$@"
}

link_cut() { ip -n "$(ns a)" link set ab down; }
link_restore() { ip -n "$(ns a)" link set ab up; }

blackhole() {
    ip netns exec "$(ns a)" nft -f - <<NFT
table inet $BLACKHOLE_TABLE {
    chain input { type filter hook input priority -10; policy accept; ip saddr $B_ADDR drop; }
    chain output { type filter hook output priority -10; policy accept; ip daddr $B_ADDR drop; }
}
NFT
}
heal() { ip netns exec "$(ns a)" nft delete table inet $BLACKHOLE_TABLE; }

# host_bench ARGS...: nvmirror-bench in the host namespace against site A.
host_bench() { ip netns exec "$(ns h)" "$SITES_BIN/nvmirror-bench" --target "$(a_uri)" "$@"; }

# b_capacity: bytes of site B's export (site A's local leg must be this size).
b_capacity() {
    site_rpc b volume_status '{"name":"vol0"}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["capacity_bytes"])'
}
