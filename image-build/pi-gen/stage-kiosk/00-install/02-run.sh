#!/bin/bash -e
# pi-gen, host side, after 01-run-chroot.sh: the SBOM (CycloneDX JSON) of the image's Python
# environment, written beside the images pi-gen exports.

KIOSK_IMAGE_BUILD="${KIOSK_IMAGE_BUILD:-$(cd ../../.. && pwd)}"

mkdir -p "${DEPLOY_DIR}"
"${KIOSK_IMAGE_BUILD}/kiosk-layer.sh" --sbom "${ROOTFS_DIR}" \
	"${DEPLOY_DIR}/${IMG_FILENAME}-kiosk.cdx.json"
