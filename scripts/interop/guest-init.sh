#!/bin/busybox sh
# /init of the interop guest (see kernel-host.sh): bring up the network, connect to the
# nvmirror target on the host as a Linux NVMe/TCP host, verify I/O (or, with
# nvmirror.test=resv on the kernel command line, reservations; with nvmirror.test=ana,
# multipath over two ports and an ANA failover; with nvmirror.test=auth, DH-HMAC-CHAP; with
# nvmirror.test=rpc, a namespace built by RPC across save_config and a restart; with
# nvmirror.test=pair, failover of an active/standby pair of nodes), report, power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t configfs configfs /sys/kernel/config 2>/dev/null
mount -t tmpfs tmpfs /tmp

say() { echo "NVMIRROR-GUEST: $*"; }
fail() {
    say "FAIL: $*"
    dmesg | tail -n 40
    poweroff -f
    sleep 5
}

for m in $(cat /etc/modules-order); do
    if [ -f "/lib/modules/$m.ko" ]; then
        insmod "/lib/modules/$m.ko" || say "insmod $m failed"
    fi
done

PORT=$(sed -n 's/.*nvmirror\.port=\([0-9]*\).*/\1/p' /proc/cmdline)
NQN=$(sed -n 's/.*nvmirror\.nqn=\([^ ]*\).*/\1/p' /proc/cmdline)
TEST=$(sed -n 's/.*nvmirror\.test=\([a-z]*\).*/\1/p' /proc/cmdline)
[ -n "$PORT" ] && [ -n "$NQN" ] || fail "no nvmirror.port/nvmirror.nqn on the kernel command line"

ip link set lo up
ip link set eth0 up || fail "no eth0 (virtio_net not loaded?)"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
HOST=10.0.2.2

say "discover $HOST:$PORT"
nvme discover -t tcp -a "$HOST" -s "$PORT" >/tmp/discover 2>&1 || { cat /tmp/discover; fail "nvme discover"; }
cat /tmp/discover
grep -q "subnqn: *$NQN" /tmp/discover || fail "$NQN not in the discovery log"

# The value of nvmirror.$1= on the kernel command line.
param() {
    sed -n "s/.*nvmirror\.$1=\([^ ]*\).*/\1/p" /proc/cmdline
}
# Waits for the namespace's block device; sets DEV.
wait_dev() {
    DEV=
    for _ in $(seq 40); do
        for d in /sys/block/nvme*n*; do
            [ -e "$d" ] && DEV=/dev/$(basename "$d")
        done
        [ -n "$DEV" ] && [ -b "$DEV" ] && return 0
        sleep 0.25
    done
    return 1
}
# A connect that must be refused ($1 says why it must), leaving no controller behind.
refused() {
    why=$1
    shift
    if nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" "$@" >/tmp/c 2>&1; then
        cat /tmp/c
        fail "connect $why succeeded"
    fi
    cat /tmp/c
    for d in /sys/block/nvme*n*; do
        [ -e "$d" ] && fail "a namespace appeared after the connect $why"
    done
    say "connect $why refused"
}

# DH-HMAC-CHAP as the Linux host runs it: refused with no secret and with a wrong one,
# connected with the right one (host only, then bidirectional), and the host itself refuses a
# controller that cannot prove the controller secret. Exits the guest.
auth_test() {
    SECRET=$(param secret)
    CTRL=$(param ctrl)
    WRONG=$(param wrong)
    [ -n "$SECRET" ] && [ -n "$CTRL" ] && [ -n "$WRONG" ] || fail "no secrets on the kernel command line"
    refused "without a secret"
    refused "with a wrong secret" --dhchap-secret="$WRONG"
    nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" --dhchap-secret="$SECRET" || fail "connect with the host's secret"
    wait_dev || fail "no namespace after the authenticated connect"
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
    dd if=/tmp/pattern of="$DEV" bs=64k oflag=direct conv=fsync 2>/dev/null || fail "write after authenticating"
    dd if="$DEV" of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null || fail "read after authenticating"
    cmp /tmp/pattern /tmp/back || fail "data differs after authenticating"
    say "host-only authentication: connected, 1 MiB written and read back"
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    sleep 1
    nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" --dhchap-secret="$SECRET" --dhchap-ctrl-secret="$CTRL" ||
        fail "connect with both secrets"
    wait_dev || fail "no namespace after the bidirectional connect"
    dd if="$DEV" of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null || fail "read after bidirectional authentication"
    cmp /tmp/pattern /tmp/back || fail "data differs after bidirectional authentication"
    say "bidirectional authentication: connected, data intact"
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    sleep 1
    refused "with a wrong controller secret" --dhchap-secret="$SECRET" --dhchap-ctrl-secret="$WRONG"
    say "PASS"
    poweroff -f
    sleep 5
}
[ "$TEST" = auth ] && auth_test

