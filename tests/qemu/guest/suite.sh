#!/bin/sh
# The guest suite: finds the PNM device (ivshmem-doorbell: 1af4:1110 with
# an MSI-X BAR1), binds it to vfio-pci and drives it with the same pnmctl
# as on the host. Each check prints "CHECK <name> ok" or "CHECK <name>
# FAIL"; answers the host verifies print as "RESULT <name> <payload>".
for m in $(cat /etc/modules); do insmod "$m" || echo "insmod $m failed"; done
dev=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor):$(cat $d/device)" = "0x1af4:0x1110" ] \
        && [ "$(sed -n 2p $d/resource)" != "0x0000000000000000 0x0000000000000000 0x0000000000000000" ]; then
        dev=${d##*/}
    fi
done
check() { # name command... (bounded: a hang fails the check, not the run)
    name=$1; shift
    if out=$(timeout 60 "$@" 2>&1); then echo "CHECK $name ok"; else echo "CHECK $name FAIL ($?)"; fi
    echo "$out" | head -40 | sed "s/^/  $name: /"
}
hex() { od -An -tx1 -v "$1" | tr -d ' \n'; }
refuses() { # name expected-text command...
    name=$1 expected=$2; shift 2
    if out=$(timeout 60 "$@" 2>&1); then
        echo "CHECK $name FAIL (accepted)"
    elif echo "$out" | grep -q "$expected"; then
        echo "CHECK $name ok"
    else
        echo "CHECK $name FAIL"
    fi
    echo "  $name: $out"
}

# A guest booted without an IOMMU (pnm.suite=no-iommu on the kernel command
# line): VFIO cannot be had, and the transport must say why.
if grep -q pnm.suite=no-iommu /proc/cmdline; then
    pci=$(grep -l 0x1af4 /sys/bus/pci/devices/*/vendor | head -1)
    pci=${pci%/vendor}
    refuses vfio-no-iommu-group "in no IOMMU group" pnmctl --device "vfio:${pci##*/}" identify
    exit 0
fi
[ -n "$dev" ] || { echo "CHECK device-found FAIL (no ivshmem-doorbell)"; exit 0; }
echo "CHECK device-found ok $dev"

# 1. Through sysfs (BAR2 as a file; polling, no interrupts).
check sysfs-identify pnmctl --device /sys/bus/pci/devices/$dev/resource2 --wait-ms 5000 identify

# 2. Through VFIO: BAR2 mapped by the device fd, BAR0 doorbell, MSI-X.
echo vfio-pci > /sys/bus/pci/devices/$dev/driver_override
echo "$dev" > /sys/bus/pci/drivers_probe
echo "bound to: $(basename "$(readlink /sys/bus/pci/devices/$dev/driver)")"
pnm="pnmctl --device vfio:$dev --wait-ms 5000"
check vfio-identify $pnm identify
check vfio-health $pnm health
check vfio-logs $pnm logs
check vfio-pnm-info $pnm --json pnm-info
seq=$(timeout 60 $pnm --json kv load --keys /data/keys.npy --values /data/values.npy \
    | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
[ -n "$seq" ] && echo "CHECK vfio-kv-load ok seq $seq" || echo "CHECK vfio-kv-load FAIL"
top=$(timeout 60 $pnm --json topk --seq "$seq" --layer 0 --head 1 -k 32 --query /data/query.npy)
[ -n "$top" ] && echo "CHECK vfio-topk ok" || echo "CHECK vfio-topk FAIL"
echo "RESULT topk $top"
best=$(echo "$top" | sed -n 's/.*"indices":\[\([0-9,]*\)\].*/\1/p' | cut -d, -f1-4)
check vfio-gather $pnm gather --seq "$seq" --layer 0 --head 1 --indices "$best" \
    --out-keys /tmp/k.npy --out-values /tmp/v.npy
echo "RESULT gather-keys $(hex /tmp/k.npy)"
echo "RESULT gather-values $(hex /tmp/v.npy)"
check vfio-kv-free $pnm kv free --seq "$seq"

# 3. Interrupt-driven waits over MSI-X, and figures from inside the guest.
bench() { # name mode args...
    name=$1 mode=$2; shift 2
    start=$(cut -d' ' -f1 /proc/uptime)
    out=$(timeout 120 $pnm bench "$@" 2>&1)
    echo "$out" | grep -q "\"mode\": \"$mode\"" && echo "CHECK $name ok" || echo "CHECK $name FAIL"
    echo "  $name: $(cut -d' ' -f1 /proc/uptime) - $start s"
    echo "RESULT $name $(echo "$out" | tr -d '\n ')"
}
bench vfio-msix-nop interrupt nop --interrupts --samples 200 --seconds 0.5
bench vfio-polled-nop polled nop --samples 200 --seconds 0.5
bench vfio-async-nop interrupt nop --async-tasks 8 --seconds 0.5
bench vfio-topk polled topk --tokens 8192 -k 64 --reps 9

# 4. The device restarts under the guest: killed (a crash) and started
# again on the same region by the host when it reads the request below.
# BAR2 is the same file, so registers, rings and device DRAM are the new
# device's at once, and a sequence loaded before is still there. QEMU's
# chardev does not connect again (ivshmem-doorbell cannot: with
# reconnect-ms it never finishes starting), so the guest's doorbells and
# MSI-X reach no one: the device still looks at its doorbells every 10 ms
# when idle, keeps the guest's peer id for QEMU's process, and the driver
# polls once it sees its interrupts missing.
field() { # name: a number from pnmctl status --json
    timeout 60 $pnm --json status 2>/dev/null | sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" | head -1
}
kept=$(timeout 60 $pnm --json kv load --keys /data/keys.npy --values /data/values.npy \
    | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
old_pid=$(field device_pid)
old_dirty=$(field dirty_shutdown_count)
echo "PNM_RESTART_REQUEST device pid $old_pid"
new_pid=
for _ in $(seq 300); do
    sleep 0.2
    pid=$(field device_pid)
    if [ -n "$pid" ] && [ "$pid" != 0 ] && [ "$pid" != "$old_pid" ] \
        && timeout 60 $pnm status > /dev/null 2>&1; then
        new_pid=$pid
        break
    fi
done
[ -n "$new_pid" ] && echo "CHECK restart-new-device ok (pid $old_pid, then $new_pid)" \
    || echo "CHECK restart-new-device FAIL (pid $old_pid, no new device)"
new_dirty=$(field dirty_shutdown_count)
[ "$new_dirty" = $((old_dirty + 1)) ] && echo "CHECK restart-dirty-shutdown-counted ok" \
    || echo "CHECK restart-dirty-shutdown-counted FAIL ($old_dirty, then $new_dirty)"
# The new device says so in its warning log too: a Memory Module record
# carrying the new Dirty Shutdown Count (read and cleared from the guest).
events=$(timeout 60 $pnm --json events --log warning --clear 2>&1)
if echo "$events" | grep -q '"type": "memory_module"' \
    && echo "$events" | grep -q "\"dirty_shutdown_count\": $new_dirty,"; then
    echo "CHECK restart-event-logged ok"
else
    echo "CHECK restart-event-logged FAIL"
    echo "$events" | head -40 | sed 's/^/  restart-event-logged: /'
fi
check restart-identify $pnm identify
top=$(timeout 60 $pnm --json topk --seq "$kept" --layer 0 --head 1 -k 32 --query /data/query.npy)
[ -n "$top" ] && echo "CHECK restart-kept-sequence ok" || echo "CHECK restart-kept-sequence FAIL"
echo "RESULT topk-after-restart $top"
bench restart-msix-nop interrupt nop --interrupts --samples 50 --seconds 0.2
check restart-kv-free $pnm kv free --seq "$kept"

# 5. The VFIO transport's refusals, as typed errors with their reasons.
refuses vfio-no-device "no such PCI device" pnmctl --device vfio:0000:00:1f.7 identify
refuses vfio-not-bound "not vfio-pci" pnmctl --device vfio:0000:00:00.0 identify
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = "0x1af4:0x1110" ] || continue
    [ "${d##*/}" = "$dev" ] && continue
    echo vfio-pci > $d/driver_override
    echo "${d##*/}" > /sys/bus/pci/drivers_probe
    size=$(( $(sed -n 3p $d/resource | cut -d' ' -f2) - $(sed -n 3p $d/resource | cut -d' ' -f1) + 1 ))
    case $size in
        1048576) refuses vfio-not-pnm "not a cxl-pnm device" pnmctl --device "vfio:${d##*/}" identify ;;
        32768) refuses vfio-small-bar "BAR2 is 32768 bytes" pnmctl --device "vfio:${d##*/}" identify ;;
    esac
done

# 6. The guest goes away with a queue pair and buffers held: a command
# loop still running when the guest powers off. The host checks that the
# device reclaims them.
$pnm bench nop --samples 1000000 --seconds 600 > /dev/null 2>&1 &
sleep 2
echo "CHECK left-running ok (pid $!)"
