#!/usr/bin/env bash
# The kiosk layer of an SD card image: installs the firmware, its units, udev rules and service
# user into a root filesystem folder. Both image builders (build-debian-image.sh, pi-gen) use it.
#
#   kiosk-layer.sh [--no-chroot] [--wheels DIR] ROOT   files into ROOT; then, unless --no-chroot,
#                                                     packages and the venv inside ROOT (chroot)
#   kiosk-layer.sh --fetch-wheels DIR                 host side: the kiosk wheel + aarch64 wheels
#   kiosk-layer.sh --inside                           the package part, run within the target root
#   kiosk-layer.sh --lock                             host side: rewrite requirements/image.lock
#   kiosk-layer.sh --sbom ROOT OUT.cdx.json           host side, after --inside: the SBOM of ROOT's
#                                                     Python environment (CycloneDX JSON)
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
DEBIAN_PACKAGES=(python3 python3-venv python3-evdev python3-serial python3-defusedxml
	ca-certificates)
# Not in bookworm at a usable version (gpiozero 1.6.2, no lgpio, cryptography 38 < 50,
# requests 2.28 on urllib3 1.26 while the kiosk needs urllib3 2.8, paho-mqtt 1.6 < 2.1): aarch64 wheels fetched on
# the host, so nothing is compiled in the emulated chroot.
WHEEL_REQUIREMENTS=("cryptography>=50" "gpiozero>=2.0.1.post3" "lgpio>=0.2.2" "requests>=2.33"
	"urllib3>=2.8" "paho-mqtt>=2.1")

# The wheels above, pinned with their sha256 hashes for the target (aarch64, CPython 3.11, glibc
# 2.36): `kiosk-layer.sh --lock` writes it from WHEEL_REQUIREMENTS; the build downloads and
# installs nothing that is not in it, byte for byte (pip --require-hashes).
LOCK="${PROJECT}/requirements/image.lock"
# The image's Python inventory (pip inspect, with the Debian package behind each system one),
# written by --inside for --sbom on the host.
INVENTORY=/var/cache/kiosk-python-inventory.json
# Firewall (nftables), installed by --inside with the layer's /etc/nftables.conf kept.
HARDENING_PACKAGES=(nftables)
# kiosk.service runs Python with PYTHONOPTIMIZE=2 (python -OO), whose byte code is a file of its
# own (*.opt-2.pyc). The root is read-only when the kiosk runs, so --inside compiles it for every
# module `kiosk run` loads in any configuration (each scanner, lights, vend link, telemetry, the
# clock asked of the kernel).
DAEMON_MODULES=(kiosk.cli kiosk.daemon kiosk.scanner_hold kiosk.telemetry kiosk.mqtt_link
	kiosk.alipay.pinning drivers.scanner_evdev drivers.scanner_serial drivers.scanner_fake
	drivers.indicator_gpio drivers.indicator_fake drivers.vend_serial drivers.vend_relay
	drivers.vend_mdb drivers.vend_fake cryptography.x509 paho.mqtt.client gpiozero.pins.lgpio
	ctypes)
# Consoles a keyboard on a public USB port could reach, and keys that reboot: masked.
MASKED_UNITS=(getty@.service serial-getty@.service autovt@.service console-getty.service
	container-getty@.service getty-static.service debug-shell.service ctrl-alt-del.target)
# Enabled at boot: the firewall, and the wait for the first clock synchronisation that
# kiosk.service is ordered after (through time-sync.target).
SYSINIT_UNITS=(nftables.service systemd-time-wait-sync.service)

log() { printf 'kiosk-layer: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '5,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
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

# pip's options for the target: CPython 3.11 on glibc 2.36 (bookworm), aarch64, wheels only.
# pip does not widen a manylinux tag to older glibc versions by itself; an unlisted tag makes it
# pick lgpio's empty 0.0.0.2 placeholder.
target_flags() {
	local tag
	TARGET_FLAGS=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311
		--abi abi3 --abi none)
	for tag in 2_36 2_35 2_34 2_31 2_28 2_27 2_26 2_17; do
		TARGET_FLAGS+=(--platform "manylinux_${tag}_aarch64")
	done
	TARGET_FLAGS+=(--platform manylinux2014_aarch64 --platform any)
}

