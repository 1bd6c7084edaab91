#!/usr/bin/env bash
# Builds a Debian bookworm arm64 SD card image with the kiosk preinstalled (Pi 3/4/400/CM4/
# Zero 2 W through Debian's raspi-firmware), on any Linux PC, as root, from Debian's archive only.
#
#   build-debian-image.sh [--mirror URL] [--work DIR] [--overlay DIR] OUT.img
#
# --work DIR   keep the build folder there (default: a temp folder, removed at the end)
# --overlay DIR  copy DIR over the root before it is packed (image-test.sh adds its test units)
# No loop mounts: the boot partition is made by mkfs.vfat -C + mcopy, the root by mkfs.ext4 -d,
# and both are put into the image with sfdisk + dd conv=notrunc. The partitions are mounted by
# PARTUUID (the MBR's disk identifier, chosen here, plus the partition number), never by label:
# a USB stick labelled like the card is not mounted in its place. Writes OUT.cdx.json beside
# the image: the SBOM of its Python environment.
#
# KIOSK_DISK_ID=8 hex digits: the disk identifier (default: random per build).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITE=bookworm
MIRROR="http://deb.debian.org/debian"
WORK=""
OVERLAY=""
BOOT_MIB=256
ROOT_SPARE_MIB=768 # free space on the root for the journal, logs and updates
BOOT_LABEL=RASPIFIRM
ROOT_LABEL=RASPIROOT
DISK_ID=""  # the MBR disk identifier: PARTUUIDs are DISK_ID-01 (boot) and DISK_ID-02 (root)
BOOT_MOUNT_OPTIONS=rw,noatime,umask=0077,nodev,nosuid,noexec,nofail,x-systemd.device-timeout=5min
# procps: /bin/kill, kiosk.service's ExecReload (SIGHUP re-reads the config); minbase lacks it.
PACKAGES=(systemd systemd-sysv systemd-timesyncd systemd-resolved udev kmod dbus procps
	e2fsprogs dosfstools iproute2 ca-certificates linux-image-arm64 raspi-firmware)

