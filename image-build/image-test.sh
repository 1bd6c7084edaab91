#!/usr/bin/env bash
# The image's boot test (`make image-test`): builds the Debian arm64 image, drops a provisioning
# config and fresh test keys on its boot partition, boots it twice under qemu-system-aarch64
# (TCG) and reads the verdict of a test-only check unit from the serial console.
#
#   image-test.sh [--reuse]   --reuse: boot the image and card files of the last run again
#                             (for iterating on the checks; CI always builds)
#   image-test.sh --check-host   build nothing: check every host package, file and command the
#                             build and the boots need (tools/host-packages.txt, groups
#                             image-build and image-boot), and start qemu-system-aarch64 paused
#                             with the boot's machine and devices, which proves it finds every
#                             ROM and firmware file it loads
#
# In the guest, under real systemd: provisioning ran and took the secrets off the boot
# partition; kiosk.service became active (READY=1) with its hardening in force; a hung main
# loop (SIGSTOP) is killed by the watchdog and restarted; systemctl reload keeps the same
# process; the journal in /var/lib/kiosk survives a reboot; the live `systemd-analyze
# security` exposure is printed.
# Needs root (debootstrap, chroot). Must fit in 30 minutes on 2 cores with nothing cached.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(cd "${HERE}/.." && pwd)"
OUT="${KIOSK_IMAGE_OUT:-${HERE}/out}"
REUSE=0
BOOT_TIMEOUT_S=900 # one guest boot, checks included; TCG is slow but not that slow
HOST_GROUPS=(image-build image-boot) # in tools/host-packages.txt
export MTOOLS_SKIP_CHECK=1

log() { printf 'image-test: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

PHASE_START=0
PHASE_NAME=""
TIMINGS=()
phase() {
	local now
	now="$(date +%s)"
	if [[ -n "${PHASE_NAME}" ]]; then
		TIMINGS+=("$(printf '%-14s %4d s' "${PHASE_NAME}" $((now - PHASE_START)))")
		log "phase ${TIMINGS[-1]}"
	fi
	PHASE_NAME="$1"
	PHASE_START="${now}"
}

# Per package and per file, not per command: a present qemu-system-aarch64 says nothing about
# the files it loads. Installs only what is missing and says what it installed.
install_tools() {
	bash "${PROJECT}/tools/host-packages.sh" install "${HOST_GROUPS[@]}"
}

host_python() {
	if [[ -x "${PROJECT}/.venv/bin/python" ]]; then
		echo "${PROJECT}/.venv/bin/python"
	else
		echo python3
	fi
}

# What a technician puts on the card: the config and freshly made keys. The simulator's own
# (Alipay side) private key goes into the test overlay, never onto the card.
make_card_files() {
	local card="$1" overlay="$2"
	mkdir -p "${card}" "${overlay}/etc/kiosk-test"
	"$(host_python)" - "${card}" "${overlay}/etc/kiosk-test" <<-'EOF'
		import os, sys
		from cryptography.hazmat.primitives import serialization as ser
		from cryptography.hazmat.primitives.asymmetric import rsa

		card, sim = sys.argv[1], sys.argv[2]

		def write(path, data, mode):
		    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
		    with os.fdopen(fd, "wb") as file:
		        file.write(data)

		def private_pem(key):
		    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())

		merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
		alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
		write(f"{card}/merchant_private_key.pem", private_pem(merchant), 0o600)
		write(f"{card}/alipay_public_key.pem", alipay.public_key().public_bytes(
		    ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo), 0o644)
		write(f"{sim}/alipay_private_key.pem", private_pem(alipay), 0o600)
	EOF
	cat >"${card}/kiosk.toml" <<-'EOF'
		# Image test: fake devices, the gateway simulator on the guest's loopback.
		[kiosk]
		terminal_id = "IMAGE-TEST"
		state_dir = "/var/lib/kiosk"

		[alipay]
		gateway = "http://127.0.0.1:8080/gateway.do"
		allow_http = true
		partner = "2088101122334455"
		sign_type = "RSA2"
		private_key_file = "merchant_private_key.pem"
		alipay_public_key_file = "alipay_public_key.pem"
		currency = "USD"

		[merchant]
		secondary_merchant_id = "M-TEST"
		secondary_merchant_name = "Image test"
		secondary_merchant_industry = "5814"
		store_id = "S-TEST"
		store_name = "Image test"

		[sale]
		mode = "fixed"
		price = "1.50"
		item = "coffee"

		[scanner]
		driver = "fake"

		[indicators]
		driver = "fake"

		[vend]
		driver = "fake"
	EOF
}

