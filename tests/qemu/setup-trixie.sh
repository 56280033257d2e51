#!/bin/bash
# A Debian trixie root for QEMU 11 (its vfio-user-pci client; no bookworm
# QEMU has one) and ndctl's cxl tool, under $QEMU_WORK/trixie: debootstrap
# (minbase) from the mirror the machine already uses, then qemu-system-x86
# from trixie-backports and ndctl. Idempotent and cached: a root that is
# complete (its stamp names what it installed) is used as it is.
# Prints the root on its last line. Needs root (chroot, debootstrap).
set -euo pipefail
WORK=${QEMU_WORK:-$(cd "$(dirname "$0")/../.." && pwd)/target/qemu}
ROOT=$WORK/trixie
STAMP=$ROOT/.pnm-ready
WANT="qemu-system-x86 ndctl"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "$ROOT"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | head -1)
if ! command -v debootstrap > /dev/null; then
    apt-get -qq update && apt-get -qq install -y --no-install-recommends debootstrap > /dev/null
fi
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    rm -rf "$ROOT.tmp"
    debootstrap --variant=minbase trixie "$ROOT.tmp" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { echo "debootstrap failed (log: $WORK/debootstrap.log)" >&2; exit 1; }
    rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
fi
cat > "$ROOT/etc/apt/sources.list.d/trixie-backports.sources" <<EOS
Types: deb
URIs: $MIRROR
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
chroot "$ROOT" apt-get -qq update
chroot "$ROOT" apt-get -qq install -y -t trixie-backports --no-install-recommends $WANT > /dev/null
grep -q vfio-user-pci <<< "$(chroot "$ROOT" qemu-system-x86_64 -device help 2>&1)" \
    || { echo "the trixie root's QEMU has no vfio-user-pci" >&2; exit 1; }
chroot "$ROOT" qemu-system-x86_64 --version | head -1 >&2
echo "$WANT" > "$STAMP"
echo "$ROOT"
