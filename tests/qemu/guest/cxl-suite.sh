#!/bin/sh
# The CXL guest suite: the device as a PCI function over vfio-user (class
# 050210h, a CXL memory device) below QEMU's CXL root port. Linux's own
# cxl_pci and cxl_mem bind it, with no line of the project's driver
# involved; ndctl's cxl tool manages it; poison and event records travel
# through the kernel. Then the project's own driver takes the function over.
# Each check prints "CHECK <name> ok" or "CHECK <name> FAIL".
check() { # name command... (bounded: a hang fails the check, not the run)
    name=$1; shift
    if out=$(timeout 60 "$@" 2>&1); then echo "CHECK $name ok"; else echo "CHECK $name FAIL ($?)"; fi
    echo "$out" | head -60 | sed "s/^/  $name: /"
}
mount -t debugfs debugfs /sys/kernel/debug 2> /dev/null
mkdir -p /run /var/run
for m in $(cat /etc/modules); do insmod "$m" 2> /dev/null || echo "insmod $m failed"; done
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = "0x050210" ] && dev=${d##*/}
done
[ -n "$dev" ] || { echo "CHECK cxl-device-found FAIL (no class 050210 function)"; exit 0; }
echo "CHECK cxl-device-found ok $dev"
# cxl_pci probes asynchronously: wait for the memdev (bounded).
for _ in $(seq 100); do [ -e /sys/bus/cxl/devices/mem0 ] && break; sleep 0.1; done
check cxl-pci-bound test "$(basename "$(readlink /sys/bus/pci/devices/$dev/driver)")" = cxl_pci
check cxl-memdev test -e /sys/bus/cxl/devices/mem0
mem=/sys/bus/cxl/devices/mem0
echo "MEMDEV firmware_version=$(cat $mem/firmware_version 2>/dev/null) ram_size=$(cat $mem/ram/size 2>/dev/null) pmem_size=$(cat $mem/pmem/size 2>/dev/null) serial=$(cat $mem/serial 2>/dev/null) payload_max=$(cat $mem/payload_max 2>/dev/null)"
dmesg | grep -iE "cxl|$dev" | sed 's/^/  dmesg: /'
# No probe complaint from the CXL drivers (the _OSC lines list capability
# names such as CXLProtocolErrorReporting, which are not errors).
check cxl-probe-clean sh -c "! dmesg | grep -v '_OSC' | grep -iE '(cxl|$dev).*(error|fail|timeout|not found|not active|unsupported)'"
# Behind QEMU's CXL host bridge and root port, cxl_mem binds the memdev:
# listed enabled, its endpoint port and HDM decoder in the topology.
check cxl-mem-bound test "$(basename "$(readlink $mem/driver)")" = cxl_mem
check cxl-list sh -c "cxl list -M | grep -q '\"memdev\":\"mem0\"' && cxl list -M"
check cxl-list-health cxl list -M -H
check cxl-topology cxl list -P -D -E -M

# Poison through the kernel: debugfs inject and clear reach the device's
# poison list (Inject Poison 4301h, Clear Poison 4302h), and the list the
# kernel reads back (Get Poison List 4300h, trigger_poison_list) shows in
# its cxl_poison trace event.
mount -t tracefs nodev /sys/kernel/tracing 2> /dev/null
trace=/sys/kernel/tracing
dbg=/sys/kernel/debug/cxl/mem0
dpa=0xfff0000
echo 1 > $trace/events/cxl/enable
check poison-inject sh -c "echo $dpa > $dbg/inject_poison"
check poison-listed sh -c "echo > $trace/trace; echo 1 > $mem/trigger_poison_list && grep -q 'dpa=$dpa ' $trace/trace && grep cxl_poison $trace/trace"
check poison-clear sh -c "echo $dpa > $dbg/clear_poison"
check poison-cleared sh -c "echo > $trace/trace; echo 1 > $mem/trigger_poison_list && ! grep -q 'dpa=$dpa ' $trace/trace"

# An event record the device logs reaches the kernel's trace events: the
# host injects a General Media record when asked (on this console); the
# device raises the event interrupt (MSI-X, the vector the kernel set with
# Set Event Interrupt Policy), the kernel reads the log.
echo > $trace/trace
echo PNM_EVENT_REQUEST
seen=
for _ in $(seq 200); do
    grep -q cxl_general_media $trace/trace && { seen=1; break; }
    sleep 0.1
done
[ -n "$seen" ] && echo "CHECK event-traced ok" || echo "CHECK event-traced FAIL"
grep cxl_general_media $trace/trace | head -3 | sed 's/^/  event-traced: /'
echo 0 > $trace/events/cxl/enable
ls $mem | sed 's/^/  memdev: /'

# The project's own driver on the same function: cxl_pci unbound,
# vfio-pci bound, pnmctl through the VFIO transport (BAR0 ivshmem
# registers, BAR2 region, MSI-X).
echo "$dev" > /sys/bus/pci/drivers/cxl_pci/unbind
echo vfio-pci > /sys/bus/pci/devices/$dev/driver_override
echo "$dev" > /sys/bus/pci/drivers_probe
check vfio-bound test "$(basename "$(readlink /sys/bus/pci/devices/$dev/driver)")" = vfio-pci
pnm="pnmctl --device vfio:$dev --wait-ms 5000"
check vfio-identify $pnm identify
check vfio-health $pnm health
check vfio-pnm-info $pnm --json pnm-info
# KV and Top-K on the function (the host checks the answer against NumPy),
# and queue completions as this function's MSI-X interrupts.
seq=$(timeout 60 $pnm --json kv load --keys /data/keys.npy --values /data/values.npy \
    | sed -n 's/.*"id": *\([0-9]*\).*/\1/p' | head -1)
[ -n "$seq" ] && echo "CHECK vfio-kv-load ok seq $seq" || echo "CHECK vfio-kv-load FAIL"
top=$(timeout 60 $pnm --json topk --seq "$seq" --layer 0 --head 1 -k 32 --query /data/query.npy)
[ -n "$top" ] && echo "CHECK vfio-topk ok" || echo "CHECK vfio-topk FAIL"
echo "RESULT topk $top"
check vfio-kv-free $pnm kv free --seq "$seq"
out=$(timeout 120 $pnm bench nop --interrupts --samples 200 --seconds 0.5 2>&1)
if echo "$out" | grep -q '"mode": "interrupt"' && echo "$out" | grep -q '"missed_interrupts": 0'; then
    echo "CHECK vfio-msix-nop ok"
else
    echo "CHECK vfio-msix-nop FAIL"
fi
echo "$out" | tr -d '\n ' | head -c 600 | sed 's/^/  vfio-msix-nop: /'; echo

# Back to the kernel's driver: the function probes again after the
# project's driver used it.
echo "$dev" > /sys/bus/pci/drivers/vfio-pci/unbind
echo > /sys/bus/pci/devices/$dev/driver_override
echo "$dev" > /sys/bus/pci/drivers/cxl_pci/bind
for _ in $(seq 100); do ls /sys/bus/cxl/devices/ | grep -q '^mem' && break; sleep 0.1; done
check cxl-pci-rebound test "$(basename "$(readlink /sys/bus/pci/devices/$dev/driver)")" = cxl_pci
check cxl-list-rebound sh -c "cxl list -M | grep -q '\"memdev\"' && cxl list -M"
