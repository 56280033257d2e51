#!/bin/sh
# The CXL guest suite: the device as a PCI function over vfio-user (class
# 050210h, a CXL memory device). Linux's own cxl_pci binds it, with no
# line of the project's driver involved; ndctl's cxl tool manages it.
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
check cxl-probe-clean sh -c "! dmesg | grep -iE 'cxl.*(error|fail|timeout)|$dev.*(error|fail)'"
# Listed even while disabled (-i): cxl_mem binds a memdev only below a
# CXL port topology, which a plain PCIe root port is not.
check cxl-list cxl list -M -i
check cxl-list-health cxl list -M -i -H
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
