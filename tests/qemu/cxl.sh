#!/bin/bash
# The CXL harness: pnm-device serves the device as a PCI function over
# vfio-user; QEMU 11 (from a trixie root, tests/qemu/setup-trixie.sh) plugs
# it into a Linux guest as vfio-user-pci below a CXL root port; the guest
# suite (guest/cxl-suite.sh) checks that Linux's own cxl_pci binds it and
# that ndctl's cxl tool manages it.
#
# usage: tests/qemu/cxl.sh            (from anywhere; installs what it needs)
#        tests/qemu/cxl.sh --shell    the same, then a shell in the guest on
#                                     this terminal (exit it to power off)
# env:   QEMU_TIMEOUT seconds (default 240); PNM_PROFILE cargo profile of the
#        binaries (default release; CI uses dev, which its tests built)
# Last line: "CXL_HARNESS ok N checks" or "CXL_HARNESS FAIL ...", and the
# exit code says the same. Logs (guest serial, device) under target/qemu/logs.
set -euo pipefail
SHELL_AFTER=0
[ "${1:-}" = --shell ] && SHELL_AFTER=1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${QEMU_WORK:-$ROOT/target/qemu}
export QEMU_WORK=$WORK
KDIR=$("$HERE/setup.sh" | tail -1)
TRIXIE=$("$HERE/setup-trixie.sh" | tail -1)
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/run"
T0=$EPOCHREALTIME

. "$HERE/lib.sh"
build_binaries_and_data
GUEST_MODULES="cxl_acpi cxl_pci cxl_mem vfio vfio_iommu_type1 vfio-pci" GUEST_ROOT=$TRIXIE \
    "$HERE/mkinitramfs.sh" "$KDIR" "$WORK/initrd-cxl.gz" "$WORK/guest-bin/pnmctl" \
    "$TRIXIE/usr/bin/cxl" "$WORK"/data/*.npy

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
    --path "$REGION" --size 512MiB --allow-injection --vfio-user "$VFIO_SOCK" \
    >> "$DEVICE_LOG" 2>&1 &
DEVICE_PID=$!
for _ in $(seq 200); do [ -S "$VFIO_SOCK" ] && break; sleep 0.05; done
[ -S "$VFIO_SOCK" ] || { echo "CXL_HARNESS FAIL pnm-device did not start (log: $DEVICE_LOG)"; exit 1; }

# A host process uses the device while the guest does: its own sequence,
# the same Top-K over and over, every answer the same as the first.
load_host_sequence
HOST_FIRST=$(host_topk)
rm -f "$LOGS/cxl-guest.done"
(
    n=0 bad=0
    while [ ! -e "$LOGS/cxl-guest.done" ]; do
        sleep 0.05
        answer=$(host_topk 2> /dev/null) || answer=failed
        [ "$answer" = "$HOST_FIRST" ] || bad=$((bad + 1))
        n=$((n + 1))
    done
    echo "$n $bad" > "$LOGS/cxl-host-concurrent"
) &
HOST_LOOP=$!

# The guest asks for an event record on its console: the host injects a
# General Media record (uncorrectable, host read) into the warning log.
(
    for _ in $(seq 2400); do
        if grep -q PNM_EVENT_REQUEST "$SERIAL" 2> /dev/null; then
            "$PNMCTL" --device "$REGION" inject event --log warning --kind general-media \
                --dpa 0xfff0040 --descriptor 1 --transaction 1 >> "$DEVICE_LOG" 2>&1
            break
        fi
        sleep 0.1
    done
) &
INJECTOR=$!

KERNEL=$(ls "$KDIR"/boot/vmlinuz-*)
# QEMU runs in the trixie root, in a mount namespace of its own that sees
# the work directory (kernel, initramfs, socket) and /dev/shm at their paths.
APPEND="console=ttyS0 panic=-1 loglevel=7 intel_iommu=on pnm.suite=cxl"
# With --shell: no time bound, the console on this terminal (and in the log).
if [ "$SHELL_AFTER" = 1 ]; then
    APPEND="$APPEND pnm.shell=1"
    BOUND=()
else
    BOUND=(timeout "${QEMU_TIMEOUT:-240}")
fi
run_qemu() {
    "${BOUND[@]}" unshare --mount --propagation private sh -c '
        set -e
        R=$1; W=$2; shift 2
        mount --rbind /dev "$R/dev"
        mount -t proc proc "$R/proc"
        mkdir -p "$R$W"
        mount --bind "$W" "$R$W"
        exec chroot "$R" "$@"' sh "$TRIXIE" "$WORK" \
        qemu-system-x86_64 \
        -accel tcg -cpu max -smp 1 -nographic -no-reboot \
        -M q35,cxl=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G -m 1G,maxmem=4G,slots=4 \
        -device intel-iommu,intremap=on,caching-mode=on \
        -kernel "$KERNEL" -initrd "$WORK/initrd-cxl.gz" \
        -append "$APPEND" \
        -device pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1 \
        -device cxl-rp,port=0,bus=cxl.1,id=rp0,chassis=0,slot=2 \
        -device "{\"driver\":\"vfio-user-pci\",\"bus\":\"rp0\",\"socket\":{\"type\":\"unix\",\"path\":\"$VFIO_SOCK\"}}"
}
set +e
if [ "$SHELL_AFTER" = 1 ]; then
    run_qemu 2>&1 | tee "$SERIAL"
    QEMU_RC=${PIPESTATUS[0]}
else
    run_qemu < /dev/null > "$SERIAL" 2>&1
    QEMU_RC=$?
fi
set -e
kill "$INJECTOR" 2> /dev/null || true
wait "$INJECTOR" 2> /dev/null || true
touch "$LOGS/cxl-guest.done"
wait "$HOST_LOOP"
read -r host_runs host_bad < "$LOGS/cxl-host-concurrent"
if [ "$host_runs" -lt 1 ] || [ "$host_bad" -ne 0 ]; then
    failed_host="host-concurrent: $host_bad of $host_runs Top-Ks during the guest run differed"
fi
T1=$EPOCHREALTIME

checks=$(grep -c '^CHECK ' "$SERIAL" || true)
failed=$(grep '^CHECK ' "$SERIAL" | grep -v ' ok' || true)
[ -z "${failed_host:-}" ] || failed="$failed
$failed_host"
checks=$((checks + 1))
# The guest's Top-K on the function against NumPy's on the same data.
if ! python3 "$HERE/guest_data.py" check "$SERIAL" "$WORK/data" --topk-only \
    > "$LOGS/cxl-answers.log" 2>&1; then
    failed="$failed
answers: $(cat "$LOGS/cxl-answers.log")"
fi
checks=$((checks + 1))
# The kernel's probe-time mailbox commands, answered with Success, in the
# device log (debug level: source, opcode, return code of each command).
plain_log=$(sed 's/\x1b\[[0-9;]*m//g' "$DEVICE_LOG")
for op in 0400h 0401h 0301h 4000h 0102h 0103h 0100h 4300h 4301h 4302h; do
    if ! grep -q "source=\"function\" opcode=$op.*done code=00h" <<< "$plain_log"; then
        failed="$failed
device log: no successful $op from the function's mailbox"
    fi
    checks=$((checks + 1))
done
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
