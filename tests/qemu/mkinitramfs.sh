#!/bin/bash
# usage: mkinitramfs.sh KERNEL_DIR OUT.cpio.gz FILE...
# env:   GUEST_MODULES (default: VFIO's); GUEST_ROOT, a root (trixie's)
#        whose programs among FILEs bring their libraries from it (they
#        replace the host's: trixie's C library runs the host's programs)
# A busybox-static initramfs: /init and the guest suite from tests/qemu/guest,
# the kernel modules VFIO needs (with their dependencies, decompressed), and
# FILEs (guest programs, with the shared libraries they link, and data)
# copied into /bin or /data by extension.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KDIR=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
KVER=$(ls "$KDIR/lib/modules")
MROOT=$KDIR/lib/modules/$KVER
[ -f "$MROOT/modules.dep" ] || busybox depmod -b "$KDIR" "$KVER"
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,data,etc,lib/modules/"$KVER"}
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
: > "$ROOT/etc/modules"
declare -A seen
add_module() { # a module path relative to MROOT, after its dependencies
    local rel=$1 dep dst
    [ -n "${seen[$rel]:-}" ] && return
    seen[$rel]=1
    for dep in $(grep -m1 "^$rel:" "$MROOT/modules.dep" | cut -d: -f2 | tr ' ' '\n' | tac); do
        add_module "$dep"
    done
    dst=$ROOT/lib/modules/$KVER/${rel%.xz}
    mkdir -p "$(dirname "$dst")"
    case $rel in
        *.xz) xz -dc "$MROOT/$rel" > "$dst" ;;
        *) cp "$MROOT/$rel" "$dst" ;;
    esac
    echo "/lib/modules/$KVER/${rel%.xz}" >> "$ROOT/etc/modules"
}
for m in ${GUEST_MODULES:-vfio vfio_iommu_type1 vfio-pci}; do
    pattern=$(echo "$m" | sed 's/[-_]/[-_]/g')
    rel=$(grep -m1 -E "(^|/)$pattern\.ko(\.xz)?:" "$MROOT/modules.dep" | cut -d: -f1) \
        || { echo "kernel module $m not found" >&2; exit 1; }
    add_module "$rel"
done
install -m 755 "$HERE/guest/init" "$ROOT/init"
for s in "$HERE"/guest/*.sh; do install -m 755 "$s" "$ROOT/$(basename "$s")"; done
LIBROOT=${GUEST_ROOT:-}
for f in "$@"; do
    case $f in
        *.npy|*.safetensors|*.json) cp "$f" "$ROOT/data/" ;;
        *)
            install -m 755 "$f" "$ROOT/bin/$(basename "$f")"
            # A dynamically linked program brings the host's libraries (same
            # architecture and C library as the guest needs), at their paths.
            # A program of GUEST_ROOT (trixie's cxl) brings that root's.
            if [ -n "$LIBROOT" ] && [ "${f#"$LIBROOT"/}" != "$f" ]; then
                from=$LIBROOT
                libs=$(chroot "$LIBROOT" ldd "${f#"$LIBROOT"}" 2>/dev/null | grep -o '/[^ ]*' || true)
            else
                from=
                libs=$(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true)
            fi
            for lib in $libs; do
                mkdir -p "$ROOT$(dirname "$lib")"
                # The root's replace the host's; the host's never the root's.
                if [ -n "$from" ] || [ ! -e "$ROOT$lib" ]; then
                    cp -L "$from$lib" "$ROOT$lib"
                fi
            done
            ;;
    esac
done
(cd "$ROOT" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$OUT")
echo "initramfs $OUT: $(du -h "$OUT" | cut -f1)" >&2
