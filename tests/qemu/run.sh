#!/bin/bash
# The QEMU harness: pnm-device on the host, a Linux guest under QEMU (TCG,
# emulated intel-iommu) that sees it as a PCI device through
# ivshmem-doorbell, and the guest suite (guest/suite.sh) driving it with
# the same pnmctl as on the host.
#
# usage: tests/qemu/run.sh            (from anywhere; installs what it needs)
# env:   QEMU_TIMEOUT seconds (default 240); PNM_PROFILE cargo profile of the
#        binaries (default release; CI uses dev, which its tests built)
# Last line: "QEMU_HARNESS ok N checks" or "QEMU_HARNESS FAIL ...", and the
# exit code says the same. Logs (guest serial, device) under target/qemu/logs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${QEMU_WORK:-$ROOT/target/qemu}
export QEMU_WORK=$WORK
KDIR=$("$HERE/setup.sh" | tail -1)
LOGS=$WORK/logs
mkdir -p "$LOGS"
T0=$EPOCHREALTIME

# The binaries, host and guest alike: the guest runs this very pnmctl,
# with the host's C library copied into its initramfs.
PROFILE=${PNM_PROFILE:-release}
OUT=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
(cd "$ROOT" && cargo build -q --profile "$PROFILE" -p pnm-device -p pnm-tools)
PNMCTL=$ROOT/target/$OUT/pnmctl
mkdir -p "$WORK/guest-bin"
strip -o "$WORK/guest-bin/pnmctl" "$PNMCTL"
mkdir -p "$WORK/data"
python3 "$HERE/guest_data.py" make "$WORK/data" "${SEED:-$$}"
"$HERE/mkinitramfs.sh" "$KDIR" "$WORK/initrd.gz" "$WORK/guest-bin/pnmctl" "$WORK"/data/*.npy

REGION=/dev/shm/pnm-qemu-$$
SOCK=$REGION.sock
# Two PCI functions that are not PNM devices, for the VFIO transport's
# refusals: a 1 MiB BAR2 of zeros (no PNM capability) and a 32 KiB one
# (smaller than a register block).
NOT_PNM=$REGION-zeros
TOO_SMALL=$REGION-small
DEVICE_LOG=$LOGS/device.log
SERIAL=$LOGS/guest-serial.log
DEVICE_PID=
cleanup() {
    [ -n "$DEVICE_PID" ] && kill "$DEVICE_PID" 2>/dev/null && wait "$DEVICE_PID" 2>/dev/null
    rm -f "$REGION" "$SOCK" "$NOT_PNM" "$TOO_SMALL"
}
trap cleanup EXIT
"$ROOT/target/$OUT/pnm-device" --path "$REGION" --size 64MiB > "$DEVICE_LOG" 2>&1 &
DEVICE_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || { echo "QEMU_HARNESS FAIL pnm-device did not start (log: $DEVICE_LOG)"; exit 1; }

# A host process uses the device while the guest does: its own sequence,
# the same Top-K over and over, every answer the same as the first.
HOST_SEQ=$("$PNMCTL" --device "$REGION" --json kv load --keys "$WORK/data/keys.npy" \
    --values "$WORK/data/values.npy" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
host_topk() {
    "$PNMCTL" --device "$REGION" --json topk --seq "$HOST_SEQ" --layer 0 --head 1 -k 32 \
        --query "$WORK/data/query.npy" | sed 's/"device_ns":[0-9]*,//; s/,"model_ns":[0-9]*//'
}
HOST_FIRST=$(host_topk)
rm -f "$LOGS/guest.done" "$LOGS/host-concurrent"
(
    n=0 bad=0
    while [ ! -e "$LOGS/guest.done" ]; do
        [ "$(host_topk)" = "$HOST_FIRST" ] || bad=$((bad + 1))
        n=$((n + 1))
    done
    echo "$n $bad" > "$LOGS/host-concurrent"
) &
HOST_LOOP=$!