# A namespace built by RPC, across a save_config and a restart of the target: writes a
# pattern, then waits for the target to go away and come back (the host restarts it from the
# saved configuration meanwhile) and reads the pattern back. Exits the guest.
rpc_test() {
    nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" || fail "connect to the RPC-built subsystem"
    wait_dev || fail "no namespace from the RPC-built subsystem"
    say "RPC-built namespace at $DEV: $(cat /sys/block/$(basename $DEV)/size) sectors"
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
    dd if=/tmp/pattern of="$DEV" bs=64k oflag=direct conv=fsync 2>/dev/null || fail "write to the RPC-built namespace"
    dd if="$DEV" of=/tmp/back bs=64k count=64 iflag=direct 2>/dev/null || fail "read from the RPC-built namespace"
    cmp /tmp/pattern /tmp/back || fail "data differs on the RPC-built namespace"
    echo "NVMIRROR-GUEST: PATTERN-SHA256 $(sha256sum /tmp/pattern | cut -d' ' -f1)"
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    say "RPC-WRITTEN"
    # The host now saves the configuration and restarts the target: see it go, then come back.
    gone=0
    for _ in $(seq 240); do
        if nvme discover -t tcp -a "$HOST" -s "$PORT" >/dev/null 2>&1; then
            [ "$gone" = 1 ] && break
        else
            gone=1
        fi
        sleep 0.5
    done
    [ "$gone" = 1 ] || fail "the target never went away"
    nvme discover -t tcp -a "$HOST" -s "$PORT" >/tmp/discover 2>&1 || fail "the target did not come back"
    grep -q "subnqn: *$NQN" /tmp/discover || { cat /tmp/discover; fail "$NQN not in the discovery log after the restart"; }
    say "target back after the restart; $NQN listed"
    nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" || fail "connect after the restart"
    wait_dev || fail "no namespace after the restart"
    dd if="$DEV" of=/tmp/back bs=64k count=64 iflag=direct 2>/dev/null || fail "read after the restart"
    cmp /tmp/pattern /tmp/back || fail "the pattern did not survive save_config and the restart"
    say "pattern read back after save_config and the restart"
    nvme disconnect -n "$NQN" || fail "nvme disconnect after the restart"
    say "PASS"
    poweroff -f
    sleep 5
}
[ "$TEST" = rpc ] && rpc_test

say "connect $NQN"
# The pair drill's path to A is down while A is away: retry it every second, not every ten.
CONNECT_OPTS=
[ "$TEST" = pair ] && CONNECT_OPTS=--reconnect-delay=1
nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" $CONNECT_OPTS || fail "nvme connect"
DEV=
for _ in $(seq 40); do
    for d in /sys/block/nvme*n*; do
        [ -e "$d" ] && DEV=/dev/$(basename "$d")
    done
    [ -n "$DEV" ] && [ -b "$DEV" ] && break
    sleep 0.25
done
[ -n "$DEV" ] && [ -b "$DEV" ] || fail "no namespace block device appeared"
nvme list
say "namespace at $DEV: $(cat /sys/block/$(basename $DEV)/size) sectors"

# The reservation report as one line of JSON without blanks.
resv_report() {
    nvme resv-report "$DEV" -n 1 --eds -o json >/tmp/report 2>&1 || { cat /tmp/report; fail "nvme resv-report"; }
    tr -d ' \t\r\n' </tmp/report
}
expect_report() {
    r=$(resv_report)
    for want in "$@"; do
        case "$r" in
            *"$want"*) ;;
            *) echo "$r"; fail "resv-report lacks $want" ;;
        esac
    done
    say "resv-report has $*"
}

