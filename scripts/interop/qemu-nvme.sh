#!/usr/bin/env bash
# Interop test of the userspace PCIe driver (`pcie://`) against an independent controller:
# QEMU's emulated NVMe (hw/nvme), inside a Debian cloud kernel booted under qemu/TCG with an
# emulated Intel IOMMU.
#
# The guest gets two emulated NVMe controllers. The first stays on the kernel's nvme driver;
# the second is unbound from it and bound to vfio-pci, 2 MiB hugepages are reserved, and
# `nvmirror-bench` drives it through `pcie://BDF?nsid=1` with verifying workloads: 4 KiB
# random writes and reads at queue depth 16 (crc32c verify), then 256 KiB sequential
# writes and reads (PRP lists and a split at the 128 KiB transfer limit). Then a mirrored
# volume across both back ends (`--leg pcie://BDF --leg nvme-ng:///dev/ng0n1`, the first
# controller through the kernel's passthrough) takes verifying writes, the second controller
# is given back to the kernel's nvme driver, and the kernel's reads of both namespaces must
# be byte-identical. Prints PASS or FAIL and exits 0 or 1. Downloads (the kernel package) are cached under build/interop-pcie/.
#
# With --test ng the guest instead keeps one emulated controller on the kernel's nvme driver
# and tests the io_uring passthrough back end (`nvme-ng:///dev/ng0n1`): the nvmirror-nvme
# unit-test binary runs its `backend::ng` tests on the namespace (NVMIRROR_NG_DEVICE, the
# conformance model included), `nvmirror-bench` runs verifying workloads through it, and
# 4 KiB random reads at queue depth 16 are timed through `nvme-ng:///dev/ng0n1` and through
# the io_uring block back end (`file:///dev/nvme0n1`) on the same namespace; both IOPS
# lines are printed (under TCG they compare the two paths, not the hardware).
#
# Usage: scripts/interop/qemu-nvme.sh [--test pcie|ng] [--timeout SECONDS] [--keep]
#   KERNEL_DIR=DIR  use an unpacked linux-image-*-cloud-amd64 (boot/ and lib/modules/)
#                   instead of downloading one.
# Needs: qemu-system-x86_64, a static busybox, cpio, xz (and apt-get to fetch the kernel).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/build/interop-pcie"
TIMEOUT=900
KEEP=0
TEST=pcie
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --test) TEST=$2; shift 2 ;;
        *) echo "usage: $0 [--test pcie|ng] [--timeout SECONDS] [--keep]" >&2; exit 2 ;;
    esac
done
case "$TEST" in pcie | ng) ;; *) echo "--test takes pcie or ng" >&2; exit 2 ;; esac

log() { echo "qemu-nvme: $*" >&2; }
fail() {
    log "FAIL: $*"
    echo "FAIL"
    exit 1
}

mkdir -p "$WORK"
cd "$WORK"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
command -v cpio >/dev/null || fail "cpio not installed"
BUSYBOX=$(command -v busybox) || fail "busybox not installed (apt-get install busybox-static)"

# ---- 1. the guest kernel ----------------------------------------------------------------
if [ -z "${KERNEL_DIR:-}" ]; then
    KERNEL_DIR="$WORK/kernel"
    if [ ! -d "$KERNEL_DIR/boot" ]; then
        apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
        KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | sed -n 1p)
        [ -n "$KPKG" ] || fail "cannot find the current linux-image-*-cloud-amd64 package"
        log "downloading $KPKG"
        rm -f linux-image-*.deb
        apt-get download "$KPKG" >/dev/null 2>&1 || fail "apt-get download $KPKG"
        dpkg-deb -x linux-image-*.deb "$KERNEL_DIR" || fail "unpacking $KPKG"
    fi
fi
VMLINUZ=$(ls "$KERNEL_DIR"/boot/vmlinuz-* | sed -n 1p)
[ -f "$VMLINUZ" ] || fail "no kernel image under $KERNEL_DIR/boot"
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$KERNEL_DIR/lib/modules/$KVER"

# ---- 2. nvmirror-bench --------------------------------------------------------------------
log "building nvmirror-bench"
(cd "$ROOT" && cargo build --release -q -p nvmirror-bench --bin nvmirror-bench) || fail "cargo build of nvmirror-bench"
BENCH="$ROOT/build/release/nvmirror-bench"
if [ "$TEST" = ng ]; then
    log "building the nvmirror-nvme unit tests"
    UNIT=$(cd "$ROOT" && cargo test --workspace --release --lib --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"target":{[^}]*"name":"nvmirror_nvme".*"executable":"\([^"]*\)".*/\1/p' | sed -n 1p)
    [ -x "$UNIT" ] || fail "cargo test --no-run of nvmirror-nvme"
fi