rm -f "$NOT_PNM" "$TOO_SMALL"
truncate -s 1M "$NOT_PNM"
truncate -s 32K "$TOO_SMALL"
KERNEL=$(ls "$KDIR"/boot/vmlinuz-*)
set +e
timeout "${QEMU_TIMEOUT:-240}" qemu-system-x86_64 \
    -accel tcg -cpu max -M q35 -m 1G -smp 2 -nographic -no-reboot \
    -device intel-iommu,intremap=on \
    -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 intel_iommu=on" \
    -chardev socket,path="$SOCK",id=pnm \
    -device ivshmem-doorbell,chardev=pnm,vectors=8 \
    -object memory-backend-file,id=zeros,share=on,mem-path="$NOT_PNM",size=1M \
    -device ivshmem-plain,memdev=zeros \
    -object memory-backend-file,id=small,share=on,mem-path="$TOO_SMALL",size=32K \
    -device ivshmem-plain,memdev=small \
    < /dev/null > "$SERIAL" 2>&1
QEMU_RC=$?
set -e
T1=$EPOCHREALTIME
touch "$LOGS/guest.done"
wait "$HOST_LOOP"

checks=$(grep -c '^CHECK ' "$SERIAL" || true)
failed=$(grep '^CHECK ' "$SERIAL" | grep -v ' ok' || true)
# The guest's answers against NumPy's on the same data.
if ! python3 "$HERE/guest_data.py" check "$SERIAL" "$WORK/data" > "$LOGS/answers.log" 2>&1; then
    failed="$failed
answers: $(cat "$LOGS/answers.log")"
fi
checks=$((checks + $(sed -n 's/^\([0-9]*\) passed.*/\1/p' "$LOGS/answers.log" || echo 0)))
# The host's answers while the guest ran, and to the same data as the guest's.
read -r host_runs host_bad < "$LOGS/host-concurrent"
echo "RESULT topk $HOST_FIRST" > "$LOGS/host-answer"
if [ "$host_runs" -lt 1 ] || [ "$host_bad" -ne 0 ] \
    || ! python3 "$HERE/guest_data.py" check "$LOGS/host-answer" "$WORK/data" --topk-only > /dev/null; then
    failed="$failed
host-concurrent: $host_runs Top-Ks during the guest run, $host_bad differed"
fi
checks=$((checks + 1))
# The guest went away: the device deleted what it held and still serves.
for _ in $(seq 40); do
    grep -q "its queue pairs and its guest's buffers deleted" "$DEVICE_LOG" && break
    sleep 0.05
done
grep -q "its queue pairs and its guest's buffers deleted" "$DEVICE_LOG" \
    || failed="$failed
guest-gone: the device did not reclaim the departed guest's queue and buffers"
[ "$(host_topk)" = "$HOST_FIRST" ] || failed="$failed
after-guest: the host's Top-K changed after the guest left"
checks=$((checks + 2))
echo "host Top-Ks during the guest run: $host_runs, all equal: $([ "$host_bad" -eq 0 ] && echo yes || echo no)"
printf 'harness wall time %.1f s\n' "$(echo "$T1 - $T0" | bc)"
if [ "$QEMU_RC" -ne 0 ] || ! grep -q GUEST_DONE "$SERIAL" || [ -n "$failed" ] || [ "$checks" -eq 0 ]; then
    echo "$failed"
    tail -30 "$SERIAL"
    # Kept: the next run overwrites the logs in $LOGS.
    KEPT=$WORK/failed/$(date +%Y%m%d-%H%M%S)-$$
    mkdir -p "$KEPT" && cp "$LOGS"/* "$KEPT"/ 2>/dev/null
    echo "QEMU_HARNESS FAIL qemu exit $QEMU_RC, $checks checks (logs kept in $KEPT)"
    exit 1
fi
echo "QEMU_HARNESS ok $checks checks"