# The kiosk wheel (built from a clean copy, so the checkout gets no build/ folder) and the
# aarch64 wheels of what Debian lacks, exactly those of requirements/image.lock (pip refuses a
# file whose sha256 differs, and a dependency the lock does not pin).
fetch_wheels() {
	local out="$1" py src
	py="$(host_python)"
	[[ -f "${LOCK}" ]] || die "no ${LOCK}: run kiosk-layer.sh --lock"
	mkdir -p "${out}"
	src="$(mktemp -d)"
	# shellcheck disable=SC2064  # expand now: src is local
	trap "rm -rf '${src}'" RETURN
	cp -r "${PROJECT}/pyproject.toml" "${PROJECT}/kiosk" "${PROJECT}/drivers" "${src}/"
	if [[ -f "${PROJECT}/README.md" ]]; then cp "${PROJECT}/README.md" "${src}/"; fi
	"${py}" -m pip wheel --quiet --no-deps --wheel-dir "${out}" "${src}"
	target_flags
	"${py}" -m pip download --quiet --dest "${out}" "${TARGET_FLAGS[@]}" \
		--require-hashes -r "${LOCK}"
	cp "${LOCK}" "${out}/image.lock"
	log "wheels in ${out}: $(cd "${out}" && echo *.whl)"
}

# requirements/image.lock from WHEEL_REQUIREMENTS: resolves them for the target, downloads the
# wheels and pins each with the sha256 of the very file the target installs. Run it on purpose
# (a security update, a new requirement) and commit the result.
lock_requirements() {
	local py dl
	py="$(host_python)"
	dl="$(mktemp -d)"
	# shellcheck disable=SC2064  # expand now: dl is local
	trap "rm -rf '${dl}'" RETURN
	target_flags
	"${py}" -m pip download --quiet --dest "${dl}" "${TARGET_FLAGS[@]}" "${WHEEL_REQUIREMENTS[@]}"
	mkdir -p "$(dirname "${LOCK}")"
	"${py}" - "${dl}" "${LOCK}" "${WHEEL_REQUIREMENTS[@]}" <<-'EOF'
		import hashlib, re, sys
		from pathlib import Path

		folder, lock, wanted = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
		lines = [
		    "# The kiosk layer's wheels for the image (aarch64, CPython 3.11, glibc 2.36), each",
		    "# pinned with the sha256 of the file the image installs (pip --require-hashes).",
		    "# Written by `image-build/kiosk-layer.sh --lock`; do not edit by hand.",
		    "# requirements: " + " ".join(wanted),
		]
		for wheel in sorted(folder.glob("*.whl"), key=lambda path: path.name.lower()):
		    name, version = wheel.name.split("-")[:2]
		    name = re.sub(r"[-_.]+", "-", name).lower()
		    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
		    lines += [f"{name}=={version} \\", f"    --hash=sha256:{digest}", f"    # {wheel.name}"]
		lock.write_text("\n".join(lines) + "\n")
	EOF
	log "wrote ${LOCK}"
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
	lay_out_hardening
}

# The system around the kiosk (image-build/hardening/, laid out as is): no console, no SysRq,
# no Ctrl+Alt+Del, a default-deny firewall, unicast DNS only, fixed time servers, and a
# bounded wait for the first clock synchronisation.
lay_out_hardening() {
	local file unit units="${ROOT}/etc/systemd/system"
	while IFS= read -r -d '' file; do
		install_file 0644 "${HERE}/hardening/${file}" "/${file}"
	done < <(cd "${HERE}/hardening" && find . -type f -printf '%P\0')
	chmod 0755 "${ROOT}/etc/nftables.conf" # as Debian ships it: `#!/usr/sbin/nft -f`
	mkdir -p "${units}/sysinit.target.wants"
	for unit in "${MASKED_UNITS[@]}"; do
		ln -sfn /dev/null "${units}/${unit}"
	done
	# systemd's postinst enables a getty on tty1; the mask above already stops it.
	rm -f "${units}/getty.target.wants/getty@tty1.service"
	for unit in "${SYSINIT_UNITS[@]}"; do
		ln -sfn "${UNIT_DIR}/${unit}" "${units}/sysinit.target.wants/${unit}"
	done
}