# Test-only units: the gateway simulator, and the check that reports and powers off.
make_overlay() {
	local overlay="$1" units="$1/etc/systemd/system"
	mkdir -p "${units}/multi-user.target.wants" "${overlay}/usr/local/lib/kiosk-image-test"
	cat >"${units}/kiosk-test-gateway.service" <<-'EOF'
		[Unit]
		Description=Image test: Alipay gateway simulator on loopback
		After=kiosk-provision.service
		Before=kiosk.service

		[Service]
		ExecStart=/opt/kiosk/bin/kiosk simulator --config /etc/kiosk/kiosk.toml \
		    --listen 127.0.0.1:8080 --alipay-private-key /etc/kiosk-test/alipay_private_key.pem

		[Install]
		WantedBy=multi-user.target
	EOF
	cat >"${units}/kiosk-image-test.service" <<-'EOF'
		[Unit]
		Description=Image test: check the kiosk and power off
		After=kiosk.service kiosk-provision.service kiosk-test-gateway.service

		[Service]
		Type=oneshot
		ExecStart=/bin/bash /usr/local/lib/kiosk-image-test/check.sh
		StandardOutput=journal+console
		StandardError=journal+console

		[Install]
		WantedBy=multi-user.target
	EOF
	ln -sfn /etc/systemd/system/kiosk-test-gateway.service \
		"${units}/multi-user.target.wants/kiosk-test-gateway.service"
	ln -sfn /etc/systemd/system/kiosk-image-test.service \
		"${units}/multi-user.target.wants/kiosk-image-test.service"
	install -m 0755 /dev/stdin "${overlay}/usr/local/lib/kiosk-image-test/check.sh" <<-'EOF'
		#!/bin/bash
		# Inside the guest: check this boot, print KIOSK-TEST lines on the console, power off.
		set -u
		MARK=/var/lib/kiosk-image-test
		mkdir -p "${MARK}"
		pass() { echo "KIOSK-TEST PASS $1 ${2:-}"; }
		fail() { echo "KIOSK-TEST FAIL $1 ${2:-}"; }
		check() { # NAME DETAIL COMMAND...
		    local name="$1" detail="$2"; shift 2
		    if "$@"; then pass "${name}" "${detail}"; else fail "${name}" "${detail}"; fi
		}
		prop() { systemctl show -p "$2" --value "$1"; }
		wait_for() { # SECONDS COMMAND...
		    local deadline=$((SECONDS + $1)); shift
		    until "$@"; do
		        [ "${SECONDS}" -ge "${deadline}" ] && return 1
		        sleep 1
		    done
		}
		kiosk_active() { [ "$(prop kiosk.service ActiveState)" = active ]; }
		kiosk_figures() { # for comparison between runs: emulated, so not absolute
		    local pid start ready
		    pid="$(prop kiosk.service MainPID)"
		    start="$(prop kiosk.service ExecMainStartTimestampMonotonic)"
		    ready="$(prop kiosk.service ActiveEnterTimestampMonotonic)"
		    echo "KIOSK-TEST-INFO boot${boot} kiosk run: start to READY=1 \
		$(awk -v a="${start}" -v b="${ready}" 'BEGIN { printf "%.2f", (b - a) / 1e6 }') s, \
		$(grep -E '^(VmHWM|VmRSS|Threads):' "/proc/${pid}/status" | tr -s '\t\n' '  ')"
		    echo "KIOSK-TEST-INFO boot${boot} OpenSSL mapped by kiosk run: \
		$(grep -oE '/[^ ]*lib(crypto|ssl)[^ ]*' "/proc/${pid}/maps" | sort -u | tr '\n' ' ')"
		}
		as_kiosk() { runuser -u kiosk -- "$@"; }
		journal_json() { as_kiosk /opt/kiosk/bin/kiosk journal --json --all --config /etc/kiosk/kiosk.toml; }

		boot=1
		[ -e "${MARK}/boot1" ] && boot=2
		echo "KIOSK-TEST BOOT ${boot}"
		started=${SECONDS}
		check "boot${boot}-kiosk-ready" "READY=1 after $((SECONDS - started)) s of waiting" \
		    wait_for 300 kiosk_active
		kiosk_active && kiosk_figures
		journalctl -b -u kiosk.service -u kiosk-provision.service --no-pager -n 30 \
		    | sed 's/^/KIOSK-TEST-LOG /'

		if [ "${boot}" = 1 ]; then
		    check provision-ran "$(prop kiosk-provision.service Result)" \
		        test "$(prop kiosk-provision.service Result)" = success
		    check boot-secrets-removed "$(cd /boot/firmware && echo *)" \
		        test ! -e /boot/firmware/merchant_private_key.pem -a ! -e /boot/firmware/kiosk.toml \
		        -a -e /boot/firmware/kiosk.toml.provisioned
		    key_mode="$(stat -c '%U %a' /etc/kiosk/keys/merchant_private_key.pem 2>&1)"
		    check key-owner-only "${key_mode}" test "${key_mode}" = "kiosk 600"

		    pid="$(prop kiosk.service MainPID)"
		    status="$(grep -E '^(NoNewPrivs|Seccomp|CapEff|Groups):' "/proc/${pid}/status" | tr -s '\t\n' '  ')"
		    check hardening-in-force "${status}" \
		        grep -qE 'CapEff: 0+ NoNewPrivs: 1 Seccomp: 2 ' <<<"${status}"
		    exposure="$(systemd-analyze security --no-pager kiosk.service | tail -1)"
		    echo "KIOSK-TEST-INFO live ${exposure}"
		    score="$(grep -oE '[0-9]+\.[0-9]+' <<<"${exposure}" | head -1)"
		    check live-exposure-at-most-2 "${score}" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.0) }'

		    # systemctl reload runs the unit's ExecReload (/bin/kill -HUP): the config is re-read
		    # by the same process.
		    reload_out="$(systemctl reload kiosk.service 2>&1)"
		    reload_rc=$?
		    wait_for 30 kiosk_active
		    check reload-same-process "rc ${reload_rc} ${reload_out}" \
		        test "${reload_rc}" = 0 -a "$(prop kiosk.service MainPID)" = "${pid}"

		    restarts="$(prop kiosk.service NRestarts)"
		    kill -STOP "${pid}"
		    restarted() {
		        [ "$(prop kiosk.service NRestarts)" -gt "${restarts}" ] && kiosk_active &&
		            [ "$(prop kiosk.service MainPID)" != "${pid}" ]
		    }
		    started=${SECONDS}
		    wait_for 300 restarted
		    result=$?
		    why="$(journalctl -b -u kiosk.service --no-pager | grep -ciE 'watchdog timeout')"
		    check watchdog-restart "NRestarts ${restarts} -> $(prop kiosk.service NRestarts) in \
		$((SECONDS - started)) s, watchdog timeouts logged: ${why}" test "${result}" = 0 -a "${why}" -ge 1

		    find /var/lib/kiosk -type f -printf '%P\n' | sort >"${MARK}/files"
		    journal_json >"${MARK}/journal.json" 2>"${MARK}/journal.err"
		    check journal-written "$(tr '\n' ' ' <"${MARK}/files")" test -s "${MARK}/files"
		    touch "${MARK}/boot1"
		else
		    now_files="$(find /var/lib/kiosk -type f -printf '%P\n' | sort)"
		    missing="$(comm -23 "${MARK}/files" <(echo "${now_files}") | tr '\n' ' ')"
		    check journal-survived-reboot "missing: ${missing:-none}" test -z "${missing}"
		    check journal-readable-after-reboot "same transactions as before the reboot" \
		        cmp -s "${MARK}/journal.json" <(journal_json 2>/dev/null)
		fi
		echo "KIOSK-TEST END ${boot}"
		systemctl poweroff --no-block
	EOF
}

