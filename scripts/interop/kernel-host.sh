#!/usr/bin/env bash
# Interop test: a real Linux NVMe/TCP host (Debian's cloud kernel under qemu/TCG) against
# the nvmirror target on this machine.
#
# The target is `nvmirror serve` with its default volume: two sparse 1 GiB image files as
# primary and mirror. The guest runs `nvme discover`, `nvme connect`, writes a random pattern
# with O_DIRECT, reads it back, compares, deallocates and flushes, then disconnects and prints
# the pattern's SHA-256. The script then stops the target cleanly and checks on the host that
# BOTH leg images hold the pattern. Prints PASS or FAIL and exits 0 or 1. Everything it
# downloads is cached under build/interop/.
#
# With --test resv the guest drives NVMe reservations with nvme-cli instead (resv-register,
# resv-acquire, resv-report, resv-release; see docs/reservations.md).
#
# With --test ana the target listens on two ports (PORT optimized, PORT+1 non-optimized) and
# the guest connects to both with native multipath: `nvme list-subsys` must show one
# subsystem with two paths and their ANA states, `nvme ana-log` must parse; then, while the
# guest writes, this script sets PORT inaccessible over RPC, and the guest must see the path
# go inaccessible (the ANA event fired and the log page was read) and its I/O carry on
# through the other path (see docs/ana.md).
#
# With --test auth the subsystem admits only the guest's host NQN, with a DH-HMAC-CHAP host
# secret and controller secret made by `nvme gen-dhchap-key`: the guest must be refused with a
# wrong secret and with none, connect and move data with the right one (host-only, then
# bidirectional), and refuse the controller itself when given a wrong controller secret (see
# docs/auth.md). Debian 12's own kernels are built without NVMe in-band authentication, so
# this test boots the bookworm-backports cloud kernel, fetched through a private apt
# configuration under build/interop/bpo/ (the system's sources are not touched).
#
# With --test rpc the volume, subsystem, namespace and listener the guest uses are built by
# RPC on a running target (volume_create, subsystem_create, namespace_add, listener_add);
# the guest writes a pattern, the script calls save_config, stops the target and starts it
# again from the saved file, and the guest must find the same namespace with its data; at
# the end both of that volume's legs must hold the pattern (docs/operations.md).
#
# With --test pair two nvmirror nodes serve one volume as an active/standby pair coordinated
# through etcd (started here; Debian etcd-server): A on PORT mirrors onto B's raw leg and holds
# the volume's key, B on PORT+1 is a standby (`[cluster]`, docs/pair.md; the binary is built
# with `--features cluster`, which needs protoc). The guest connects to both with native
# multipath (`nvme list-subsys`: two paths, optimized and inaccessible); while it writes, this
# script kills A with SIGKILL, and the guest's writes must carry on through B, once B has
# taken the key and promoted itself, with no I/O error and the data intact. Then failback,
# still under the guest's writes: A restarts in the standby shape (its leg exported raw), B
# resyncs it, `cluster_resign` at B hands the volume back, A promotes itself, the guest's
# writes carry on through A with no I/O error. Last, B (fenced since it resigned) restarts as
# a standby, A resyncs it, and nftables drops A's traffic to etcd (A reaches etcd at 127.0.0.2,
# B at 127.0.0.1): A must go inaccessible by its lease before B is optimized, and the guest's
# writes carry on through B. At the end both sites' copies are byte-identical.
#
# Usage: scripts/interop/kernel-host.sh [--port PORT] [--timeout SECONDS] [--keep] [--test io|resv|ana|auth|rpc|pair]
# Needs root for apt-get (packages: qemu-system-x86 nvme-cli busybox-static cpio).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/build/interop"
PORT=$((20000 + RANDOM % 20000))
TIMEOUT=
KEEP=0
TEST=io
NQN="nqn.2026-11.io.nvmirror:vol0"
HOSTNQN="nqn.2014-08.org.nvmexpress:uuid:6e766d69-7272-6f72-0000-000000000001"

while [ $# -gt 0 ]; do
    case "$1" in
        --port) PORT=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --test) TEST=$2; shift 2 ;;
        *) echo "usage: $0 [--port PORT] [--timeout SECONDS] [--keep] [--test io|resv|ana|auth|rpc|pair]" >&2; exit 2 ;;
    esac
