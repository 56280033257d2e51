#!/bin/bash
# The CXL harness: pnm-device serves the device as a PCI function over
# vfio-user; QEMU 11 (from a trixie root, tests/qemu/setup-trixie.sh) plugs
# it into a Linux guest as vfio-user-pci behind a PCIe root port; the guest
# suite (guest/cxl-suite.sh) checks that Linux's own cxl_pci binds it and
# that ndctl's cxl tool manages it.
#
# usage: tests/qemu/cxl.sh            (from anywhere; installs what it needs)
# env:   QEMU_TIMEOUT seconds (default 240); PNM_PROFILE cargo profile of the
#        binaries (default release; CI uses dev, which its tests built)
# Last line: "CXL_HARNESS ok N checks" or "CXL_HARNESS FAIL ...", and the
# exit code says the same. Logs (guest serial, device) under target/qemu/logs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${QEMU_WORK:-$ROOT/target/qemu}
export QEMU_WORK=$WORK
KDIR=$("$HERE/setup.sh" | tail -1)
TRIXIE=$("$HERE/setup-trixie.sh" | tail -1)
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/run"
T0=$EPOCHREALTIME

PROFILE=${PNM_PROFILE:-release}
OUT=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
(cd "$ROOT" && cargo build -q --profile "$PROFILE" -p pnm-device -p pnm-tools)
PNMCTL=$ROOT/target/$OUT/pnmctl
mkdir -p "$WORK/guest-bin"
strip -o "$WORK/guest-bin/pnmctl" "$PNMCTL"
GUEST_MODULES="cxl_pci cxl_mem vfio vfio_iommu_type1 vfio-pci" GUEST_ROOT=$TRIXIE \
    "$HERE/mkinitramfs.sh" "$KDIR" "$WORK/initrd-cxl.gz" "$WORK/guest-bin/pnmctl" \
    "$TRIXIE/usr/bin/cxl"

REGION=/dev/shm/pnm-cxl-$$
VFIO_SOCK=$WORK/run/pnm-$$.vfio-user
DEVICE_LOG=$LOGS/cxl-device.log
SERIAL=$LOGS/cxl-guest-serial.log
rm -f "$DEVICE_LOG" "$SERIAL"
DEVICE_PID=
cleanup() {
    [ -n "$DEVICE_PID" ] && kill "$DEVICE_PID" 2> /dev/null && wait "$DEVICE_PID" 2> /dev/null
    rm -f "$REGION" "$REGION.sock" "$VFIO_SOCK"
}
trap cleanup EXIT
RUST_LOG=${RUST_LOG:-info,pnm_device::engine=debug} "$ROOT/target/$OUT/pnm-device" \
    --path "$REGION" --size 512MiB --vfio-user "$VFIO_SOCK" >> "$DEVICE_LOG" 2>&1 &
DEVICE_PID=$!
for _ in $(seq 200); do [ -S "$VFIO_SOCK" ] && break; sleep 0.05; done
[ -S "$VFIO_SOCK" ] || { echo "CXL_HARNESS FAIL pnm-device did not start (log: $DEVICE_LOG)"; exit 1; }

KERNEL=$(ls "$KDIR"/boot/vmlinuz-*)
# QEMU runs in the trixie root, in a mount namespace of its own that sees
# the work directory (kernel, initramfs, socket) and /dev/shm at their paths.
set +e
timeout "${QEMU_TIMEOUT:-240}" unshare --mount --propagation private sh -c '
    set -e
    R=$1; W=$2; shift 2
    mount --rbind /dev "$R/dev"
    mount -t proc proc "$R/proc"
    mkdir -p "$R$W"
    mount --bind "$W" "$R$W"
    exec chroot "$R" "$@"' sh "$TRIXIE" "$WORK" \
    qemu-system-x86_64 \
    -accel tcg -cpu max -M q35 -m 1G -smp 1 -nographic -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    -kernel "$KERNEL" -initrd "$WORK/initrd-cxl.gz" \
    -append "console=ttyS0 panic=-1 loglevel=7 intel_iommu=on pnm.suite=cxl" \
    -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1 \
    -device "{\"driver\":\"vfio-user-pci\",\"bus\":\"rp0\",\"socket\":{\"type\":\"unix\",\"path\":\"$VFIO_SOCK\"}}" \
    < /dev/null > "$SERIAL" 2>&1
QEMU_RC=$?
set -e
T1=$EPOCHREALTIME

checks=$(grep -c '^CHECK ' "$SERIAL" || true)
failed=$(grep '^CHECK ' "$SERIAL" | grep -v ' ok' || true)
if [ "$QEMU_RC" -ne 0 ] || ! grep -q GUEST_DONE "$SERIAL"; then
    failed="$failed
guest: qemu exit $QEMU_RC, $(tail -3 "$SERIAL")"
fi
elapsed=$(echo "$T1 - $T0" | bc)
if [ -z "$failed" ] && [ "$checks" -gt 0 ]; then
    echo "CXL_HARNESS ok $checks checks (${elapsed}s; logs: $LOGS)"
else
    echo "CXL_HARNESS FAIL$failed"
    echo "(logs: $SERIAL, $DEVICE_LOG)"
    exit 1
fi