partition_start() { # IMAGE N -> byte offset of partition N
	parted -ms "$1" unit B print | awk -F: -v n="$2" '$1 == n { sub(/B$/, "", $2); print $2 }'
}

provision_card() {
	local boot kernel initrd
	boot="${IMAGE}@@$(partition_start "${IMAGE}" 1)"
	mcopy -o -i "${boot}" "${CARD}/kiosk.toml" "${CARD}/merchant_private_key.pem" \
		"${CARD}/alipay_public_key.pem" ::/
	kernel="$(mdir -b -i "${boot}" ::/ | sed 's#^::/##' | grep -m1 '^vmlinuz')" ||
		die "no kernel on the boot partition"
	initrd="$(mdir -b -i "${boot}" ::/ | sed 's#^::/##' | grep -m1 '^initrd.img')" ||
		die "no initrd on the boot partition"
	mcopy -o -i "${boot}" "::/${kernel}" "${WORK}/vmlinuz"
	mcopy -o -i "${boot}" "::/${initrd}" "${WORK}/initrd.img"
}

# The guest machine, shared by the boots and --check-host. The NIC gets no option ROM
# (romfile=): the guest kernel and initrd are passed with -kernel/-initrd and nothing
# network-boots, so the iPXE ROM (efi-virtio.rom, from ipxe-qemu, only a Recommends of
# qemu-system-arm) would never run, yet without romfile= qemu refuses to start when it is
# absent. With it, -M virt and these devices load no file at all from qemu's data folders.
qemu_machine() { # DISK
	QEMU_MACHINE=(-M virt -cpu cortex-a72 -smp 2 -m 1024 -accel tcg
		-drive "file=$1,format=raw,if=virtio"
		-device virtio-rng-pci
		-netdev "user,id=net0,restrict=on" -device "virtio-net-pci,netdev=net0,romfile=")
}