# ---- 3. the initramfs ----------------------------------------------------------------------
# A name ending in ? is optional: newer 6.1 kernels build vfio_virqfd as its own module, older
# ones have it inside vfio.
MODULES="irqbypass vfio vfio_virqfd? vfio_iommu_type1 vfio-pci-core vfio-pci"
[ "$TEST" = ng ] && MODULES="" # nvme is built into the cloud kernel
R="$WORK/initramfs"
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib/modules,usr/bin}
cp "$BUSYBOX" "$R/bin/busybox"
LOADED=
for m in $MODULES; do
    optional=0
    case "$m" in *\?) optional=1; m=${m%\?} ;; esac
    f=$(find "$MODDIR" -name "$m.ko*" | sed -n 1p)
    if [ -z "$f" ]; then
        [ "$optional" = 1 ] && continue
        fail "module $m not in $MODDIR"
    fi
    LOADED="$LOADED $m"
    case "$f" in
        *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
        *) cp "$f" "$R/lib/modules/$m.ko" ;;
    esac
done
echo "$LOADED" >"$R/etc/modules-order"
cp "$BENCH" "$R/usr/bin/nvmirror-bench"
[ "$TEST" = ng ] && cp "$UNIT" "$R/usr/bin/nvmirror-nvme-tests"
for lib in $(ldd "$BENCH" ${UNIT:-} | grep -v ':$' | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
if [ "$TEST" = pcie ]; then
cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "NVMIRROR-GUEST: $*"; }
fail() { say "FAIL: $*"; dmesg | tail -n 30; poweroff -f; sleep 5; }
for m in $(cat /etc/modules-order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
# NVMe controllers: PCI class 0x010802.
set -- $(for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class")" = 0x010802 ] && basename "$d"; done | sort)
[ $# -ge 2 ] || fail "expected two NVMe controllers, found: $*"
KEEP_BDF=$1
BDF=$2
say "kernel keeps $KEEP_BDF; $BDF goes to vfio-pci (IOMMU group $(basename "$(readlink "/sys/bus/pci/devices/$BDF/iommu_group")"))"
[ -e "/sys/bus/pci/devices/$BDF/iommu_group" ] || fail "no IOMMU group for $BDF (intel_iommu=on?)"
[ -e "/sys/bus/pci/devices/$BDF/driver" ] && echo "$BDF" >"/sys/bus/pci/devices/$BDF/driver/unbind"
echo vfio-pci >"/sys/bus/pci/devices/$BDF/driver_override"
echo "$BDF" >/sys/bus/pci/drivers_probe
[ "$(basename "$(readlink "/sys/bus/pci/devices/$BDF/driver")")" = vfio-pci ] || fail "$BDF not bound to vfio-pci"
echo 64 >/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
say "hugepages: $(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
URI="pcie://$BDF?nsid=1&timeout=20s"
run() {
    say "nvmirror-bench $*"
    RUST_LOG=warn nvmirror-bench --target "$URI" "$@" >/tmp/out 2>&1
    rc=$?
    cat /tmp/out
    [ $rc = 0 ] || fail "nvmirror-bench $* exited $rc"
}
run --rw randwrite --bs 4k --iodepth 16 --size 16MiB --io_size 4MiB --verify crc32c
run --rw randread --bs 4k --iodepth 16 --size 16MiB --io_size 4MiB
say "IOPS pcie://$BDF: $(grep -io 'iops[=: ]*[0-9.]*[kM]*' /tmp/out | sed -n 1p)"
run --rw write --bs 256k --iodepth 4 --size 16MiB --verify crc32c
run --rw read --bs 256k --iodepth 4 --size 16MiB
# A mirrored volume across the two back ends: pcie:// on this controller, nvme-ng:// on the
# one the kernel kept. A sequential pass covers the first 16 MiB of both legs, then random
# writes on top, every block verified; then the controller goes back to the kernel's nvme
# driver and the kernel reads both namespaces: they must be byte-identical.
for i in $(seq 50); do [ -c /dev/ng0n1 ] && break; sleep 0.2; done
[ -c /dev/ng0n1 ] || fail "no /dev/ng0n1 on $KEEP_BDF"
MIRROR="--leg $URI --leg nvme-ng:///dev/ng0n1"
run_mirror() {
    say "nvmirror-bench $MIRROR $*"
    RUST_LOG=warn nvmirror-bench $MIRROR "$@" >/tmp/out 2>&1
    rc=$?
    cat /tmp/out
    [ $rc = 0 ] || fail "mirrored nvmirror-bench $* exited $rc"
}
run_mirror --rw write --bs 256k --iodepth 4 --size 16MiB --verify crc32c
run_mirror --rw randwrite --bs 4k --iodepth 16 --size 16MiB --io_size 4MiB --verify crc32c
echo "$BDF" >"/sys/bus/pci/devices/$BDF/driver/unbind"
echo >"/sys/bus/pci/devices/$BDF/driver_override"
echo "$BDF" >/sys/bus/pci/drivers/nvme/bind || fail "binding $BDF back to the nvme driver"
for i in $(seq 100); do [ -b /dev/nvme1n1 ] && break; sleep 0.2; done
[ -b /dev/nvme1n1 ] || fail "no /dev/nvme1n1 after giving $BDF back to the kernel"
cmp -n 16777216 /dev/nvme0n1 /dev/nvme1n1 || fail "the mirrored legs differ"
say "mirror pcie:// + nvme-ng://: legs byte-identical over 16 MiB (read by the kernel)"
# The same random reads through the kernel's block layer (io_uring) on the kept controller,
# the same emulated model: under TCG a correctness comparison, recorded anyway.
say "nvmirror-bench --target file:///dev/nvme0n1 --rw randread --bs 4k --iodepth 16"
RUST_LOG=warn nvmirror-bench --target file:///dev/nvme0n1 --rw randread --bs 4k --iodepth 16 \
    --size 16MiB --io_size 4MiB >/tmp/out 2>&1 || { cat /tmp/out; fail "bench on /dev/nvme0n1"; }
say "IOPS file:///dev/nvme0n1: $(grep -io 'iops[=: ]*[0-9.]*[kM]*' /tmp/out | sed -n 1p)"
say "PASS"
poweroff -f
INIT
else
cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "NVMIRROR-GUEST: $*"; }
fail() { say "FAIL: $*"; dmesg | tail -n 30; poweroff -f; sleep 5; }
for i in $(seq 50); do [ -c /dev/ng0n1 ] && [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
[ -c /dev/ng0n1 ] || fail "no /dev/ng0n1 (devices: $(ls /dev | tr '\n' ' '))"
say "kernel $(uname -r); $(ls -l /dev/ng0n1)"
say "nvmirror-nvme-tests backend::ng on /dev/ng0n1"
NVMIRROR_NG_DEVICE=/dev/ng0n1 nvmirror-nvme-tests backend::ng --test-threads=1 >/tmp/out 2>&1
rc=$?
cat /tmp/out
[ $rc = 0 ] || fail "backend::ng tests exited $rc"
grep -q "device_matches_a_model ... ok" /tmp/out || fail "the device model test did not run"
run() {
    uri=$1
    shift
    say "nvmirror-bench --target $uri $*"
    RUST_LOG=warn nvmirror-bench --target "$uri" "$@" >/tmp/out 2>&1
    rc=$?
    cat /tmp/out
    [ $rc = 0 ] || fail "nvmirror-bench --target $uri $* exited $rc"
}
NG=nvme-ng:///dev/ng0n1
run $NG --rw randwrite --bs 4k --iodepth 16 --size 16MiB --io_size 4MiB --verify crc32c
run $NG --rw write --bs 1MiB --iodepth 4 --size 16MiB --verify crc32c
run $NG --rw read --bs 1MiB --iodepth 4 --size 16MiB
for uri in $NG file:///dev/nvme0n1; do
    run $uri --rw randread --bs 4k --iodepth 16 --size 16MiB --io_size 8MiB
    say "IOPS $uri: $(grep -io 'iops[=: ]*[0-9.]*[kM]*' /tmp/out | sed -n 1p)"
done
say "PASS"
poweroff -f
INIT
fi
chmod +x "$R/init"
INITRD="$WORK/initrd.gz"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD"

# ---- 4. the guest ---------------------------------------------------------------------------
for i in 0 1; do
    rm -f "$WORK/nvme$i.img"
    truncate -s 64M "$WORK/nvme$i.img"
done
GUEST_LOG="$WORK/guest-$TEST.log"
rm -f "$GUEST_LOG"
set +e
if [ "$TEST" = ng ]; then
log "booting $KVER under qemu with one NVMe controller on the kernel driver (timeout ${TIMEOUT}s)"
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1G -smp 2 \
    -machine q35 -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1" \
    -display none -no-reboot -serial "file:$GUEST_LOG" -net none \
    -drive "file=$WORK/nvme0.img,if=none,id=d0,format=raw,discard=unmap" -device nvme,serial=nvmirror0,drive=d0
else
log "booting $KVER under qemu with an emulated IOMMU and two NVMe controllers (timeout ${TIMEOUT}s)"
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1G -smp 2 \
    -machine q35 -device intel-iommu,aw-bits=48 \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on" \
    -display none -no-reboot -serial "file:$GUEST_LOG" -net none \
    -drive "file=$WORK/nvme0.img,if=none,id=d0,format=raw" -device nvme,serial=nvmirror0,drive=d0 \
    -drive "file=$WORK/nvme1.img,if=none,id=d1,format=raw" -device nvme,serial=nvmirror1,drive=d1
fi
QEMU_RC=$?
set -e
if grep -q "NVMIRROR-GUEST: PASS" "$GUEST_LOG" 2>/dev/null; then
    [ "$KEEP" = 1 ] && cat "$GUEST_LOG" >&2
    grep "NVMIRROR-GUEST: IOPS" "$GUEST_LOG" >&2 || true
    log "guest passed (log: $GUEST_LOG)"
    echo "PASS"
    exit 0
fi
log "---- guest log ----"
cat "$GUEST_LOG" >&2 2>/dev/null || true
[ "$QEMU_RC" = 124 ] && fail "guest timed out after ${TIMEOUT}s"
reason=$(sed -n 's/.*NVMIRROR-GUEST: FAIL: //p' "$GUEST_LOG" | sed -n 1p)
fail "${reason:-guest did not report a result (qemu exit $QEMU_RC)}"
