#!/usr/bin/env bash
# Boot Debian's kernel under qemu (software emulation) with this machine's root mounted read-only
# and run one command inside it; exits with that command's status. For the tests that need a
# real kernel's evdev/uinput, which the build machines' own kernel lacks.
#
# Usage: tests/qemu/run-in-kernel.sh COMMAND [ARG...]     (runs in the current directory)
# Env:   KIOSK_QEMU_CACHE    where the kernel and initramfs are kept (default: build/qemu)
#        KIOSK_QEMU_TIMEOUT  seconds for the whole boot and command (default: 300)
# Exit:  the command's status; 77 when qemu, a static busybox or the kernel package can't be
#        had (callers skip); 124 on timeout; 125 when the guest never reported a status.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${KIOSK_QEMU_CACHE:-$repo/build/qemu}
limit=${KIOSK_QEMU_TIMEOUT:-300}
# Loaded with plain insmod, in this order (dependencies first). loop and vfat: the provisioning
# test mounts a FAT image as the boot partition.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet
9pnet_virtio netfs fscache 9p overlay evdev uinput loop fat vfat nls_cp437 nls_ascii nls_utf8
nls_iso8859_1"

skip() { echo "run-in-kernel: cannot run: $*" >&2; exit 77; }

[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
# Every package, file (SeaBIOS, the option ROMs qemu loads) and command this needs, from the
# one declared list (tools/host-packages.txt); .ci/run installs them.
{ command -v dpkg-query && command -v apt-cache; } >/dev/null || skip "not a Debian system"
bash "$repo/tools/host-packages.sh" check kernel-tests >&2 ||
    skip "host packages missing (tools/host-packages.sh install kernel-tests, as root)"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || skip "busybox missing (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then skip "$busybox is not static (apt-get install busybox-static)"; fi

# The kernel package linux-image-amd64 points at today; never a hard-coded ABI.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || skip "apt-cache knows no linux-image-amd64 (apt-get update?)"
abi=${pkg#linux-image-}
kdir=$cache/$pkg
mkdir -p "$cache"

fetch_kernel() {
    rm -rf "$kdir/dl" && mkdir -p "$kdir/dl"
    (cd "$kdir/dl" && apt-get download "$pkg" >&2) || skip "apt-get download $pkg failed"
}

# Kernel and initramfs from the package; only the .deb, vmlinuz and initrd are kept (~80 MB).
build_boot_files() {
    local work root moddir m rel ko
    work=$(mktemp -d "$cache/build.XXXXXX")
    root=$work/pkg
    dpkg -x "$kdir"/dl/"$pkg"_*.deb "$root"
    depmod -b "$root" "$abi"
    moddir=$root/lib/modules/$abi
    mkdir -p "$work"/initramfs/{bin,dev,proc,sys,lower,rw,newroot,lib/modules}
    cp "$busybox" "$work/initramfs/bin/busybox"
    : >"$work/initramfs/modules"
    for m in $modules; do
        rel=$(awk -v m="$m" -F: '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n);
              gsub(/-/, "_", n); if (n == m) { print $1; exit } }' "$moddir/modules.dep")
        if [ -z "$rel" ]; then
            grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null ||
                echo "run-in-kernel: module $m not found, assuming built in" >&2
            continue
        fi
        ko=$work/initramfs/lib/modules/$m.ko
        case $rel in
            *.ko.xz) xz -dc "$moddir/$rel" >"$ko" ;;
            *.ko.zst) zstd -qdc "$moddir/$rel" >"$ko" ;;
            *.ko.gz) gzip -dc "$moddir/$rel" >"$ko" ;;
            *) cp "$moddir/$rel" "$ko" ;;
        esac
        echo "$m" >>"$work/initramfs/modules"
    done
    cat >"$work/initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"; done
cmdfile=$(sed -n 's/.*kiosk\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower &&
mount -t tmpfs -o size=512m tmpfs /rw && mkdir -p /rw/upper /rw/work &&
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot &&
mount -t proc proc /newroot/proc && mount -t sysfs sysfs /newroot/sys &&
mount -t devtmpfs devtmpfs /newroot/dev &&
mkdir -p /newroot/dev/pts /newroot/dev/shm && mount -t devpts devpts /newroot/dev/pts &&
mount -t tmpfs tmpfs /newroot/dev/shm
if [ $? -eq 0 ]; then
    chroot /newroot /bin/sh "$cmdfile" </dev/null
    rc=$?
    echo
    echo "KIOSK-QEMU-EXIT=$rc"
else
    echo "init: mounting the host root failed"
fi
poweroff -f
INIT
    chmod +x "$work/initramfs/init"
    (cd "$work/initramfs" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) \
        >"$kdir/initrd.img.tmp"
    cp "$root/boot/vmlinuz-$abi" "$kdir/vmlinuz.tmp"
    mv "$kdir/vmlinuz.tmp" "$kdir/vmlinuz"
    mv "$kdir/initrd.img.tmp" "$kdir/initrd.img"
    rm -rf "$work"
}

# One builder at a time; the cache is shared by parallel runs.
exec 9>"$cache/.lock"
flock 9
ls "$kdir"/dl/"$pkg"_*.deb >/dev/null 2>&1 || fetch_kernel
if [ ! -s "$kdir/vmlinuz" ] || [ ! -s "$kdir/initrd.img" ] || [ "$0" -nt "$kdir/initrd.img" ]; then
    build_boot_files
fi
flock -u 9

# The command goes in through a file on the shared host root; output comes back on the console.
run=$(mktemp -d "$cache/run.XXXXXX")
trap 'rm -rf "$run"' EXIT
{
    echo "cd $(printf '%q' "$PWD") || exit 125"
    echo "export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "export PYTHONDONTWRITEBYTECODE=1"
    printf '%q ' "$@"
    echo
} >"$run/cmd.sh"

# -nic none and -vga none: no NIC and no VGA, so no iPXE ROM and no VGA BIOS to find (the
# console is ttyS0, the host root comes over virtio-9p).
set +e
timeout --kill-after=10 "$limit" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 2 \
    -nographic -no-reboot -nic none -vga none -kernel "$kdir/vmlinuz" -initrd "$kdir/initrd.img" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -append "console=ttyS0 quiet panic=-1 kiosk.cmd=$run/cmd.sh" </dev/null | tee "$run/console.log"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 124 ] && { echo "run-in-kernel: timed out after ${limit}s" >&2; exit 124; }
rc=$(tr -d '\r' <"$run/console.log" | sed -n 's/.*KIOSK-QEMU-EXIT=\([0-9][0-9]*\).*/\1/p' | tail -1)
[ -n "$rc" ] || { echo "run-in-kernel: the guest reported no exit status" >&2; exit 125; }
exit "$rc"
