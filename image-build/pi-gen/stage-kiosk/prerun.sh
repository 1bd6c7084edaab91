#!/bin/bash -e
# pi-gen: start this stage from the previous stage's root (stage2, Raspberry Pi OS Lite).
# The kiosk layer installs wheels for CPython 3.11 on aarch64: Raspberry Pi OS bookworm arm64,
# i.e. pi-gen's bookworm-arm64 branch (its master builds trixie/armhf). And no first-boot
# wizard may ask whoever stands at a keyboard to create a sudo user: pi-gen's
# DISABLE_FIRST_BOOT_USER_RENAME=1 (pi-gen then wants FIRST_USER_PASS; 01-harden locks that
# account). The firewall drops inbound SSH, so ENABLE_SSH=1 would only open it on the card.

if [ "${RELEASE}" != bookworm ] || [ "${ARCH}" != arm64 ]; then
	echo "stage-kiosk: needs RELEASE=bookworm ARCH=arm64 (pi-gen's bookworm-arm64 branch)," \
		"not ${RELEASE}/${ARCH}" >&2
	exit 1
fi
if [ "${DISABLE_FIRST_BOOT_USER_RENAME}" != 1 ]; then
	echo "stage-kiosk: set DISABLE_FIRST_BOOT_USER_RENAME=1 in pi-gen's config, or the first" \
		"boot asks anyone at a keyboard to create a sudo user" >&2
	exit 1
fi
if [ "${ENABLE_SSH:-0}" != 0 ]; then
	echo "stage-kiosk: set ENABLE_SSH=0: the kiosk runs no login service" >&2
	exit 1
fi

if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi
