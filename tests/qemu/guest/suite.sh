#!/bin/sh
# The guest suite: finds the PNM device (ivshmem-doorbell, 1af4:1110 with an
# MSI-X BAR1) and drives it with the same pnmctl as on the host. Each check
# prints "CHECK <name> ok" or "CHECK <name> FAIL"; the host side reads them.
for m in $(cat /etc/modules); do insmod "$m" || echo "insmod $m failed"; done
dev=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor):$(cat $d/device)" = "0x1af4:0x1110" ] \
        && [ "$(sed -n 2p $d/resource)" != "0x0000000000000000 0x0000000000000000 0x0000000000000000" ]; then
        dev=${d##*/}
    fi
done
check() { # name command...
    name=$1; shift
    if out=$("$@" 2>&1); then echo "CHECK $name ok"; else echo "CHECK $name FAIL"; fi
    echo "$out" | sed "s/^/  $name: /"
}
[ -n "$dev" ] || { echo "CHECK device-found FAIL (no ivshmem-doorbell)"; exit 0; }
echo "CHECK device-found ok $dev"
echo "PNM_BARS $(sed -n '1,3p' /sys/bus/pci/devices/$dev/resource | tr '\n' ' ')"
bar2=/sys/bus/pci/devices/$dev/resource2
check identify pnmctl --device "$bar2" --wait-ms 5000 identify
check pnm-info pnmctl --device "$bar2" --json pnm-info
