#!/bin/bash
# Installs what the QEMU harness needs, idempotently, without editing
# /etc/apt: QEMU 10.x and busybox-static from bookworm-backports (an apt
# source list of our own, on the mirror the machine already uses), and a
# Debian cloud kernel extracted (not installed) under $QEMU_WORK.
# Prints the kernel directory on its last line.
set -euo pipefail
WORK=${QEMU_WORK:-$(cd "$(dirname "$0")/../.." && pwd)/target/qemu}
mkdir -p "$WORK"/apt/parts "$WORK"/apt/lists/partial "$WORK"/debs
export DEBIAN_FRONTEND=noninteractive
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | head -1)
cp /etc/apt/sources.list.d/debian.sources "$WORK/apt/parts/"
cat > "$WORK/apt/parts/bookworm-backports.sources" <<EOS
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$WORK/apt/parts"
     -o "Dir::State::Lists=$WORK/apt/lists" -o APT::Sandbox::User=root)
have_qemu() { # whole outputs into grep: under pipefail an early grep -q fails the writer
    command -v qemu-system-x86_64 >/dev/null \
        && grep -q ivshmem-doorbell <<< "$(qemu-system-x86_64 -device help 2>/dev/null)" \
        && [ -x /bin/busybox ] && grep -qx cpio <<< "$(busybox --list)"
}
if ! have_qemu || ! ls "$WORK"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    apt-get "${APT[@]}" -qq update
fi
if ! have_qemu; then
    # 10.x from backports: it matches the machine's qemu-utils (bookworm's
    # 7.2 would replace them) and boots the 6.12 kernel reliably under TCG.
    apt-get "${APT[@]}" -qq install -y -t bookworm-backports --no-install-recommends \
        qemu-system-x86 busybox-static >/dev/null
fi
if ! ls "$WORK"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    # Download and extract only: installing linux-image pulls systemd and udev.
    PKG=$(apt-cache "${APT[@]}" -o APT::Default-Release=bookworm-backports \
        depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    (cd "$WORK/debs" && apt-get "${APT[@]}" -qq download "$PKG")
    rm -rf "$WORK/kernel.tmp" && mkdir -p "$WORK/kernel.tmp"
    dpkg -x "$WORK"/debs/"${PKG}"_*.deb "$WORK/kernel.tmp"
    rm -rf "$WORK/kernel" && mv "$WORK/kernel.tmp" "$WORK/kernel"
fi
qemu-system-x86_64 --version | head -1 >&2
echo "$WORK/kernel"