# Reservations as nvme-cli drives them: register, acquire, report, release, unregister,
# persist through power loss on and off. Exits the guest.
resv_test() {
    KEY=0x1234abcd
    KEYDEC=$((KEY))
    nvme resv-register "$DEV" -n 1 --nrkey=$KEY --rrega=0 || fail "resv-register"
    expect_report '"rtype":0,' '"regctl":1,' "\"rkey\":$KEYDEC"
    nvme resv-acquire "$DEV" -n 1 --crkey=$KEY --rtype=1 --racqa=0 || fail "resv-acquire (write exclusive)"
    expect_report '"rtype":1,' '"rcsts":1,'
    dd if=/dev/urandom of=/tmp/r bs=4k count=4 2>/dev/null
    dd if=/tmp/r of="$DEV" bs=4k count=4 oflag=direct 2>/dev/null || fail "the holder's write"
    dd if="$DEV" of=/tmp/r.back bs=4k count=4 iflag=direct 2>/dev/null || fail "the holder's read"
    cmp /tmp/r /tmp/r.back || fail "data differs under the reservation"
    say "holder I/O ok"
    if nvme resv-acquire "$DEV" -n 1 --crkey=$KEY --rtype=2 --racqa=0 2>/dev/null; then
        fail "acquire of another type while holding one succeeded"
    fi
    if nvme resv-release "$DEV" -n 1 --crkey=0x1 --rtype=1 --rrela=0 2>/dev/null; then
        fail "release with a wrong key succeeded"
    fi
    say "wrong type and wrong key refused"
    nvme resv-acquire "$DEV" -n 1 --crkey=$KEY --prkey=$KEY --rtype=2 --racqa=1 || fail "resv-acquire preempt (own key, exclusive access)"
    expect_report '"rtype":2,' '"gen":2,'
    nvme resv-release "$DEV" -n 1 --crkey=$KEY --rtype=2 --rrela=0 || fail "resv-release"
    expect_report '"rtype":0,' '"regctl":1,'
    nvme resv-register "$DEV" -n 1 --crkey=$KEY --nrkey=$KEY --rrega=2 --cptpl=3 || fail "resv-register replace, PTPL on"
    expect_report '"ptpls":1,'
    nvme resv-register "$DEV" -n 1 --crkey=$KEY --rrega=1 --cptpl=2 || fail "resv-register unregister, PTPL off"
    expect_report '"regctl":0,' '"ptpls":0,'
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    say "PASS"
    poweroff -f
    sleep 5
}
[ "$TEST" = resv ] && resv_test

# The path (controller sysfs directory) connected to port $1.
path_on() {
    for c in /sys/class/nvme/nvme*; do
        case "$(cat "$c/address" 2>/dev/null)" in
            *trsvcid=$1,* | *trsvcid=$1) echo "$c"; return ;;
        esac
    done
}
# Writer rounds done so far (0 while the counter is being rewritten).
rounds() {
    n=$(cat /tmp/w.count 2>/dev/null)
    echo "${n:-0}"
}
# The ANA state of namespace 1 through controller directory $1.
ana_state() {
    cat "$1"/nvme*c*n1/ana_state 2>/dev/null
}

