#!/bin/bash -e
# pi-gen, host side: fetch the kiosk wheel and the aarch64 wheels, lay the kiosk's files into
# the root (units, udev rules, sysusers, enabled symlinks). 01-run-chroot.sh installs them.
# KIOSK_IMAGE_BUILD: the kiosk repository's image-build folder (default: this stage's grandparent,
# for STAGE_LIST="stage0 stage1 stage2 /path/to/kiosk/image-build/pi-gen/stage-kiosk").

KIOSK_IMAGE_BUILD="${KIOSK_IMAGE_BUILD:-$(cd ../../.. && pwd)}"
WHEELS="${STAGE_WORK_DIR}/kiosk-wheels"

rm -rf "${WHEELS}"
"${KIOSK_IMAGE_BUILD}/kiosk-layer.sh" --fetch-wheels "${WHEELS}"
"${KIOSK_IMAGE_BUILD}/kiosk-layer.sh" --no-chroot --wheels "${WHEELS}" "${ROOTFS_DIR}"