done
case "$TEST" in io|resv|ana|auth|rpc|pair) ;; *) echo "--test: io, resv, ana, auth, rpc or pair, not $TEST" >&2; exit 2 ;; esac
# The pair drill runs three takeovers under the guest's writes.
[ -n "$TIMEOUT" ] || { [ "$TEST" = pair ] && TIMEOUT=720 || TIMEOUT=420; }
PORT2=$((PORT + 1))

log() { echo "kernel-host: $*" >&2; }
fail() {
    log "FAIL: $*"
    echo "FAIL"
    exit 1
}

mkdir -p "$WORK"
cd "$WORK"

# ---- 1. host packages ------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v nvme >/dev/null || need+=(nvme-cli)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq || fail "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; fail "apt-get install ${need[*]}"; }
fi
BUSYBOX=$(command -v busybox)
file "$BUSYBOX" 2>/dev/null | grep -q "statically linked" || {
    ldd "$BUSYBOX" 2>&1 | grep -q "not a dynamic" || fail "busybox at $BUSYBOX is not static (install busybox-static)"
}

# ---- 2. the guest kernel ----------------------------------------------------------------
# Debian's current cloud kernel, or for --test auth the bookworm-backports one.
KDIR="$WORK"
APTCFG=()
if [ "$TEST" = auth ]; then
    KDIR="$WORK/bpo"
    mkdir -p "$KDIR/lists/partial" "$KDIR/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
        >"$KDIR/sources.list"
    APTCFG=(-o "Dir::Etc::SourceList=$KDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$KDIR/lists" -o "Dir::Cache=$KDIR/cache")