# Connects to the second port ($PORT2, from nvmirror.port2) of the subsystem (native
# multipath must be on) and waits until both paths are up with ANA states $1 and $2 (any
# state when empty); sets P1 and P2 (the paths through $PORT and $PORT2) and DEV (the
# multipath block device).
connect_second_path() {
    PORT2=$(param port2)
    mp=$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null)
    say "nvme_core.multipath=$mp"
    [ "$mp" = Y ] || fail "native NVMe multipath is off in this kernel"
    nvme connect -t tcp -a "$HOST" -s "$PORT2" -n "$NQN" || fail "nvme connect to port $PORT2"
    P1= P2= DEV=
    for _ in $(seq 240); do
        P1=$(path_on "$PORT")
        P2=$(path_on "$PORT2")
        for d in /sys/block/nvme*n*; do
            case "$(basename "$d")" in
                *c*) ;;
                *) DEV=/dev/$(basename "$d") ;;
            esac
        done
        s1=$(ana_state "$P1")
        s2=$(ana_state "$P2")
        [ -n "$P1" ] && [ -n "$P2" ] && [ -n "$s1" ] && [ -n "$s2" ] &&
            { [ -z "$1" ] || [ "$s1" = "$1" ]; } && { [ -z "$2" ] || [ "$s2" = "$2" ]; } && break
        sleep 0.25
    done
    [ -n "$P1" ] && [ -n "$P2" ] || fail "two controllers did not appear"
    [ -b "$DEV" ] || fail "no multipath block device"
    [ "$(ls -d /sys/class/nvme-subsystem/nvme-subsys*/nvme[0-9]* 2>/dev/null | wc -l)" -ge 2 ] ||
        fail "the two controllers are not in one subsystem"
}
# Starts a writer of 2 MiB rounds (O_DIRECT, fsync) of one random pattern to $DEV in the
# background (pid in W), recording failed rounds and each round's start and end; returns once
# it has made progress.
start_writer() {
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=32 2>/dev/null
    rm -f /tmp/stop /tmp/w.fail /tmp/w.count /tmp/w.times
    (
        i=0
        while [ ! -f /tmp/stop ]; do
            t0=$(cut -d' ' -f1 /proc/uptime)
            dd if=/tmp/pattern of="$DEV" bs=64k count=32 oflag=direct conv=fsync 2>>/tmp/w.err ||
                echo "$i" >>/tmp/w.fail
            echo "$t0 $(cut -d' ' -f1 /proc/uptime)" >>/tmp/w.times
            i=$((i + 1))
            echo "$i" >/tmp/w.count
        done
    ) &
    W=$!
    for _ in $(seq 200); do
        [ -s /tmp/w.count ] && break
        sleep 0.1
    done
    [ -s /tmp/w.count ] || fail "the writer made no progress"
}
# Lets the writer do three more rounds after round $1, stops it, and fails on any I/O error or
# on data that does not read back; sets ROUNDS and PAUSE (the longest round, in seconds).
finish_writer() {
    for _ in $(seq 900); do
        [ "$(rounds)" -ge $(($1 + 3)) ] && break
        sleep 0.2
    done
    touch /tmp/stop
    wait "$W"
    ROUNDS=$(rounds)
    [ "$ROUNDS" -ge $(($1 + 3)) ] || fail "the writer stalled after the failover ($ROUNDS rounds)"
    [ ! -s /tmp/w.fail ] || { cat /tmp/w.err; fail "the writer saw I/O errors in rounds $(tr '\n' ' ' </tmp/w.fail)"; }
    dd if="$DEV" of=/tmp/back bs=64k count=32 iflag=direct 2>/dev/null || fail "read after the failover"
    cmp /tmp/pattern /tmp/back || fail "data differs after the failover"
    PAUSE=$(awk '{ d = $2 - $1; if (d > m) m = d } END { print m }' /tmp/w.times)
}

# Native multipath over two ports of one subsystem: both paths and their ANA states, the
# ANA log, then I/O that carries on while the host takes the optimized path away.
ana_test() {
    connect_second_path "" ""
    say "paths $(basename "$P1") $(ana_state "$P1"), $(basename "$P2") $(ana_state "$P2"); head $DEV"
    [ "$(ana_state "$P1")" = optimized ] || fail "port $PORT path not optimized"
    [ "$(ana_state "$P2")" = non-optimized ] || fail "port $PORT2 path not non-optimized"
    nvme list-subsys "$DEV" >/tmp/subsys 2>&1 || { cat /tmp/subsys; fail "nvme list-subsys"; }
    cat /tmp/subsys
    [ "$(grep -c "trsvcid=" /tmp/subsys)" -ge 2 ] || fail "list-subsys does not show two paths"
    grep -q "non-optimized" /tmp/subsys || fail "list-subsys shows no non-optimized path"
    grep -q " optimized" /tmp/subsys || fail "list-subsys shows no optimized path"
    nvme ana-log "/dev/$(basename "$P1")" >/tmp/analog 2>&1 || { cat /tmp/analog; fail "nvme ana-log"; }
    cat /tmp/analog
    grep -q "grpid" /tmp/analog && grep -q "optimized" /tmp/analog || fail "nvme ana-log has no group"
    grep -q "nsid.*:.*1$" /tmp/analog || fail "nvme ana-log does not list namespace 1 in its group"
    say "list-subsys and ana-log ok"

    start_writer
    say "ANA-READY"
    for _ in $(seq 600); do
        [ "$(ana_state "$P1")" = inaccessible ] && break
        sleep 0.2
    done
    [ "$(ana_state "$P1")" = inaccessible ] || { touch /tmp/stop; fail "the path on port $PORT never went inaccessible"; }
    at=$(rounds)
    say "path $(basename "$P1") inaccessible after $at writer rounds; $(basename "$P2") $(ana_state "$P2")"
    finish_writer "$at"
    say "I/O continued on the other path: $ROUNDS rounds, no errors, data intact"
    nvme list-subsys "$DEV" 2>&1 | tee /tmp/subsys
    grep -q "inaccessible" /tmp/subsys || fail "list-subsys does not show the inaccessible path"
    # With no I/O at all, only the asynchronous event can tell this host the path is back.
    say "ANA-RESTORE"
    for _ in $(seq 600); do
        [ "$(ana_state "$P1")" = optimized ] && break
        sleep 0.2
    done
    [ "$(ana_state "$P1")" = optimized ] || fail "no ANA change event: port $PORT never came back optimized"
    say "path $(basename "$P1") optimized again without I/O (ANA change event)"
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    say "PASS"
    poweroff -f
    sleep 5
}
[ "$TEST" = ana ] && ana_test

# An active/standby pair of nvmirror nodes coordinated through etcd: A on $PORT (active,
# optimized), B on $PORT2 (standby, inaccessible), one subsystem, one namespace. While this
# guest writes, the host kills A with SIGKILL; B's controller takes over the key, promotes
# itself and goes optimized, and the writes must carry on through B with no error and every
# block intact. Then, still writing, the host restarts A as B's mirror and B hands the volume
# back (cluster_resign): the writes must carry on through A, again with no error. Last, the
# host cuts A off from etcd only: A stops by its lease and B takes over, with no error either.
# Reports the longest writer round of each (the pause the application saw).
pair_test() {
    connect_second_path optimized inaccessible
    say "paths $(basename "$P1") $(ana_state "$P1") (active), $(basename "$P2") $(ana_state "$P2") (standby); head $DEV"
    [ "$(ana_state "$P1")" = optimized ] || fail "the active node's path is not optimized"
    [ "$(ana_state "$P2")" = inaccessible ] || fail "the standby's path is not inaccessible"
    nvme list-subsys "$DEV" >/tmp/subsys 2>&1 || { cat /tmp/subsys; fail "nvme list-subsys"; }
    cat /tmp/subsys
    [ "$(grep -c "trsvcid=" /tmp/subsys)" -ge 2 ] || fail "list-subsys does not show two paths"
    nvme ana-log "/dev/$(basename "$P2")" >/tmp/analog 2>&1 || { cat /tmp/analog; fail "nvme ana-log on the standby"; }
    grep -q "inaccessible" /tmp/analog || { cat /tmp/analog; fail "the standby's ANA log does not say inaccessible"; }
    say "list-subsys: two paths; ana-log ok"

    start_writer
    say "PAIR-READY"
    for _ in $(seq 900); do
        [ "$(ana_state "$P2")" = optimized ] && break
        sleep 0.2
    done
    [ "$(ana_state "$P2")" = optimized ] || { touch /tmp/stop; fail "the standby never became optimized"; }
    at=$(rounds)
    say "path $(basename "$P2") optimized after $at writer rounds"
    finish_writer "$at"
    say "FAILOVER: $ROUNDS writer rounds, 0 I/O errors, longest round ${PAUSE}s, data intact"
    nvme list-subsys "$DEV" 2>&1 | tee /tmp/subsys
    # Failback while writing through B: the host brings A back as B's mirror and B hands the
    # volume back; the path to A must become optimized again, B's inaccessible.
    start_writer
    say "FAILBACK-READY"
    for _ in $(seq 900); do
        [ "$(ana_state "$P1")" = optimized ] && [ "$(ana_state "$P2")" = inaccessible ] && break
        sleep 0.2
    done
    [ "$(ana_state "$P1")" = optimized ] || { touch /tmp/stop; fail "the path to A never became optimized again"; }
    at=$(rounds)
    say "path $(basename "$P1") optimized again after $at writer rounds"
    finish_writer "$at"
    say "FAILBACK: $ROUNDS writer rounds, 0 I/O errors, longest round ${PAUSE}s, data intact"
    nvme list-subsys "$DEV" 2>&1 | tee /tmp/subsys
    # Partition while writing through A: the host restarts B as a standby, waits for A to
    # resync it, then cuts A off from etcd only. A must go inaccessible by its lease and B take
    # over; the writes carry on through B.
    start_writer
    say "PARTITION-READY"
    for _ in $(seq 1500); do
        [ "$(ana_state "$P2")" = optimized ] && [ "$(ana_state "$P1")" = inaccessible ] && break
        sleep 0.2
    done
    [ "$(ana_state "$P2")" = optimized ] || { touch /tmp/stop; fail "B never took over after the partition"; }
    at=$(rounds)
    say "path $(basename "$P2") optimized after $at writer rounds, $(basename "$P1") $(ana_state "$P1")"
    finish_writer "$at"
    say "PARTITION: $ROUNDS writer rounds, 0 I/O errors, longest round ${PAUSE}s, data intact"
    nvme list-subsys "$DEV" 2>&1 | tee /tmp/subsys
    nvme disconnect -n "$NQN" || fail "nvme disconnect"
    say "PASS"
    poweroff -f
    sleep 5
}
[ "$TEST" = pair ] && pair_test