log() { printf 'build-image: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

PHASE_START=0
PHASE_NAME=""
phase() { # phase NAME: ends the previous phase (printing its time) and starts the next
	local now
	now="$(date +%s)"
	if [[ -n "${PHASE_NAME}" ]]; then
		printf 'build-image: phase %-22s %4d s\n' "${PHASE_NAME}" $((now - PHASE_START)) >&2
	fi
	PHASE_NAME="$1"
	PHASE_START="${now}"
}

in_root() { chroot "${ROOT}" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }

check_host() {
	[[ "$(id -u)" -eq 0 ]] || die "run as root (debootstrap, chroot and device nodes need it)"
	bash "${HERE}/../tools/host-packages.sh" check image-build ||
		die "host packages missing: tools/host-packages.sh install image-build"
}

# Run arm64 binaries in the chroot through qemu-user-static.
enable_binfmt() {
	if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
		mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	fi
	update-binfmts --enable qemu-aarch64 2>/dev/null || true
	[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || die "binfmt_misc has no qemu-aarch64 entry"
}

bootstrap() {
	debootstrap --arch=arm64 --foreign --variant=minbase "${SUITE}" "${ROOT}" "${MIRROR}"
	install -m 0755 "$(command -v qemu-aarch64-static)" "${ROOT}/usr/bin/qemu-aarch64-static"
	chroot "${ROOT}" /debootstrap/debootstrap --second-stage
	cat >"${ROOT}/etc/apt/sources.list" <<-EOF
		deb ${MIRROR} ${SUITE} main non-free-firmware
		deb ${MIRROR} ${SUITE}-updates main non-free-firmware
		deb http://security.debian.org/debian-security ${SUITE}-security main non-free-firmware
	EOF
	# Daemons must not start inside the build chroot.
	printf '#!/bin/sh\nexit 101\n' >"${ROOT}/usr/sbin/policy-rc.d"
	chmod 0755 "${ROOT}/usr/sbin/policy-rc.d"
	mount_pseudo
}

mount_pseudo() {
	mount -t proc proc "${ROOT}/proc"
	mount -t sysfs sysfs "${ROOT}/sys"
	mount --bind /dev "${ROOT}/dev"
	mount --bind /dev/pts "${ROOT}/dev/pts"
	MOUNTED=1
}

unmount_pseudo() {
	[[ "${MOUNTED:-0}" -eq 1 ]] || return 0
	umount -l "${ROOT}/dev/pts" "${ROOT}/dev" "${ROOT}/sys" "${ROOT}/proc" 2>/dev/null || true
	MOUNTED=0
}

# debootstrap installs the release as it was at its point release; the security archive
# (bookworm-security, in sources.list) and bookworm-updates have newer builds of some of it.
upgrade_base() {
	local upgrades
	upgrades="$(in_root apt-get -s full-upgrade | grep -c '^Inst ' || true)"
	log "security and point updates for the base: ${upgrades} packages"
	in_root apt-get full-upgrade -y -qq -o Dpkg::Options::=--force-confold
}

# Nothing in the finished root may have a newer build in its sources (security archive included).
check_up_to_date() {
	local pending
	pending="$(in_root apt-get -s full-upgrade | grep '^Inst ' || true)"
	[[ -z "${pending}" ]] || die "packages left behind their security updates:
${pending}"
}

# Every package install would rebuild the initramfs (about 15 min under emulation): divert
# update-initramfs to a no-op while installing, then build it once.
install_system() {
	# nofail: the FAT partition has no journal, so a power cut can leave it dirty, and its
	# device can come late; without it the kiosk still boots (into its service, not into an
	# emergency shell nobody may open: root is locked). Only provisioning waits for it.
	cat >"${ROOT}/etc/fstab" <<-EOF
		PARTUUID=${DISK_ID}-02  /               ext4  rw,noatime,errors=remount-ro  0 1
		PARTUUID=${DISK_ID}-01  /boot/firmware  vfat  ${BOOT_MOUNT_OPTIONS}  0 2
	EOF
	mkdir -p "${ROOT}/boot/firmware" "${ROOT}/etc/default"
	# raspi-firmware writes cmdline.txt from this; keep the console off the Pi's UART pins
	# (the vend controller may be there): HDMI only.
	cat >"${ROOT}/etc/default/raspi-firmware" <<-EOF
		ROOTPART=PARTUUID=${DISK_ID}-02
		CONSOLES="tty0"
	EOF
	# Appended to cmdline.txt: SysRq is off from the first instruction, before sysctl.d applies.
	echo "sysctl.kernel.sysrq=0" >"${ROOT}/etc/default/raspi-extra-cmdline"
	echo kiosk >"${ROOT}/etc/hostname"
	in_root dpkg-divert --local --rename --add /usr/sbin/update-initramfs
	ln -sf /bin/true "${ROOT}/usr/sbin/update-initramfs"
	in_root apt-get update -qq
	upgrade_base
	in_root apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
		"${PACKAGES[@]}"
	rm -f "${ROOT}/usr/sbin/update-initramfs"
	in_root dpkg-divert --local --rename --remove /usr/sbin/update-initramfs
	network_config
}

network_config() {
	mkdir -p "${ROOT}/etc/systemd/network"
	cat >"${ROOT}/etc/systemd/network/20-wired.network" <<-EOF
		[Match]
		Name=e*

		[Network]
		DHCP=yes
		LLMNR=no
		MulticastDNS=no

		[DHCPv4]
		UseNTP=no

		[DHCPv6]
		UseNTP=no
	EOF
	in_root systemctl enable systemd-networkd.service systemd-resolved.service \
		systemd-timesyncd.service
	# Without a cable the kiosk should not wait two minutes for network-online.target.
	mkdir -p "${ROOT}/etc/systemd/system/systemd-networkd-wait-online.service.d"
	cat >"${ROOT}/etc/systemd/system/systemd-networkd-wait-online.service.d/kiosk.conf" <<-EOF
		[Service]
		ExecStart=
		ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
	EOF
	# systemd-resolved's postinst points resolv.conf at its stub, which resolves nothing in a
	# chroot: the build uses the host's until finish_root.
	rm -f "${ROOT}/etc/resolv.conf"
	cp -L /etc/resolv.conf "${ROOT}/etc/resolv.conf"
}

build_initramfs() {
	local kver
	kver="$(basename "$(ls -d "${ROOT}"/lib/modules/*)")"
	# The initramfs checks the root before mounting it (cmdline.txt: fsck.repair=yes), which
	# after a power cut is what repairs a filesystem ext4 found damaged. FSTYPE=auto would ask
	# for the type of the root device the build runs on, which a chroot does not have: the fsck
	# hook then leaves fsck out, and the root is never checked ("fsck not present").
	mkdir -p "${ROOT}/etc/initramfs-tools/conf.d"
	echo "FSTYPE=ext4" >"${ROOT}/etc/initramfs-tools/conf.d/kiosk-root-fstype"
	in_root update-initramfs -c -k "${kver}"
	# grep -c reads the whole list: with -q, lsinitramfs could die of SIGPIPE and pipefail fail it.
	in_root lsinitramfs "/boot/initrd.img-${kver}" | grep -c 'sbin/fsck\.ext4$' >/dev/null ||
		die "the initramfs has no fsck.ext4: the root would never be checked"
	# Copies the kernel, initrd and device trees onto the boot partition, writes cmdline.txt.
	in_root /etc/kernel/postinst.d/z50-raspi-firmware "${kver}"
	compgen -G "${ROOT}/boot/firmware/initrd.img*" >/dev/null || die "no initrd on the boot partition"
}

finish_root() {
	check_up_to_date
	in_root apt-get clean
	rm -f "${ROOT}/usr/sbin/policy-rc.d" "${ROOT}/usr/bin/qemu-aarch64-static"
	rm -rf "${ROOT}"/var/lib/apt/lists/* "${ROOT}"/tmp/* "${ROOT}/etc/machine-id"
	ln -sfn ../run/systemd/resolve/stub-resolv.conf "${ROOT}/etc/resolv.conf"
	# An empty machine-id: systemd makes one on first boot (each kiosk its own).
	: >"${ROOT}/etc/machine-id"
	if [[ -n "${OVERLAY}" ]]; then cp -a "${OVERLAY}/." "${ROOT}/"; fi
	unmount_pseudo
}

pack_image() {
	local boot_img="${WORK}/boot.vfat" root_img="${WORK}/root.ext4" root_mib total_mib
	rm -f "${boot_img}" "${root_img}" "${OUT}"
	mkfs.vfat -C -F 32 -n "${BOOT_LABEL}" "${boot_img}" $((BOOT_MIB * 1024)) >/dev/null
	mcopy -s -i "${boot_img}" "${ROOT}"/boot/firmware/* ::/
	# The root's copy of /boot/firmware stays an empty mount point.
	mv "${ROOT}/boot/firmware" "${WORK}/firmware"
	mkdir -m 0755 "${ROOT}/boot/firmware"
	root_mib=$(($(du -sm --apparent-size "${ROOT}" | cut -f1) * 12 / 10 + ROOT_SPARE_MIB))
	mkfs.ext4 -q -L "${ROOT_LABEL}" -d "${ROOT}" "${root_img}" "${root_mib}M"
	rmdir "${ROOT}/boot/firmware"
	mv "${WORK}/firmware" "${ROOT}/boot/firmware"
	total_mib=$((4 + BOOT_MIB + root_mib + 1))
	truncate -s "${total_mib}M" "${OUT}"
	write_partition_table "${OUT}" "${root_mib}"
	dd if="${boot_img}" of="${OUT}" bs=1M seek=4 conv=notrunc,sparse status=none
	dd if="${root_img}" of="${OUT}" bs=1M seek=$((4 + BOOT_MIB)) conv=notrunc,sparse status=none
	rm -f "${boot_img}" "${root_img}"
}

# The MBR: the boot partition (FAT32 LBA, 0x0c) at 4 MiB and the root (0x83) after it, with the
# disk identifier the fstab and cmdline.txt name (sfdisk's label-id).
write_partition_table() { # IMAGE ROOT_MIB
	sfdisk --quiet --no-reread --no-tell-kernel "$1" <<-EOF
		label: dos
		label-id: 0x${DISK_ID}
		unit: sectors

		start=$((4 * 2048)), size=$((BOOT_MIB * 2048)), type=c
		start=$(((4 + BOOT_MIB) * 2048)), size=$(($2 * 2048)), type=83
	EOF
}

# A random disk identifier, or KIOSK_DISK_ID; never 0 (that reads as "no identifier").
choose_disk_id() {
	DISK_ID="${KIOSK_DISK_ID:-$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')}"
	DISK_ID="${DISK_ID,,}"
	[[ "${DISK_ID}" =~ ^[0-9a-f]{8}$ && "${DISK_ID}" != 00000000 ]] ||
		die "disk identifier must be 8 hex digits, not 0: ${DISK_ID}"
}

cleanup() {
	unmount_pseudo
	if [[ -n "${TEMP_WORK:-}" ]]; then rm -rf "${TEMP_WORK}"; fi
}

main() {
	while [[ $# -gt 0 ]]; do
		case "$1" in
		--mirror)
			MIRROR="$2"
			shift
			;;
		--work)
			WORK="$2"
			shift
			;;
		--overlay)
			OVERLAY="$(cd "$2" && pwd)"
			shift
			;;
		-h | --help)
			sed -n '5,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
			exit 0
			;;
		-*) die "unknown option $1" ;;
		*) break ;;
		esac
		shift
	done
	[[ $# -eq 1 ]] || die "usage: build-debian-image.sh [options] OUT.img"
	OUT="$(realpath -m "$1")"
	check_host
	if [[ -z "${WORK}" ]]; then
		TEMP_WORK="$(mktemp -d /var/tmp/kiosk-image.XXXXXX)"
		WORK="${TEMP_WORK}"
	fi
	mkdir -p "${WORK}" "$(dirname "${OUT}")"
	WORK="$(cd "${WORK}" && pwd)"
	ROOT="${WORK}/rootfs"
	[[ ! -e "${ROOT}" ]] || die "${ROOT} exists: remove it or pick another --work"
	trap cleanup EXIT
	local started
	started="$(date +%s)"

	choose_disk_id
	log "disk identifier ${DISK_ID}: boot PARTUUID=${DISK_ID}-01, root PARTUUID=${DISK_ID}-02"
	phase binfmt
	enable_binfmt
	phase debootstrap
	bootstrap
	phase "packages+kernel"
	install_system
	phase "kiosk layer"
	# Wheels are fetched on the host (network, no compiler under emulation).
	bash "${HERE}/kiosk-layer.sh" "${ROOT}"
	bash "${HERE}/kiosk-layer.sh" --sbom "${ROOT}" "${OUT%.img}.cdx.json"
	phase initramfs
	build_initramfs
	phase finish
	finish_root
	phase pack
	pack_image
	phase "done"
	log "image ${OUT}: $(du -h --apparent-size "${OUT}" | cut -f1) ($(du -h "${OUT}" | cut -f1) on disk)"
	log "total $(($(date +%s) - started)) s"
}

# Sourced (the tests call its functions), it builds nothing.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	main "$@"
fi