fi
if [ ! -f "$KDIR/kver" ]; then
    if [ ${#APTCFG[@]} -gt 0 ]; then
        apt-get "${APTCFG[@]}" update -qq || fail "apt-get update (bookworm-backports)"
    else
        apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
    fi
    KPKG=$(apt-cache "${APTCFG[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | sed -n 1p)
    [ -n "$KPKG" ] || fail "cannot find the current linux-image-*-cloud-amd64 package"
    log "downloading $KPKG"
    rm -f "$KDIR"/linux-image-*.deb
    (cd "$KDIR" && apt-get "${APTCFG[@]}" download "$KPKG" >/dev/null 2>&1) || fail "apt-get download $KPKG"
    rm -rf "$KDIR/kernel"
    dpkg-deb -x "$KDIR"/linux-image-*.deb "$KDIR/kernel" || fail "unpacking $KPKG"
    echo "${KPKG#linux-image-}" >"$KDIR/kver"
fi
KVER=$(cat "$KDIR/kver")
VMLINUZ="$KDIR/kernel/boot/vmlinuz-$KVER"
MODDIR="$KDIR/kernel/lib/modules/$KVER"
[ -f "$VMLINUZ" ] || fail "no kernel image at $VMLINUZ (rm $KDIR/kver to refetch)"
if [ "$TEST" = auth ]; then
    grep -q "^CONFIG_NVME_HOST_AUTH=y" "$KDIR/kernel/boot/config-$KVER" ||
        fail "$KVER is built without CONFIG_NVME_HOST_AUTH"
fi

# ---- 3. the initramfs ----------------------------------------------------------------------
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net configfs nvme-fabrics nvme-tcp"
INITRD="$WORK/initrd-$KVER.gz"
if [ ! -f "$INITRD" ] || [ "$0" -nt "$INITRD" ] || [ "$ROOT/scripts/interop/guest-init.sh" -nt "$INITRD" ]; then
    log "building the initramfs"
    R="$WORK/initramfs"
    rm -rf "$R"
    mkdir -p "$R"/{bin,sbin,etc/nvme,proc,sys,dev,tmp,run,lib/modules,usr/sbin}
    cp "$BUSYBOX" "$R/bin/busybox"
    for m in $MODULES; do
        f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | sed -n 1p)
        if [ -z "$f" ]; then
            f=$(find "$MODDIR" -name "${m//-/_}.ko*" | sed -n 1p)
        fi
        if [ -z "$f" ]; then
            log "module $m not found (built in?)"
            continue
        fi
        case "$f" in
            *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
            *) cp "$f" "$R/lib/modules/$m.ko" ;;
        esac
    done
    NVME=$(command -v nvme)
    cp "$NVME" "$R/usr/sbin/nvme"
    for lib in $(ldd "$NVME" | grep -o '/[^ ]*'); do
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
    echo "$HOSTNQN" >"$R/etc/nvme/hostnqn"
    echo "6e766d69-7272-6f72-0000-000000000001" >"$R/etc/nvme/hostid"
    echo "$MODULES" >"$R/etc/modules-order"
    cp "$ROOT/scripts/interop/guest-init.sh" "$R/init"
    chmod +x "$R/init"
    (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
fi

# ---- 4. the target --------------------------------------------------------------------------
FEATURES=()
if [ "$TEST" = pair ]; then
    if ! command -v etcd >/dev/null || ! command -v protoc >/dev/null \
        || [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
        log "installing etcd-server protobuf-compiler libprotobuf-dev"
        apt-get update -qq || fail "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server protobuf-compiler libprotobuf-dev \
            >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; fail "apt-get install etcd-server protobuf-compiler libprotobuf-dev"; }
    fi
    FEATURES=(--features cluster)
fi
log "building nvmirror ${FEATURES[*]}"
(cd "$ROOT" && cargo build --release -q -p nvmirror-target --bin nvmirror "${FEATURES[@]}") || fail "cargo build of nvmirror"
NVMIRROR="$ROOT/build/release/nvmirror"
DATA="$WORK/data"
rm -rf "$DATA"
TARGET_LOG="$WORK/target.log"
GUEST_LOG="$WORK/guest.log"
rm -f "$GUEST_LOG"
CONFIG=()
if [ "$TEST" = ana ]; then
    # The embedded default's volume and subsystem, with a second, non-optimized listener.
    mkdir -p "$DATA"
    cat >"$DATA/ana.toml" <<EOF
[nvme_tcp]
listen = "127.0.0.1:$PORT"

[[nvme_tcp.listener]]
listen = "127.0.0.1:$PORT2"
ana_state = "non-optimized"

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[[volume]]
name = "vol0"
legs = ["file://@DATA_DIR@/primary.img?create=1GiB", "file://@DATA_DIR@/mirror.img?create=1GiB"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol0"]
EOF
    CONFIG=(--config "$DATA/ana.toml")
fi
B_PID=
ETCD_PID=
NFT_TABLE=
if [ "$TEST" = pair ]; then
    # etcd, then B (its raw leg and the standby volume over it), then A (below, as the target).
    ETCD_PORT=$((PORT + 2))
    ETCD_PEER=$((PORT + 3))
    mkdir -p "$DATA/a" "$DATA/b"
    etcd --name pair --data-dir "$DATA/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT,http://127.0.0.2:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "pair=http://127.0.0.1:$ETCD_PEER" >"$WORK/etcd.log" 2>&1 &
    ETCD_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$ETCD_PORT") 2>/dev/null && break
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$ETCD_PORT") 2>/dev/null || { cat "$WORK/etcd.log" >&2; fail "etcd did not start"; }
    CLUSTER="volume = \"vol0\"
ttl = \"3s\"
margin = \"1s\""
    # A reaches etcd at 127.0.0.2, B at 127.0.0.1: the partition drill drops A's traffic to
    # etcd only (nftables), while the host still reaches A.
    CLUSTER_A="endpoints = [\"http://127.0.0.2:$ETCD_PORT\"]
$CLUSTER"
    CLUSTER="endpoints = [\"http://127.0.0.1:$ETCD_PORT\"]
$CLUSTER"
    cat >"$DATA/b/b.toml" <<EOF
[nvme_tcp]
listen = "127.0.0.1:$PORT2"
cntlid_min = 32768
cntlid_max = 65519

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[cluster]
node = "b"
$CLUSTER

[[volume]]
name = "siteb"
bitmap = false
legs = ["file://@DATA_DIR@/b.img?create=1GiB"]

[[volume]]
name = "vol0"
standby = true
legs = ["nvme-tcp://127.0.0.1:$PORT/nqn.2026-11.io.nvmirror:sitea?kato=2s&reconnect_delay=100ms", "volume://siteb"]

[[subsystem]]
nqn = "nqn.2026-11.io.nvmirror:siteb"
namespaces = ["siteb"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol0"]
EOF
    B_LOG="$WORK/target-b.log"
    rm -f "$B_LOG"
    B_STARTS=0
    # start_b: node B in the background, waits until it serves.
    start_b() {
        RUST_LOG=${RUST_LOG:-info} "$NVMIRROR" serve --config "$WORK/data/b/b.toml" --data-dir "$WORK/data/b" \
            --listen "127.0.0.1:$PORT2" --nbd-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >>"$B_LOG" 2>&1 &
        B_PID=$!
        for _ in $(seq 100); do
            [ "$(grep -c "serving" "$B_LOG" 2>/dev/null)" -gt "$B_STARTS" ] && break
            kill -0 "$B_PID" 2>/dev/null || { cat "$B_LOG" >&2; fail "node B exited at start"; }
            sleep 0.1
        done
        [ "$(grep -c "serving" "$B_LOG" 2>/dev/null)" -gt "$B_STARTS" ] || fail "node B did not start"
        B_STARTS=$(grep -c "serving" "$B_LOG")
    }
    start_b
    B_BYTES=$("$NVMIRROR" rpc --socket "$DATA/b/nvmirror.sock" volume_status '{"name":"siteb"}' |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["capacity_bytes"])') || fail "volume_status of B's raw leg"
    cat >"$DATA/a/a.toml" <<EOF
[nvme_tcp]
listen = "127.0.0.1:$PORT"
cntlid_min = 1
cntlid_max = 32767

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[cluster]
node = "a"
$CLUSTER_A

[[volume]]
name = "vol0"
legs = ["file://@DATA_DIR@/a.img?create=$B_BYTES", "nvme-tcp://127.0.0.1:$PORT2/nqn.2026-11.io.nvmirror:siteb?kato=2s&reconnect_delay=100ms"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol0"]
EOF
    # A after the failover: the pair's standby shape, as B is configured (its leg exported
    # raw where B's leg 0 points, vol0 standby over it and B's raw export).
    cat >"$DATA/a/a-standby.toml" <<EOF
[nvme_tcp]
listen = "127.0.0.1:$PORT"
cntlid_min = 1
cntlid_max = 32767

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[cluster]
node = "a"
$CLUSTER_A

[[volume]]
name = "sitea"
bitmap = false
legs = ["file://@DATA_DIR@/a.img"]

[[volume]]
name = "vol0"
standby = true
legs = ["volume://sitea", "nvme-tcp://127.0.0.1:$PORT2/nqn.2026-11.io.nvmirror:siteb?kato=2s&reconnect_delay=100ms"]

[[subsystem]]
nqn = "nqn.2026-11.io.nvmirror:sitea"
namespaces = ["sitea"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol0"]
EOF
    DATA="$DATA/a"
    CONFIG=(--config "$DATA/a.toml")
fi
APPEND_AUTH=
if [ "$TEST" = auth ]; then
    # The host's secret with the SHA-256 key transform, the controller's with SHA-384, and a
    # third, unrelated one the guest presents as the wrong secret.
    SECRET=$(nvme gen-dhchap-key --key-length=32 --hmac=1 --nqn="$HOSTNQN") || fail "nvme gen-dhchap-key"
    CTRL_SECRET=$(nvme gen-dhchap-key --key-length=48 --hmac=2 --nqn="$NQN") || fail "nvme gen-dhchap-key"
    WRONG_SECRET=$(nvme gen-dhchap-key --key-length=32 --hmac=0 --nqn="$HOSTNQN") || fail "nvme gen-dhchap-key"
    log "host secret $SECRET, controller secret $CTRL_SECRET"
    mkdir -p "$DATA"
    cat >"$DATA/auth.toml" <<EOF
[nvme_tcp]
listen = "127.0.0.1:$PORT"

[rpc]
socket = "@DATA_DIR@/nvmirror.sock"

[[volume]]
name = "vol0"
legs = ["file://@DATA_DIR@/primary.img?create=1GiB", "file://@DATA_DIR@/mirror.img?create=1GiB"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol0"]

[[subsystem.host]]
nqn = "$HOSTNQN"
dhchap_secret = "$SECRET"
dhchap_ctrl_secret = "$CTRL_SECRET"
EOF
    CONFIG=(--config "$DATA/auth.toml")
    APPEND_AUTH="nvmirror.secret=$SECRET nvmirror.ctrl=$CTRL_SECRET nvmirror.wrong=$WRONG_SECRET"
fi
# start_target CONFIG-ARGS...: serve in the background, waits until it serves.
start_target() {
    RUST_LOG=${RUST_LOG:-info} "$NVMIRROR" serve "$@" --data-dir "$DATA" --listen "127.0.0.1:$PORT" \
        --nbd-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >>"$TARGET_LOG" 2>&1 &
    TARGET_PID=$!
    for _ in $(seq 100); do
        [ "$(grep -c "serving" "$TARGET_LOG" 2>/dev/null)" -gt "$STARTS" ] && break
        kill -0 "$TARGET_PID" 2>/dev/null || { cat "$TARGET_LOG" >&2; fail "target exited at start"; }
        sleep 0.1
    done
    [ "$(grep -c "serving" "$TARGET_LOG" 2>/dev/null)" -gt "$STARTS" ] || fail "target did not start listening"
    STARTS=$((STARTS + 1))
}
# stop_target: SIGTERM, and the stop must be clean.
stop_target() {
    kill -TERM "$TARGET_PID"
    wait "$TARGET_PID" 2>/dev/null || true
    TARGET_PID=
    [ "$(grep -c "stopped cleanly" "$TARGET_LOG")" -ge "$STARTS" ] ||
        { tail -n 20 "$TARGET_LOG" >&2; fail "target did not stop cleanly"; }
}
rpc() {
    "$NVMIRROR" rpc --socket "$DATA/nvmirror.sock" "$@"
}
rm -f "$TARGET_LOG"
STARTS=0
QEMU_PID=
TARGET_PID=
cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    [ -n "$TARGET_PID" ] && kill "$TARGET_PID" 2>/dev/null || true
    [ -n "$B_PID" ] && kill "$B_PID" 2>/dev/null || true
    [ -n "$ETCD_PID" ] && kill "$ETCD_PID" 2>/dev/null || true
    [ -n "$NFT_TABLE" ] && nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
start_target "${CONFIG[@]}"
log "nvmirror serve listening on 127.0.0.1:$PORT"
GUEST_PORT=$PORT
GUEST_NQN=$NQN
VOL=vol0
LEGS="primary mirror"
if [ "$TEST" = rpc ]; then
    # Everything the guest will use, built by RPC on the running target.
    GUEST_PORT=$PORT2
    GUEST_NQN="nqn.2026-12.io.nvmirror:rpc"
    VOL=vol1
    LEGS="rpc0 rpc1"
    rpc volume_create "{\"name\":\"$VOL\",\"legs\":[\"file://$DATA/rpc0.img?create=256MiB\",\"file://$DATA/rpc1.img?create=256MiB\"]}" \
        >/dev/null || fail "volume_create"
    rpc subsystem_create "{\"nqn\":\"$GUEST_NQN\"}" >/dev/null || fail "subsystem_create"
    rpc namespace_add "{\"nqn\":\"$GUEST_NQN\",\"volume\":\"$VOL\"}" >/dev/null || fail "namespace_add"
    rpc listener_add "{\"listen\":\"127.0.0.1:$PORT2\"}" >/dev/null || fail "listener_add"
    log "built by RPC: $VOL on $LEGS, $GUEST_NQN, listener 127.0.0.1:$PORT2"
fi

# ---- 5. the guest ---------------------------------------------------------------------------
log "booting $KVER under qemu (timeout ${TIMEOUT}s)"
# The 6.12 kernel's slab allocator uses CMPXCHG16B, which this qemu's multi-threaded TCG
# does not emulate atomically (a double fault at boot): that kernel gets a CPU without it.
CPU=max
[ "$TEST" = auth ] && CPU=max,-cx16
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu "$CPU" -m 1G -smp 2 \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 nvmirror.port=$GUEST_PORT nvmirror.port2=$PORT2 nvmirror.nqn=$GUEST_NQN nvmirror.test=$TEST $APPEND_AUTH" \
    -display none -no-reboot -serial "file:$GUEST_LOG" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= &
QEMU_PID=$!
# Waits for the guest to print MARK, then sets port PORT's group 1 to STATE.
ana_step() {
    while kill -0 "$QEMU_PID" 2>/dev/null && ! grep -q "NVMIRROR-GUEST: $1" "$GUEST_LOG" 2>/dev/null; do
        sleep 0.2
    done
    grep -q "NVMIRROR-GUEST: $1" "$GUEST_LOG" 2>/dev/null || return 0
    log "setting 127.0.0.1:$PORT $2"
    "$NVMIRROR" rpc --socket "$DATA/nvmirror.sock" listener_set_ana_state \
        "{\"listener\":\"127.0.0.1:$PORT\",\"group\":1,\"state\":\"$2\"}" >/dev/null ||
        fail "listener_set_ana_state over RPC"
    "$NVMIRROR" rpc --socket "$DATA/nvmirror.sock" volume_status '{"name":"vol0"}' |
        python3 -c 'import json, sys; print("kernel-host: ana", [(a["listener"], a["state"]) for a in json.load(sys.stdin)["ana"]])' >&2
}
if [ "$TEST" = rpc ]; then
    # Once the guest has written its pattern: save the configuration, stop, start again from
    # the saved file; the volume must come back on the same legs.
    while kill -0 "$QEMU_PID" 2>/dev/null && ! grep -q "NVMIRROR-GUEST: RPC-WRITTEN" "$GUEST_LOG" 2>/dev/null; do
        sleep 0.2
    done
    if grep -q "NVMIRROR-GUEST: RPC-WRITTEN" "$GUEST_LOG" 2>/dev/null; then
        rpc save_config "{\"path\":\"$DATA/saved.toml\"}" >/dev/null || fail "save_config"
        log "save_config wrote $DATA/saved.toml; restarting the target from it"
        stop_target
        sleep 4
        start_target --config "$DATA/saved.toml"
        rpc volume_status "{\"name\":\"$VOL\"}" | python3 -c '
import json, sys
st = json.load(sys.stdin)
names = [l["uri"] for l in st["legs"]]
want = [sys.argv[1] + "/rpc0.img", sys.argv[1] + "/rpc1.img"]
assert all(any(n.startswith("file://" + w) for n in names) for w in want), names
print("kernel-host: after the restart", st["name"], "serves", names)' "$DATA" >&2 ||
            fail "$VOL did not come back on its legs after the restart"
    fi
fi
if [ "$TEST" = ana ]; then
    # With both paths up and I/O running, take the optimized one away; once the guest has
    # stopped its I/O, give it back.
    ana_step ANA-READY inaccessible
    ana_step ANA-RESTORE optimized
fi
if [ "$TEST" = pair ]; then
    # With both paths up and I/O running, kill the active node.
    while kill -0 "$QEMU_PID" 2>/dev/null && ! grep -q "NVMIRROR-GUEST: PAIR-READY" "$GUEST_LOG" 2>/dev/null; do
        sleep 0.2
    done
    if grep -q "NVMIRROR-GUEST: PAIR-READY" "$GUEST_LOG" 2>/dev/null; then
        log "killing the active node A (SIGKILL)"
        kill -KILL "$TARGET_PID"
        wait "$TARGET_PID" 2>/dev/null || true
        TARGET_PID=
        KILLED=$(date +%s.%N)
        for _ in $(seq 600); do
            grep -q "promoted: serving" "$B_LOG" && break
            sleep 0.1
        done
        if grep -q "promoted: serving" "$B_LOG"; then
            log "node B promoted itself $(python3 -c "import time; print(round(time.time() - $KILLED, 2))") s after the kill"
        else
            log "node B has not promoted itself"
        fi
    fi
    # Failback, while the guest writes through B: A comes back in the standby shape, B
    # resyncs A's leg, then B hands the volume back and A promotes itself.
    while kill -0 "$QEMU_PID" 2>/dev/null && ! grep -q "NVMIRROR-GUEST: FAILBACK-READY" "$GUEST_LOG" 2>/dev/null; do
        sleep 0.2
    done
    if grep -q "NVMIRROR-GUEST: FAILBACK-READY" "$GUEST_LOG" 2>/dev/null; then
        log "restarting A in the standby shape"
        start_target --config "$DATA/a-standby.toml"
        b_rpc() { "$NVMIRROR" rpc --socket "$WORK/data/b/nvmirror.sock" "$@"; }
        for _ in $(seq 600); do
            b_rpc volume_status '{"name":"vol0"}' | python3 -c 'import json, sys
s = json.load(sys.stdin)
sys.exit(0 if all(l["state"] in ("in_sync", "removed") for l in s["legs"]) and s["resync"]["state"] != "running" else 1)' && break
            sleep 0.2
        done
        synced=$(b_rpc volume_status '{"name":"vol0"}' | python3 -c 'import json, sys
s = json.load(sys.stdin)
assert all(l["state"] == "in_sync" for l in s["legs"]), [l["state"] for l in s["legs"]]
print(s["resync"]["regions_copied"])') || fail "B did not resync A's leg"
        log "B resynced A's leg ($synced regions copied); cluster_resign at B"
        ASKED=$(date +%s.%N)
        b_rpc cluster_resign '{}' >/dev/null || fail "cluster_resign at B"
        for _ in $(seq 300); do
            grep -q "promoted: serving" "$TARGET_LOG" && break
            sleep 0.1
        done
        grep -q "promoted: serving" "$TARGET_LOG" || fail "A did not take the volume back"
        log "node A promoted itself $(python3 -c "import time; print(round(time.time() - $ASKED, 2))") s after cluster_resign at B"
    fi
    # Partition, while the guest writes through A: B (fenced since it resigned) restarts as a
    # standby; once A has resynced B's copy, A's traffic to etcd is dropped (a black hole, no
    # RST). A must go inaccessible by its lease before B serves: never two writers.
    while kill -0 "$QEMU_PID" 2>/dev/null && ! grep -q "NVMIRROR-GUEST: PARTITION-READY" "$GUEST_LOG" 2>/dev/null; do
        sleep 0.2
    done
    if grep -q "NVMIRROR-GUEST: PARTITION-READY" "$GUEST_LOG" 2>/dev/null; then
        log "restarting B as a standby"
        kill -TERM "$B_PID"
        wait "$B_PID" 2>/dev/null || true
        start_b
        in_sync() {
            "$NVMIRROR" rpc --socket "$1" volume_status '{"name":"vol0"}' | python3 -c 'import json, sys
s = json.load(sys.stdin)
sys.exit(0 if all(l["state"] == "in_sync" for l in s["legs"]) and s["resync"]["state"] != "running" else 1)'
        }
        for _ in $(seq 600); do
            in_sync "$DATA/nvmirror.sock" && break
            sleep 0.2
        done
        in_sync "$DATA/nvmirror.sock" || fail "A did not resync B's copy after B's restart"
        ana_of() {
            "$NVMIRROR" rpc --socket "$1" listener_list '{}' | python3 -c 'import json, sys
l = json.load(sys.stdin)
print(next((a["state"] for a in l["ana"] if a["nqn"] == sys.argv[1]), "none"))' "$NQN"
        }
        [ "$(ana_of "$WORK/data/b/nvmirror.sock")" = inaccessible ] || fail "B is not a standby after its restart"
        nft add table inet nvmirror_pair &&
            nft add chain inet nvmirror_pair out '{ type filter hook output priority 0; }' &&
            nft add rule inet nvmirror_pair out ip daddr 127.0.0.2 tcp dport "$ETCD_PORT" drop ||
            fail "nft: cannot cut A from etcd"
        NFT_TABLE=nvmirror_pair
        CUT=$(date +%s.%N)
        log "A cut off from etcd (nftables drop to 127.0.0.2:$ETCD_PORT)"
        A_OFF= B_ON=
        for _ in $(seq 600); do
            now=$(date +%s.%N)
            [ -z "$A_OFF" ] && [ "$(ana_of "$DATA/nvmirror.sock")" = inaccessible ] && A_OFF=$now
            [ "$(ana_of "$WORK/data/b/nvmirror.sock")" = optimized ] && { B_ON=$(date +%s.%N); break; }
            sleep 0.05
        done
        [ -n "$B_ON" ] || fail "B did not take over after A was cut off from etcd"
        [ -n "$A_OFF" ] || fail "B serves while A's path is not inaccessible: two writers"
        log "partition: A inaccessible $(python3 -c "print(round($A_OFF - $CUT, 2))") s after the cut, B optimized $(python3 -c "print(round($B_ON - $CUT, 2))") s after it"
        python3 -c "import sys; sys.exit(0 if $A_OFF < $B_ON else 1)" || fail "A went inaccessible only after B served"
        "$NVMIRROR" rpc --socket "$DATA/nvmirror.sock" volume_status '{"name":"vol0"}' |
            python3 -c 'import json, sys; s = json.load(sys.stdin); print("kernel-host: A fenced:", s["fenced"], file=sys.stderr); assert "lease" in (s["fenced"] or "")' ||
            fail "A was not stopped by its lease"
    fi
fi
set +e
wait "$QEMU_PID"
QEMU_RC=$?
set -e
QEMU_PID=

if grep -q "NVMIRROR-GUEST: PASS" "$GUEST_LOG" 2>/dev/null; then
    [ "$KEEP" = 1 ] && { log "guest log:"; cat "$GUEST_LOG" >&2; }
    log "guest passed (target log: $TARGET_LOG)"
    if [ "$TEST" = pair ]; then
        grep -E "NVMIRROR-GUEST: (FAILOVER|FAILBACK|PARTITION)" "$GUEST_LOG" >&2 || true
        st=$("$NVMIRROR" rpc --socket "$WORK/data/b/nvmirror.sock" volume_status '{"name":"vol0"}') ||
            fail "volume_status on B after the partition"
        offset=$(echo "$st" | python3 -c 'import json, sys
s = json.load(sys.stdin)
print("kernel-host: B serves vol0 at epoch", s["epoch"], "fenced:", s["fenced"], "legs:", [l["state"] for l in s["legs"]], file=sys.stderr)
assert s["epoch"] >= 3 and s["fenced"] is None
assert all(l["state"] == "in_sync" for l in s["legs"]), s["legs"]
print(s["bitmap"]["data_offset"])') || fail "B does not serve the volume at a new epoch with both legs in sync"
        # The guest is gone: nothing writes. Both sites' data areas must be byte-identical.
        cmp -i "$offset" "$DATA/a.img" "$WORK/data/b/b.img" >&2 || fail "the two sites' copies differ"
        log "a.img and b.img are byte-identical past byte $offset"
        kill -TERM "$B_PID"
        wait "$B_PID" 2>/dev/null || true
        B_PID=
        echo "PASS"
        exit 0
    fi
    if [ "$TEST" != io ] && [ "$TEST" != rpc ]; then
        stop_target
        echo "PASS"
        exit 0
    fi
    # ---- 6. both legs hold what the guest wrote ------------------------------------------
    want=$(sed -n 's/.*NVMIRROR-GUEST: PATTERN-SHA256 \([0-9a-f]*\).*/\1/p' "$GUEST_LOG" | sed -n 1p)
    [ -n "$want" ] || fail "the guest did not report its pattern's checksum"
    # The exported namespace starts after each leg's metadata area (superblock + bitmap).
    offset=$(rpc volume_status "{\"name\":\"$VOL\"}" |
        python3 -c 'import json, sys; b = json.load(sys.stdin)["bitmap"]; print(b["data_offset"] if b else 0)') ||
        fail "volume_status over RPC"
    stop_target
    for leg in $LEGS; do
        got=$(dd if="$DATA/$leg.img" iflag=skip_bytes,count_bytes skip="$offset" count=4194304 \
            status=none | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "leg $leg.img does not hold the guest's pattern ($got != $want)"
        log "leg $leg.img holds the guest's pattern at byte $offset"
    done
    echo "PASS"
    exit 0
fi
log "---- guest log ----"
cat "$GUEST_LOG" >&2 2>/dev/null || true
log "---- target log ----"
tail -n 50 "$TARGET_LOG" >&2 || true
[ "$QEMU_RC" = 124 ] && fail "guest timed out after ${TIMEOUT}s"
reason=$(sed -n 's/.*NVMIRROR-GUEST: FAIL: //p' "$GUEST_LOG" | sed -n 1p)
fail "${reason:-guest did not report a result (qemu exit $QEMU_RC)}"
