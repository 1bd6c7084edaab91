#!/usr/bin/env bash
# The kiosk layer of an SD card image: installs the firmware, its units, udev rules and service
# user into a root filesystem folder. Both image builders (build-debian-image.sh, pi-gen) use it.
#
#   kiosk-layer.sh [--no-chroot] [--wheels DIR] ROOT   files into ROOT; then, unless --no-chroot,
#                                                     packages and the venv inside ROOT (chroot)
#   kiosk-layer.sh --fetch-wheels DIR                 host side: the kiosk wheel + aarch64 wheels
#   kiosk-layer.sh --inside                           the package part, run within the target root
#
# --no-chroot lays out the files only (and stages --wheels DIR if given): the fast tests use it
# on a plain temp folder, pi-gen's 00-run.sh uses it before its 01-run-chroot.sh runs --inside.
# Environment: PYTHON (host python with pip; default: the project's .venv, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(cd "${HERE}/.." && pwd)"
VENV=/opt/kiosk
STAGE=/var/cache/kiosk-layer # wheels and this script, inside the root, during the build
UNIT_DIR=/usr/lib/systemd/system
# Debian bookworm ships these; the venv sees them through --system-site-packages. evdev has no
# aarch64 wheel on PyPI and compiling under emulation is slow, so Debian's build is used.
# Debian's cryptography links the system's OpenSSL, the one `ssl` loads: one OpenSSL in the
# kiosk's memory, not a second copy inside a wheel, and Debian's security updates for both.
DEBIAN_PACKAGES=(python3 python3-venv python3-evdev python3-serial python3-defusedxml
	python3-cryptography ca-certificates)
CRYPTOGRAPHY_MIN=38.0 # pyproject.toml's minimum; bookworm ships 38.0.4
# Not in bookworm at a usable version (gpiozero 1.6.2, no lgpio, requests 2.28 on urllib3 1.26
# while the kiosk needs urllib3 2): aarch64 wheels fetched on the host, so nothing is compiled
# in the emulated chroot.
WHEEL_REQUIREMENTS=("gpiozero>=2.0.1.post3" "lgpio>=0.2.2" "requests>=2.31" "urllib3>=2")