stage_wheels() {
	local wheels="$1"
	compgen -G "${wheels}/kiosk-*.whl" >/dev/null || die "no kiosk wheel in ${wheels}"
	install -d -m 0755 "${ROOT}${STAGE}/wheels"
	cp "${wheels}"/*.whl "${ROOT}${STAGE}/wheels/"
	[[ -f "${wheels}/image.lock" ]] || die "no image.lock in ${wheels} (made by --fetch-wheels)"
	install -m 0644 "${wheels}/image.lock" "${ROOT}${STAGE}/image.lock"
	install -m 0755 "${BASH_SOURCE[0]}" "${ROOT}${STAGE}/kiosk-layer.sh"
}

# Runs within the target root (chroot under qemu-user-static, or pi-gen's on_chroot).
inside() {
	local wheels="${STAGE}/wheels" compilers
	[[ -d "${wheels}" ]] || die "no staged wheels in ${wheels}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${DEBIAN_PACKAGES[@]}"
	python3 -m venv --system-site-packages "${VENV}"
	install_python_packages "${wheels}"
	"${VENV}/bin/python" -c 'import kiosk.daemon, kiosk.alipay.client, evdev, serial, gpiozero, lgpio'
	compile_for_the_service
	write_python_inventory
	install_hardening_packages
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

# The venv's packages: the lock's wheels, each checked against its hash; then the kiosk wheel
# (built here, so not in the lock) without letting pip fetch anything, and `pip check` proves
# that every requirement of the kiosk and of each wheel is met by what is installed, the
# Debian packages the venv sees included. A missing or too old dependency fails the build.
install_python_packages() {
	local wheels="$1"
	# --ignore-installed: the venv's own copies, never Debian's older ones it can also see.
	"${VENV}/bin/pip" install --quiet --no-cache-dir --no-index --find-links "${wheels}" \
		--ignore-installed --require-hashes -r "${STAGE}/image.lock"
	# --no-deps: its dependencies are the lock's wheels and Debian's python3-* packages, never
	# anything pip would pick; pip check below holds them to the wheel's requirements.
	"${VENV}/bin/pip" install --quiet --no-cache-dir --no-index --no-deps "${wheels}"/kiosk-*.whl
	"${VENV}/bin/pip" check
}

# The service's byte code (see DAEMON_MODULES): importing each module with the Python settings
# of the unit (its Environment=PYTHON* lines, PYTHONOPTIMIZE=2 among them; writing byte code
# allowed) writes its *.opt-2.pyc, and those of the standard library modules it loads.
compile_for_the_service() {
	local imports settings
	imports="$(printf 'import %s\n' "${DAEMON_MODULES[@]}")"
	mapfile -t settings < <(sed -n 's/^Environment=\(PYTHON[A-Z0-9_]*=.*\)$/\1/p' \
		"${UNIT_DIR}/kiosk.service" | grep -v '^PYTHONDONTWRITEBYTECODE=')
	env -u PYTHONDONTWRITEBYTECODE "${settings[@]}" "${VENV}/bin/python" -c "${imports}"
}

# What Python runs the kiosk: pip's inventory of the venv and the system packages it sees, each
# system one with the Debian package that installed it. --sbom turns it into the SBOM.
write_python_inventory() {
	"${VENV}/bin/python" - "${INVENTORY}" <<-'EOF'
		import json, subprocess, sys

		inspect = subprocess.run([sys.executable, "-m", "pip", "inspect"], check=True,
		                         capture_output=True, text=True)
		data = json.loads(inspect.stdout)
		for dist in data["installed"]:
		    location = dist.get("metadata_location", "")
		    if not location.startswith("/usr/lib/python3/"):
		        continue
		    owner = subprocess.run(["dpkg-query", "-S", location], capture_output=True, text=True)
		    if owner.returncode != 0:
		        continue
		    package = owner.stdout.split(": ", 1)[0].split(":", 1)[0]
		    shown = subprocess.run(["dpkg-query", "-W", "-f=${Version} ${Architecture}", package],
		                           check=True, capture_output=True, text=True).stdout.split()
		    dist["debian"] = {"package": package, "version": shown[0], "architecture": shown[1]}
		with open(sys.argv[1], "w", encoding="utf-8") as out:
		    json.dump(data, out, indent=1, sort_keys=True)
	EOF
}

install_hardening_packages() {
	# --force-confold: the layer's /etc/nftables.conf stays (the package's goes to .dpkg-dist).
	apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold \
		"${HARDENING_PACKAGES[@]}"
}

# Host side, after --inside: the CycloneDX SBOM of ROOT's Python environment, next to the image.
write_sbom() {
	local root="$1" out="$2" version
	[[ -f "${root}${INVENTORY}" ]] || die "no ${root}${INVENTORY}: run the layer first"
	version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${PROJECT}/pyproject.toml" | head -1)"
	"$(host_python)" "${HERE}/sbom.py" --inventory "${root}${INVENTORY}" --lock "${LOCK}" \
		--name "$(basename "${out%.cdx.json}")" --version "${version:-0}" --output "${out}"
	rm -f "${root}${INVENTORY}"
	log "SBOM of the image's Python environment: ${out}"
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
		--lock)
			lock_requirements
			return
			;;
		--sbom)
			[[ $# -eq 3 ]] || usage
			write_sbom "$(cd "$2" && pwd)" "$(realpath -m "$3")"
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