boot_guest() { # N
	local console="${OUT}/console-boot$1.log"
	log "boot $1: serial console in ${console}"
	qemu_machine "${IMAGE}"
	timeout --foreground -k 10 "${BOOT_TIMEOUT_S}" qemu-system-aarch64 "${QEMU_MACHINE[@]}" \
		-nographic -no-reboot -monitor none -serial stdio \
		-kernel "${WORK}/vmlinuz" -initrd "${WORK}/initrd.img" \
		-append "root=LABEL=RASPIROOT rw console=ttyAMA0 panic=-1 systemd.show_status=auto" \
		</dev/null >"${console}" 2>&1 || log "boot $1: qemu ended with status $?"
	# journal+console prefixes each line with the time and the unit's process.
	tr -d '\r' <"${console}" | grep -aoE 'KIOSK-TEST(-INFO)? .*' |
		tee -a "${OUT}/results.txt" >&2 || true
	grep -q "KIOSK-TEST END $1" <(tr -d '\r' <"${console}") || {
		echo "KIOSK-TEST FAIL boot$1-finished the check never ended (see ${console})" |
			tee -a "${OUT}/results.txt" >&2
	}
}

# The host side of the test without building: packages, files, commands, and qemu started
# paused (-S) on the boot's machine and devices, then told to quit. qemu loads ROM and firmware
# files while it creates the machine, before the guest runs, so a missing one fails here.
check_host() {
	local disk out
	bash "${PROJECT}/tools/host-packages.sh" check "${HOST_GROUPS[@]}"
	disk="$(mktemp /var/tmp/kiosk-probe.XXXXXX)"
	out="$(mktemp)"
	truncate -s 1M "${disk}"
	qemu_machine "${disk}"
	if echo quit | timeout 60 qemu-system-aarch64 "${QEMU_MACHINE[@]}" -S -display none \
		-monitor stdio -serial null >"${out}" 2>&1; then
		log "qemu-system-aarch64 created the boot's machine and devices"
		rm -f "${disk}" "${out}"
	else
		tr -d '\r' <"${out}" | grep -v '^QEMU\|^(qemu)' >&2 || true
		rm -f "${disk}" "${out}"
		die "qemu-system-aarch64 cannot create the boot's machine"
	fi
}