log() { printf 'kiosk-layer: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '5,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

host_python() {
	if [[ -n "${PYTHON:-}" ]]; then
		echo "${PYTHON}"
	elif [[ -x "${PROJECT}/.venv/bin/python" ]]; then
		echo "${PROJECT}/.venv/bin/python"
	else
		echo python3
	fi
}

# The kiosk wheel (built from a clean copy, so the checkout gets no build/ folder) and the
# aarch64 wheels of what Debian lacks, for CPython 3.11 on glibc 2.36 (bookworm).
fetch_wheels() {
	local out="$1" py src platforms=() tag
	py="$(host_python)"
	mkdir -p "${out}"
	src="$(mktemp -d)"
	# shellcheck disable=SC2064  # expand now: src is local
	trap "rm -rf '${src}'" RETURN
	cp -r "${PROJECT}/pyproject.toml" "${PROJECT}/kiosk" "${PROJECT}/drivers" "${src}/"
	if [[ -f "${PROJECT}/README.md" ]]; then cp "${PROJECT}/README.md" "${src}/"; fi
	"${py}" -m pip wheel --quiet --no-deps --wheel-dir "${out}" "${src}"
	# pip does not widen a manylinux tag to older glibc versions by itself; an unlisted tag
	# makes it pick lgpio's empty 0.0.0.2 placeholder.
	for tag in 2_36 2_35 2_34 2_31 2_28 2_27 2_26 2_17; do
		platforms+=(--platform "manylinux_${tag}_aarch64")
	done
	"${py}" -m pip download --quiet --dest "${out}" --only-binary=:all: \
		--implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
		"${platforms[@]}" --platform manylinux2014_aarch64 --platform any \
		"${WHEEL_REQUIREMENTS[@]}"
	log "wheels in ${out}: $(cd "${out}" && echo *.whl)"
}

install_file() { # MODE SOURCE DEST (DEST relative to ROOT)
	install -D -m "$1" "$2" "${ROOT}$3"
}

# Everything that is a file: no package manager, no chroot, works on any folder.
lay_out_files() {
	local unit
	for unit in kiosk.service kiosk-provision.service; do
		install_file 0644 "${PROJECT}/systemd/${unit}" "${UNIT_DIR}/${unit}"
		# What `systemctl enable` does, without needing systemctl for the target.
		mkdir -p "${ROOT}/etc/systemd/system/multi-user.target.wants"
		ln -sfn "${UNIT_DIR}/${unit}" "${ROOT}/etc/systemd/system/multi-user.target.wants/${unit}"
	done
	install_file 0644 "${PROJECT}/systemd/sysusers.d/kiosk.conf" /usr/lib/sysusers.d/kiosk.conf
	install_file 0644 "${PROJECT}/systemd/tmpfiles.d/kiosk.conf" /usr/lib/tmpfiles.d/kiosk.conf
	install_file 0644 "${PROJECT}/systemd/udev/rules.d/60-kiosk.rules" \
		/usr/lib/udev/rules.d/60-kiosk.rules
	install_file 0644 "${HERE}/README.md" "${VENV}/share/README.md"
	# ModemManager probes ttyACM devices and corrupts the vend link: masked even if installed later.
	mkdir -p "${ROOT}/etc/systemd/system"
	ln -sfn /dev/null "${ROOT}/etc/systemd/system/ModemManager.service"
	install -d -m 0755 "${ROOT}/etc/kiosk"
	install -d -m 0750 "${ROOT}/etc/kiosk/keys"
	install -d -m 0700 "${ROOT}/var/lib/kiosk"
}

stage_wheels() {
	local wheels="$1"
	compgen -G "${wheels}/kiosk-*.whl" >/dev/null || die "no kiosk wheel in ${wheels}"
	install -d -m 0755 "${ROOT}${STAGE}/wheels"
	cp "${wheels}"/*.whl "${ROOT}${STAGE}/wheels/"
	install -m 0755 "${BASH_SOURCE[0]}" "${ROOT}${STAGE}/kiosk-layer.sh"
}

# Runs within the target root (chroot under qemu-user-static, or pi-gen's on_chroot).
inside() {
	local wheels="${STAGE}/wheels" compilers
	[[ -d "${wheels}" ]] || die "no staged wheels in ${wheels}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${DEBIAN_PACKAGES[@]}"
	python3 -m venv --system-site-packages "${VENV}"
	# --ignore-installed: the venv's own copies, never Debian's older ones it can also see.
	"${VENV}/bin/pip" install --quiet --no-cache-dir --no-index --find-links "${wheels}" \
		--ignore-installed "${WHEEL_REQUIREMENTS[@]}"
	# --no-deps: evdev comes from Debian (1.6.1), older than pyproject's pin.
	"${VENV}/bin/pip" install --quiet --no-cache-dir --no-index --no-deps "${wheels}"/kiosk-*.whl
	"${VENV}/bin/python" -c 'import kiosk.daemon, kiosk.alipay.client, evdev, serial, gpiozero, lgpio'
	check_cryptography
	# Nothing probes serial ports, nothing compiles on the kiosk.
	if dpkg-query -W -f='${Status}' modemmanager 2>/dev/null | grep -q 'ok installed'; then
		apt-get purge -y modemmanager
	fi
	compilers="$(dpkg-query -W -f='${Package} ${Status}\n' 2>/dev/null |
		awk '$NF == "installed" && $1 ~ /^(gcc|g\+\+|cpp|clang|build-essential)(-[0-9.]+)?$/ {print $1}')"
	if [[ -n "${compilers}" ]]; then
		# shellcheck disable=SC2086  # one package per word
		apt-get purge -y ${compilers}
	fi
	systemd-sysusers /usr/lib/sysusers.d/kiosk.conf
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/kiosk.conf
	apt-get clean
	rm -rf "${STAGE}"
}

# The venv's cryptography is Debian's, new enough, and signs through the system's libcrypto.
check_cryptography() {
	"${VENV}/bin/python" - "${CRYPTOGRAPHY_MIN}" <<-'EOF'
		import sys
		import cryptography
		from cryptography.hazmat.primitives import hashes
		from cryptography.hazmat.primitives.asymmetric import padding, rsa

		def version(text):
		    return tuple(int(part) for part in text.split(".")[:2])

		where, found = cryptography.__file__, cryptography.__version__
		if not where.startswith("/usr/lib/python3/dist-packages/"):
		    sys.exit(f"cryptography {found} from {where}, not Debian's python3-cryptography")
		if version(found) < version(sys.argv[1]):
		    sys.exit(f"cryptography {found} is older than the kiosk's minimum {sys.argv[1]}")
		key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
		key.sign(b"kiosk", padding.PKCS1v15(), hashes.SHA256())
		with open("/proc/self/maps") as maps:
		    libcrypto = {line.split()[-1] for line in maps if "/libcrypto.so" in line}
		if not libcrypto:
		    sys.exit("cryptography signed without the system's libcrypto: a second OpenSSL")
		print(f"kiosk-layer: cryptography {found} (Debian) on {' '.join(sorted(libcrypto))}")
	EOF
}

main() {
	local chroot=1 wheels=""
	[[ $# -gt 0 ]] || usage
	while [[ $# -gt 0 ]]; do
		case "$1" in
		--fetch-wheels)
			[[ $# -eq 2 ]] || usage
			fetch_wheels "$2"
			return
			;;
		--inside)
			inside
			return
			;;
		--no-chroot) chroot=0 ;;
		--wheels)
			[[ $# -ge 2 ]] || usage
			wheels="$(cd "$2" && pwd)"
			shift
			;;
		-h | --help) usage ;;
		-*) usage ;;
		*) break ;;
		esac
		shift
	done
	[[ $# -eq 1 ]] || usage
	[[ -d "$1" ]] || die "not a folder: $1"
	ROOT="$(cd "$1" && pwd)"
	[[ "${ROOT}" != / ]] || die "refusing to lay out into / (use --inside within a root)"

	lay_out_files
	if [[ "${chroot}" -eq 0 ]]; then
		[[ -z "${wheels}" ]] || stage_wheels "${wheels}"
		log "files laid out in ${ROOT} (no chroot)"
		return
	fi
	if [[ -z "${wheels}" ]]; then
		wheels="$(mktemp -d)"
		# shellcheck disable=SC2064  # expand now: wheels is local
		trap "rm -rf '${wheels}'" EXIT
		fetch_wheels "${wheels}"
	fi
	stage_wheels "${wheels}"
	# A clean environment: the host's PIP_*/LANG settings mean nothing in the target.
	chroot "${ROOT}" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
		LC_ALL=C.UTF-8 /bin/bash "${STAGE}/kiosk-layer.sh" --inside
	log "kiosk installed in ${ROOT}"
}

main "$@"