# 4 MiB of random data, written and read back with O_DIRECT in several block sizes.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
for spec in 4k:1024 64k:64 1M:4; do
    bs=${spec%%:*}
    count=${spec##*:}
    dd if=/tmp/pattern of="$DEV" bs=$bs oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; fail "write bs=$bs"; }
    dd if="$DEV" of=/tmp/back bs=$bs count=$count iflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; fail "read bs=$bs"; }
    cmp /tmp/pattern /tmp/back || fail "data read back differs (bs=$bs)"
    say "write/read/compare bs=$bs ok"
done
# A write at an offset: 8 KiB at 1 MiB + 4 KiB.
dd if=/dev/urandom of=/tmp/small bs=4k count=2 2>/dev/null
dd if=/tmp/small of="$DEV" bs=4k seek=257 count=2 oflag=direct 2>/dev/null || fail "offset write"
dd if="$DEV" of=/tmp/small.back bs=4k skip=257 count=2 iflag=direct 2>/dev/null || fail "offset read"
cmp /tmp/small /tmp/small.back || fail "offset data differs"
nvme flush "$DEV" -n 1 || fail "nvme flush"
if command -v blkdiscard >/dev/null; then
    blkdiscard -o 0 -l 1048576 "$DEV" || fail "blkdiscard"
    dd if="$DEV" of=/tmp/disc bs=64k count=16 iflag=direct 2>/dev/null || fail "read after discard"
    say "discard ok"
fi
nvme disconnect -n "$NQN" || fail "nvme disconnect"
say "disconnect ok"

# Again with header and data digests, and the data written above must still be there.
nvme connect -t tcp -a "$HOST" -s "$PORT" -n "$NQN" --hdr-digest --data-digest || fail "nvme connect with digests"
for _ in $(seq 40); do
    [ -b "$DEV" ] && break
    sleep 0.25
done
[ -b "$DEV" ] || fail "no block device after the digest connect"
dd if="$DEV" of=/tmp/small.back2 bs=4k skip=257 count=2 iflag=direct 2>/dev/null || fail "read with digests"
cmp /tmp/small /tmp/small.back2 || fail "data differs after reconnecting"
dd if=/tmp/pattern of="$DEV" bs=256k oflag=direct 2>/dev/null || fail "write with digests"
dd if="$DEV" of=/tmp/back bs=256k count=16 iflag=direct 2>/dev/null || fail "read with digests"
cmp /tmp/pattern /tmp/back || fail "data differs with digests"
echo "NVMIRROR-GUEST: PATTERN-SHA256 $(sha256sum /tmp/pattern | cut -d' ' -f1)"
say "digests ok"
nvme disconnect -n "$NQN" || fail "nvme disconnect (digests)"
say "PASS"
poweroff -f
sleep 5
