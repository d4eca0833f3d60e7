#!/usr/bin/env bash
# Interop test of the userspace PCIe driver (`pcie://`) against an independent controller:
# QEMU's emulated NVMe (hw/nvme), inside a Debian cloud kernel booted under qemu/TCG with an
# emulated Intel IOMMU.
#
# The guest gets two emulated NVMe controllers. The first stays on the kernel's nvme driver;
# the second is unbound from it and bound to vfio-pci, 2 MiB hugepages are reserved, and
# `nvmirror-bench` drives it through `pcie://BDF?nsid=1` with verifying workloads: 4 KiB
# random writes and reads at queue depth 16 (crc32c verify), then 256 KiB sequential
# writes and reads (PRP lists and a split at the 128 KiB transfer limit). Prints PASS or
# FAIL and exits 0 or 1. Downloads (the kernel package) are cached under build/interop-pcie/.
#
# Usage: scripts/interop/qemu-nvme.sh [--timeout SECONDS] [--keep]
#   KERNEL_DIR=DIR  use an unpacked linux-image-*-cloud-amd64 (boot/ and lib/modules/)
#                   instead of downloading one.
# Needs: qemu-system-x86_64, a static busybox, cpio, xz (and apt-get to fetch the kernel).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK="$ROOT/build/interop-pcie"
TIMEOUT=900
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) echo "usage: $0 [--timeout SECONDS] [--keep]" >&2; exit 2 ;;
    esac
done

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

# ---- 3. the initramfs ----------------------------------------------------------------------
MODULES="irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci"
R="$WORK/initramfs"
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib/modules,usr/bin}
cp "$BUSYBOX" "$R/bin/busybox"
for m in $MODULES; do
    f=$(find "$MODDIR" -name "$m.ko*" | sed -n 1p)
    [ -n "$f" ] || fail "module $m not in $MODDIR"
    case "$f" in
        *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
        *) cp "$f" "$R/lib/modules/$m.ko" ;;
    esac
done
echo "$MODULES" >"$R/etc/modules-order"
cp "$BENCH" "$R/usr/bin/nvmirror-bench"
for lib in $(ldd "$BENCH" | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
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
run --rw write --bs 256k --iodepth 4 --size 16MiB --verify crc32c
run --rw read --bs 256k --iodepth 4 --size 16MiB
say "PASS"
poweroff -f
INIT
chmod +x "$R/init"
INITRD="$WORK/initrd.gz"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD"

# ---- 4. the guest ---------------------------------------------------------------------------
for i in 0 1; do
    truncate -s 64M "$WORK/nvme$i.img"
done
GUEST_LOG="$WORK/guest.log"
rm -f "$GUEST_LOG"
log "booting $KVER under qemu with an emulated IOMMU and two NVMe controllers (timeout ${TIMEOUT}s)"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1G -smp 2 \
    -machine q35 -device intel-iommu,aw-bits=48 \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on" \
    -display none -no-reboot -serial "file:$GUEST_LOG" -net none \
    -drive "file=$WORK/nvme0.img,if=none,id=d0,format=raw" -device nvme,serial=nvmirror0,drive=d0 \
    -drive "file=$WORK/nvme1.img,if=none,id=d1,format=raw" -device nvme,serial=nvmirror1,drive=d1
QEMU_RC=$?
set -e
if grep -q "NVMIRROR-GUEST: PASS" "$GUEST_LOG" 2>/dev/null; then
    [ "$KEEP" = 1 ] && cat "$GUEST_LOG" >&2
    log "guest passed (log: $GUEST_LOG)"
    echo "PASS"
    exit 0
fi
log "---- guest log ----"
cat "$GUEST_LOG" >&2 2>/dev/null || true
[ "$QEMU_RC" = 124 ] && fail "guest timed out after ${TIMEOUT}s"
reason=$(sed -n 's/.*NVMIRROR-GUEST: FAIL: //p' "$GUEST_LOG" | sed -n 1p)
fail "${reason:-guest did not report a result (qemu exit $QEMU_RC)}"