main() {
	while [[ $# -gt 0 ]]; do
		case "$1" in
		--reuse) REUSE=1 ;;
		--check-host)
			check_host
			return
			;;
		*) die "usage: image-test.sh [--reuse | --check-host]" ;;
		esac
		shift
	done
	[[ "$(id -u)" -eq 0 ]] || die "run as root (CI does)"
	mkdir -p "${OUT}"
	OUT="$(cd "${OUT}" && pwd)"
	WORK="$(mktemp -d /var/tmp/kiosk-image-test.XXXXXX)"
	# shellcheck disable=SC2064  # expand now
	trap "rm -rf '${WORK}'" EXIT
	# The pristine image and the card files it goes with stay in OUT; each run boots a copy.
	CARD="${OUT}/card"
	PRISTINE="${OUT}/kiosk-test.img"
	IMAGE="${OUT}/kiosk-test-run.img"
	rm -f "${OUT}/results.txt" "${OUT}"/console-boot*.log "${IMAGE}"
	local started required name
	started="$(date +%s)"

	phase tools
	install_tools
	if [[ "${REUSE}" -eq 1 && -f "${PRISTINE}" && -f "${CARD}/kiosk.toml" ]]; then
		log "reusing ${PRISTINE} and its card files"
	else
		phase keys
		rm -rf "${CARD}" "${PRISTINE}"
		make_card_files "${CARD}" "${WORK}/overlay"
		make_overlay "${WORK}/overlay"
		phase build
		bash "${HERE}/build-debian-image.sh" --overlay "${WORK}/overlay" "${PRISTINE}"
	fi
	phase card
	cp --sparse=always "${PRISTINE}" "${IMAGE}"
	provision_card
	phase boot1
	boot_guest 1
	phase boot2
	boot_guest 2
	phase "done"

	required=(boot1-kiosk-ready provision-ran boot-secrets-removed key-owner-only
		hardening-in-force live-exposure-at-most-2 reload-same-process watchdog-restart journal-written
		boot2-kiosk-ready journal-survived-reboot journal-readable-after-reboot)
	local failed=0
	for name in "${required[@]}"; do
		grep -q "^KIOSK-TEST PASS ${name} " "${OUT}/results.txt" || {
			log "not passed: ${name}"
			failed=1
		}
	done
	if grep -q '^KIOSK-TEST FAIL' "${OUT}/results.txt"; then failed=1; fi
	log "image $(du -h --apparent-size "${PRISTINE}" | cut -f1): ${PRISTINE}"
	printf 'image-test: %s\n' "${TIMINGS[@]}" >&2
	log "total $(($(date +%s) - started)) s"
	[[ "${failed}" -eq 0 ]] || die "image test failed (consoles in ${OUT})"
	log "image test passed"
}

main "$@"
