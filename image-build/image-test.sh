#!/usr/bin/env bash
# The image's boot test (`make image-test`): builds the Debian arm64 image, drops a provisioning
# config and fresh test keys on its boot partition, boots it twice under qemu-system-aarch64
# (TCG) and reads the verdict of a test-only check unit from the serial console.
#
#   image-test.sh [--reuse]   --reuse: boot the image and card keys of the last run again; the
#                             card's config and the test units and checks are this checkout's,
#                             written into each run's copy (for iterating on the checks; CI
#                             always builds)
#   image-test.sh --check-host   build nothing: check every host package, file and command the
#                             build and the boots need (tools/host-packages.txt, groups
#                             image-build and image-boot), and start qemu-system-aarch64 paused
#                             with the boot's machine and devices, which proves it finds every
#                             ROM and firmware file it loads
#
# In the guest, under real systemd: provisioning ran and took the secrets off the boot
# partition; kiosk.service became active (READY=1) with its hardening in force; a hung main
# loop (SIGSTOP) is killed by the watchdog and restarted; systemctl reload keeps the same
# process; telemetry to a Mosquitto on the guest's loopback: online, a sale typed by a uinput
# scanner, the last will after SIGKILL, no code or key in any payload; the journal in
# /var/lib/kiosk survives a reboot; the live `systemd-analyze security` exposure is printed.
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

# What a technician puts on the card: freshly made keys (and the config, make_card_config). The
# simulator's own (Alipay side) private key goes into the test overlay, never onto the card.
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
}

# The card's config, written again at each run (--reuse too): the scanner is the test's uinput
# keyboard (kiosk-test-scanner.service), the gateway simulator and the MQTT broker are on the
# guest's loopback.
make_card_config() {
	local card="$1"
	cat >"${card}/kiosk.toml" <<-'EOF'
		# Image test: fake indicators and vend, a uinput scanner the test types into, the gateway
		# simulator and an MQTT broker on the guest's loopback.
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
		driver = "evdev"
		match = "kiosk-test-scanner"

		[indicators]
		driver = "fake"

		[vend]
		driver = "fake"

		[telemetry]
		mqtt_url = "mqtt://127.0.0.1:1883"
		topic_prefix = "kiosk"
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
		    # [telemetry] imports paho-mqtt only when a broker is named: proven here, not at a sale.
		    mqtt="$(as_kiosk /opt/kiosk/bin/python -c 'import paho.mqtt, paho.mqtt.client; print(paho.mqtt.__version__)' 2>&1)"
		    check telemetry-client-present "paho-mqtt ${mqtt}" \
		        grep -qE '^([3-9]|2\.([1-9]|[1-9][0-9]))' <<<"${mqtt}"
		    key_mode="$(stat -c '%U %a' /etc/kiosk/keys/merchant_private_key.pem 2>&1)"
		    check key-owner-only "${key_mode}" test "${key_mode}" = "kiosk 600"

		    pid="$(prop kiosk.service MainPID)"
		    status="$(grep -E '^(NoNewPrivs|Seccomp|CapEff|Groups):' "/proc/${pid}/status" | tr -s '\t\n' '  ')"
		    check hardening-in-force "${status}" \
		        grep -qE 'CapEff: 0+ NoNewPrivs: 1 Seccomp: 2 ' <<<"${status}"
		    exposure="$(systemd-analyze security --no-pager kiosk.service | tail -1)"
		    echo "KIOSK-TEST-INFO live ${exposure}"
		    score="$(grep -oE '[0-9]+\.[0-9]+' <<<"${exposure}" | head -1)"
		    check live-exposure-at-most-1.2 "${score}" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 1.2) }'

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

		    # Telemetry, before the journal is recorded for boot 2: its sale is in it.
		    . /usr/local/lib/kiosk-image-test/telemetry-checks.sh
		    find /var/lib/kiosk -type f -printf '%P\n' | sort >"${MARK}/files"
		    journal_json >"${MARK}/journal.json" 2>"${MARK}/journal.err"
		    check journal-written "$(tr '\n' ' ' <"${MARK}/files")" test -s "${MARK}/files"
		    . /usr/local/lib/kiosk-image-test/hardening-checks.sh
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

# The hardened system, checked in the guest (boot 1, sourced by check.sh): no console, no SysRq,
# the firewall, the clock and its ordering, what listens, and kiosk.service's sandbox opening
# real devices. The guest's time source: a minimal NTP server on its loopback, serving the clock
# qemu's RTC gave the guest (the host's), in place of the image's internet servers, so
# timesyncd synchronises, systemd-time-wait-sync finishes and the kiosk starts in service.
HARDENING_REQUIRED=(no-getty consoles-masked ctrl-alt-del-off no-autovt sysrq-off firewall-loaded
	nothing-exposed no-multicast-dns clock-synchronised wait-sync-before-kiosk kiosk-in-service
	kiosk-boot-clock
	mounted-by-partuuid no-swap root-locked private-users-in-force sandbox-input sandbox-serial
	sandbox-gpio sandbox-lgpio sandbox-refuses-devices sandbox-ip-filter boot-partition-raw-free-of-key
	sbom-valid)

make_hardening_overlay() {
	local overlay="$1" units="$1/etc/systemd/system" lib="$1/usr/local/lib/kiosk-image-test"
	mkdir -p "${units}/sysinit.target.wants" "${lib}" "${overlay}/etc/systemd/timesyncd.conf.d"
	cat >"${overlay}/etc/systemd/timesyncd.conf.d/zz-image-test.conf" <<-'EOF'
		# Image test: the loopback NTP server below instead of the image's internet servers.
		[Time]
		NTP=
		NTP=127.0.0.1
		ConnectionRetrySec=5s
	EOF
	cat >"${units}/kiosk-test-ntp.service" <<-'EOF'
		[Unit]
		Description=Image test: NTP server on loopback (the guest's RTC clock)
		DefaultDependencies=no
		Before=systemd-timesyncd.service sysinit.target shutdown.target
		Conflicts=shutdown.target

		[Service]
		ExecStart=/usr/bin/python3 /usr/local/lib/kiosk-image-test/ntp_server.py

		[Install]
		WantedBy=sysinit.target
	EOF
	ln -sfn /etc/systemd/system/kiosk-test-ntp.service \
		"${units}/sysinit.target.wants/kiosk-test-ntp.service"
	install -m 0644 /dev/stdin "${lib}/ntp_server.py" <<-'EOF'
		"""Image test: an NTP server (RFC 5905, server mode) on 127.0.0.1:123 with the local clock."""
		import socket
		import struct
		import time

		NTP_EPOCH = 2208988800  # 1900-01-01 to 1970-01-01


		def stamp(seconds):
		    whole = int(seconds)
		    return struct.pack("!II", whole + NTP_EPOCH, int((seconds - whole) * 2**32))


		sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
		sock.bind(("127.0.0.1", 123))
		while True:
		    request, client = sock.recvfrom(512)
		    received = time.time()
		    if len(request) < 48:
		        continue
		    version = (request[0] >> 3) & 7
		    header = struct.pack("!BBbbII4s", version << 3 | 4, 1, request[2], -20, 0, 16, b"LOCL")
		    # Origin = the client's transmit time, byte for byte: that is how it knows the answer.
		    reply = header + stamp(received - 1) + request[40:48] + stamp(received)
		    sock.sendto(reply + stamp(time.time()), client)
	EOF
	install -m 0644 /dev/stdin "${lib}/device_probe.py" <<-'EOF'
		"""Image test: what kiosk.service's sandbox lets through, run under a copy of it."""
		import errno
		import fcntl
		import glob
		import os
		import socket
		import struct


		def report(name, ok, detail):
		    print(f"PROBE {'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


		def attempt(name, action, describe):
		    try:
		        report(name, True, describe(action()))
		    except OSError as exc:
		        report(name, False, f"{exc.__class__.__name__}: {exc}")


		with open("/proc/self/uid_map") as uid_map:
		    print("PROBE INFO uid_map " + " ".join(uid_map.read().split()), flush=True)

		import evdev  # noqa: E402  (after the uid_map line: an import error shows the sandbox)

		keyboards = [path for path in sorted(glob.glob("/dev/input/event*"))
		             if "keyboard" in evdev.InputDevice(path).name.lower()]
		if not keyboards:
		    report("input", False, "no keyboard event node (qemu's usb-kbd)")
		for path in keyboards:
		    def grab(path=path):
		        device = evdev.InputDevice(path)
		        device.grab()
		        device.ungrab()
		        return device
		    attempt("input", grab, lambda device: f"{device.path} ({device.name}) opened and grabbed")

		import serial  # noqa: E402

		ports = sorted(glob.glob("/dev/ttyUSB*"))
		if not ports:
		    report("serial", False, "no /dev/ttyUSB* (qemu's usb-serial)")
		for path in ports:
		    def open_port(path=path):
		        port = serial.Serial(path, 9600, timeout=0)
		        port.close()
		        return path
		    attempt("serial", open_port, lambda path: f"{path} opened 9600 8N1")

		GPIO_GET_CHIPINFO_IOCTL = 0x8044B401  # _IOR(0xB4, 0x01, struct gpiochip_info): 68 bytes


		def chip_info():
		    fd = os.open("/dev/gpiochip0", os.O_RDWR | os.O_CLOEXEC)
		    try:
		        name, label, lines = struct.unpack("32s32sI", fcntl.ioctl(fd, GPIO_GET_CHIPINFO_IOCTL, bytes(68)))
		    finally:
		        os.close(fd)
		    return f"/dev/gpiochip0 {name.rstrip(bytes(1)).decode()} ({label.rstrip(bytes(1)).decode()}, {lines} lines)"


		attempt("gpio", chip_info, str)


		def lgpio_line():
		    import lgpio  # a C extension: loads under MemoryDenyWriteExecute=yes or fails here
		    handle = lgpio.gpiochip_open(0)
		    try:
		        if lgpio.gpio_claim_input(handle, 0) != 0:
		            raise OSError(errno.EIO, "gpio_claim_input(0) failed")
		        level = lgpio.gpio_read(handle, 0)
		        lgpio.gpio_free(handle, 0)
		    finally:
		        lgpio.gpiochip_close(handle)
		    return f"lgpio chip 0 line 0 claimed as input, level {level}"


		attempt("lgpio", lgpio_line, str)

		# Nodes any user may open (0666), but outside DevicePolicy=closed and its DeviceAllow=:
		# the cgroup's device filter refuses them (EPERM, not the file mode's EACCES).
		others = [path for path in ("/dev/net/tun", "/dev/fuse") if os.path.exists(path)]
		if not others:
		    report("refuses-devices", False, "neither /dev/net/tun nor /dev/fuse exists")
		for path in others:
		    try:
		        os.close(os.open(path, os.O_RDWR))
		        report("refuses-devices", False, f"{path} opened")
		    except OSError as exc:
		        report("refuses-devices", exc.errno == errno.EPERM, f"{path}: {exc.strerror}")

		# Unicast goes out (loopback, and qemu's gateway, which drops it); a multicast datagram
		# sent out of eth0 (named, so no route is needed) is refused by the unit's IPAddressDeny=.
		with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
		    try:
		        sock.sendto(b"probe", ("127.0.0.1", 9))
		        sock.sendto(b"probe", ("10.0.2.2", 9))
		        eth0 = struct.pack("=4s4si", bytes(4), bytes(4), socket.if_nametoindex("eth0"))
		        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, eth0)
		    except OSError as exc:
		        report("ip-filter", False, f"unicast refused: {exc}")
		    else:
		        try:
		            sock.sendto(b"probe", ("224.0.0.251", 5353))
		            report("ip-filter", False, "unicast sent, multicast sent too")
		        except OSError as exc:
		            report("ip-filter", exc.errno == errno.EPERM,
		                   f"unicast sent, multicast out of eth0 refused: {exc.strerror}")
	EOF
	install -m 0644 /dev/stdin "${lib}/hardening-checks.sh" <<-'EOF'
		# Sourced by check.sh in boot 1 (pass, fail, check, prop, wait_for come from there).
		getties="$(ps -eo comm= | grep -cE '^(a?getty|login|sulogin)$')"
		check no-getty "${getties} getty/login processes" test "${getties}" = 0
		masks="$(for unit in getty@tty1 getty@tty2 serial-getty@ttyAMA0 autovt@tty2 console-getty; do
		    printf '%s=%s ' "${unit}" "$(prop "${unit}.service" LoadState)"; done)"
		check consoles-masked "${masks}" test "$(grep -o '=masked' <<<"${masks}" | wc -l)" = 5
		cad="ctrl-alt-del.target $(prop ctrl-alt-del.target LoadState), burst action \
		$(systemctl show -p CtrlAltDelBurstAction --value)"
		check ctrl-alt-del-off "${cad}" test "${cad}" = "ctrl-alt-del.target masked, burst action none"
		autovts="$(busctl get-property org.freedesktop.login1 /org/freedesktop/login1 \
		    org.freedesktop.login1.Manager NAutoVTs 2>&1)"
		check no-autovt "NAutoVTs ${autovts}" test "${autovts}" = "u 0"
		sysrq="$(cat /proc/sys/kernel/sysrq)"
		check sysrq-off "kernel.sysrq=${sysrq}; cmdline: $(grep -o 'sysctl.kernel.sysrq=[0-9]*' /proc/cmdline)" \
		    test "${sysrq}" = 0
		ruleset="$(nft list chain inet kiosk input 2>&1)"
		echo "${ruleset}" | sed 's/^/KIOSK-TEST-INFO nft /'
		check firewall-loaded "nftables.service $(prop nftables.service ActiveState), input policy \
		$(grep -o 'policy [a-z]*' <<<"${ruleset}")" \
		    grep -q 'hook input priority filter; policy drop;' <<<"${ruleset}"
		ip -4 route | sed 's/^/KIOSK-TEST-INFO route /'
		listening="$(ss -H -lntu | awk '{print $1, $5}')"
		echo "${listening}" | sed 's/^/KIOSK-TEST-INFO listening /'
		exposed="$(awk '$2 !~ /^(127\.|\[::1\]|\[::ffff:127\.)/ && !($1 == "udp" && $2 ~ /:(68|546)$/)' \
		    <<<"${listening}" | tr '\n' ' ')"
		check nothing-exposed "beyond loopback and the DHCP client: ${exposed:-nothing}" test -z "${exposed}"
		mdns="$(grep -cE ':(5353|5355)$' <<<"${listening}")"
		check no-multicast-dns "LLMNR $(busctl get-property org.freedesktop.resolve1 /org/freedesktop/resolve1 \
		    org.freedesktop.resolve1.Manager LLMNR 2>&1), mDNS $(busctl get-property \
		    org.freedesktop.resolve1 /org/freedesktop/resolve1 org.freedesktop.resolve1.Manager \
		    MulticastDNS 2>&1), ${mdns} sockets on 5353/5355" test "${mdns}" = 0
		synced="$(timedatectl show -p NTPSynchronized --value)"
		check clock-synchronised "NTPSynchronized=${synced}, $(timedatectl show-timesync -p ServerAddress)" \
		    test "${synced}" = yes
		# The wait ended with the clock synchronised (the loopback NTP server answers), before the
		# kiosk's first start.
		wait_done="$(prop systemd-time-wait-sync.service StateChangeTimestampMonotonic)"
		first_start="$(journalctl -b -u kiosk.service -o short-monotonic --no-pager |
		    grep -m1 'Starting kiosk.service' | sed -E 's/^\[ *([0-9]+)\.([0-9]{6})\].*/\1\2/')"
		after="$(prop kiosk.service After)"
		check wait-sync-before-kiosk "time-wait-sync $(prop systemd-time-wait-sync.service ActiveState) \
		($(prop systemd-time-wait-sync.service Result)) at ${wait_done} us, before \
		$(prop systemd-time-wait-sync.service Before | grep -o time-sync.target); kiosk After= \
		$(grep -o time-sync.target <<<"${after}"), first started at ${first_start} us" \
		    test "$(prop systemd-time-wait-sync.service Result)" = success \
		    -a "$(prop systemd-time-wait-sync.service UnitFileState)" = enabled \
		    -a "${wait_done:-0}" -gt 0 -a "${wait_done:-0}" -lt "${first_start:-0}" \
		    -a -n "$(grep -o time-sync.target <<<"${after}")"
		ready="$(journalctl -b -u kiosk.service -o cat | grep 'event=kiosk.ready' | tail -1)"
		check kiosk-in-service "${ready}" grep -q 'out_of_service=None' <<<"${ready}"
		# Rule 7 across a restart needs the boot id, which ProcSubset=pid hides: the unit's %b.
		no_boot_clock="$(journalctl -b -u kiosk.service -o cat | grep -c 'event=kiosk.no_boot_clock')"
		check kiosk-boot-clock "${no_boot_clock} kiosk.no_boot_clock lines" \
		    test "${no_boot_clock}" = 0
		root_uuid="$(blkid -s PARTUUID -o value "$(findmnt -n -o SOURCE /)")"
		boot_uuid="$(blkid -s PARTUUID -o value "$(findmnt -n -o SOURCE /boot/firmware)")"
		mounts="cmdline $(grep -o 'root=[^ ]*' /proc/cmdline); fstab $(findmnt -n --fstab -o SOURCE /) \
		$(findmnt -n --fstab -o SOURCE /boot/firmware); / is ${root_uuid}, /boot/firmware is ${boot_uuid}"
		check mounted-by-partuuid "${mounts}" test -n "${root_uuid}" -a -n "${boot_uuid}" \
		    -a "$(grep -o 'root=[^ ]*' /proc/cmdline)" = "root=PARTUUID=${root_uuid}" \
		    -a "$(findmnt -n --fstab -o SOURCE /)" = "PARTUUID=${root_uuid}" \
		    -a "$(findmnt -n --fstab -o SOURCE /boot/firmware)" = "PARTUUID=${boot_uuid}"
		swaps="$(tail -n +2 /proc/swaps | wc -l)"
		check no-swap "${swaps} swap areas" test "${swaps}" = 0
		root_status="$(passwd -S root | awk '{print $2}')"
		check root-locked "root password status ${root_status}" test "${root_status}" = L
		pid="$(prop kiosk.service MainPID)"
		uid_map="$(tr -s ' \n' ' ' <"/proc/${pid}/uid_map")"
		check private-users-in-force "kiosk uid_map: ${uid_map}" \
		    test -n "${uid_map}" -a -z "$(grep -E '^ *0 +0 +4294967295' "/proc/${pid}/uid_map")"

		# A copy of kiosk.service's sandbox (everything but how it runs and its own folders) runs
		# the device probe: USB keyboard, USB serial adapter, the virt machine's GPIO chip.
		probe=/run/systemd/system/kiosk-sandbox-probe.service
		sed -e '/^\[Install\]/,$d' -e '/^#/d' -e '/^\(Type\|NotifyAccess\|ExecStart\|ExecReload\|Restart\|RestartSec\|WatchdogSec\|TimeoutStartSec\|TimeoutStopSec\|RuntimeDirectory\|RuntimeDirectoryMode\|StateDirectory\|StateDirectoryMode\|ConfigurationDirectory\|WorkingDirectory\|Wants\|After\|StartLimitIntervalSec\|OOMScoreAdjust\|Description\|Documentation\)=/d' \
		    /usr/lib/systemd/system/kiosk.service >"${probe}"
		cat >>"${probe}" <<-'UNIT'
		[Unit]
		Description=Image test: kiosk.service's sandbox, opening devices
		[Service]
		Type=oneshot
		ExecStart=/opt/kiosk/bin/python /usr/local/lib/kiosk-image-test/device_probe.py
		WorkingDirectory=/tmp
		Environment=LG_WD=/tmp
		UNIT
		grep -vE '^\s*$' "${probe}" | sed 's/^/KIOSK-TEST-INFO probe-unit /'
		systemctl daemon-reload
		systemctl start kiosk-sandbox-probe.service
		probe_out="$(journalctl -b -u kiosk-sandbox-probe.service -o cat | grep -E '^(PROBE|Traceback|[A-Za-z]+Error)')"
		echo "${probe_out}" | sed 's/^/KIOSK-TEST-INFO /'
		for kind in input serial gpio lgpio refuses-devices ip-filter; do
		    line="$(grep "^PROBE [A-Z]* ${kind} " <<<"${probe_out}")"
		    check "sandbox-${kind}" "$(cut -d' ' -f4- <<<"${line:-no result}" | tr '\n' ';')" \
		        test -n "${line}" -a -z "$(grep -v '^PROBE PASS ' <<<"${line}")"
		done
	EOF
}

# Telemetry (SPEC section 8) in the booted guest, against a Mosquitto on its loopback. The
# broker and its clients are Debian's arm64 packages, fetched on the host at test time and
# written into the run's copy only: the built image never holds a broker.
TELEMETRY_REQUIRED=(telemetry-online telemetry-sale telemetry-last-will telemetry-back-online
	telemetry-payloads-clean telemetry-sale-once)
BROKER_PACKAGES=(mosquitto mosquitto-clients)
DEBIAN_MIRROR="${KIOSK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
GUEST_LIB=/usr/local/lib/kiosk-image-test

# Mosquitto and its clients with what the image lacks of their libraries: apt resolves them
# against the image's own dpkg status (read with debugfs), so the set is exactly what this image
# needs. The .debs are kept in OUT/broker-debs/<status hash>/: a rerun downloads nothing.
fetch_broker() { # DEST: gets sbin/mosquitto, bin/mosquitto_sub, bin/mosquitto_pub, lib/
	local dest="$1" apt="${WORK}/apt" debs key deb unpacked="${WORK}/broker-root"
	mkdir -p "${apt}/etc/apt/apt.conf.d" "${apt}/etc/apt/preferences.d" \
		"${apt}/var/lib/dpkg" "${apt}/var/lib/apt/lists/partial" "${apt}/var/cache/apt"
	debugfs -R "dump /var/lib/dpkg/status ${apt}/var/lib/dpkg/status" \
		"${PRISTINE}?offset=$(partition_start "${PRISTINE}" 2)" 2>/dev/null
	[[ -s "${apt}/var/lib/dpkg/status" ]] || die "no /var/lib/dpkg/status in ${PRISTINE}"
	key="$(sha256sum <"${apt}/var/lib/dpkg/status" | cut -c1-16)"
	debs="${OUT}/broker-debs/${key}"
	if [[ -f "${debs}/complete" ]]; then
		log "broker: the image's packages as fetched before ($(cd "${debs}" && echo *.deb))"
	else
		rm -rf "${debs}"
		mkdir -p "${debs}/partial"
		local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
		cat >"${apt}/etc/apt/sources.list" <<-EOF
			deb [signed-by=${keyring}] ${DEBIAN_MIRROR} bookworm main
			deb [signed-by=${keyring}] ${DEBIAN_MIRROR} bookworm-updates main
			deb [signed-by=${keyring}] http://security.debian.org/debian-security bookworm-security main
		EOF
		local options=(-q -o "Dir=${apt}" -o "Dir::State::status=${apt}/var/lib/dpkg/status"
			-o "Dir::Cache::archives=${debs}" -o APT::Architecture=arm64 -o APT::Architectures::=arm64
			-o Acquire::Languages=none -o Debug::NoLocking=1 -o APT::Sandbox::User=root
			-o APT::Install-Recommends=false)
		if ! { apt-get "${options[@]}" update && apt-get "${options[@]}" install --download-only -y \
			"${BROKER_PACKAGES[@]}"; } >"${WORK}/apt.log" 2>&1; then
			cat "${WORK}/apt.log" >&2
			die "broker: apt-get could not fetch ${BROKER_PACKAGES[*]} for arm64"
		fi
		rm -rf "${debs}/partial" "${debs}/lock"
		touch "${debs}/complete"
		log "broker: fetched $(cd "${debs}" && echo *.deb)"
	fi
	rm -rf "${unpacked}"
	for deb in "${debs}"/*.deb; do dpkg-deb -x "${deb}" "${unpacked}"; done
	mkdir -p "${dest}/sbin" "${dest}/bin" "${dest}/lib"
	cp -a "${unpacked}/usr/sbin/mosquitto" "${dest}/sbin/"
	cp -a "${unpacked}/usr/bin/mosquitto_sub" "${unpacked}/usr/bin/mosquitto_pub" "${dest}/bin/"
	local folder
	for folder in "${unpacked}/usr/lib/aarch64-linux-gnu" "${unpacked}/lib/aarch64-linux-gnu"; do
		[[ -d "${folder}" ]] && find "${folder}" -maxdepth 1 -name '*.so*' -exec cp -a {} "${dest}/lib/" \;
	done
	return 0
}

make_telemetry_overlay() {
	local overlay="$1" units="$1/etc/systemd/system" lib="$1${GUEST_LIB}"
	mkdir -p "${units}/multi-user.target.wants" "${lib}/mosquitto"
	fetch_broker "${lib}/mosquitto"
	cat >"${lib}/mosquitto/mosquitto.conf" <<-'EOF'
		# Image test: the kiosk's MQTT broker, on loopback only, no persistence.
		listener 1883 127.0.0.1
		allow_anonymous true
		persistence false
		log_dest stderr
		log_type error
		log_type warning
		log_type notice
		log_type information
		connection_messages true
	EOF
	cat >"${units}/kiosk-test-mqtt.service" <<-EOF
		[Unit]
		Description=Image test: MQTT broker (Mosquitto) on loopback
		Before=kiosk.service

		[Service]
		Type=notify
		DynamicUser=yes
		Environment=LD_LIBRARY_PATH=${GUEST_LIB}/mosquitto/lib
		ExecStart=${GUEST_LIB}/mosquitto/sbin/mosquitto -c ${GUEST_LIB}/mosquitto/mosquitto.conf

		[Install]
		WantedBy=multi-user.target
	EOF
	cat >"${units}/kiosk-test-scanner.service" <<-EOF
		[Unit]
		Description=Image test: a uinput keyboard the test types payment codes into
		Before=kiosk.service

		[Service]
		Type=notify
		ExecStartPre=-/sbin/modprobe uinput
		ExecStart=/opt/kiosk/bin/python ${GUEST_LIB}/scanner.py

		[Install]
		WantedBy=multi-user.target
	EOF
	local unit
	for unit in kiosk-test-mqtt.service kiosk-test-scanner.service; do
		ln -sfn "/etc/systemd/system/${unit}" "${units}/multi-user.target.wants/${unit}"
	done
	install -m 0644 /dev/stdin "${lib}/scanner.py" <<-'EOF'
		"""Image test: a barcode scanner (a uinput keyboard, "kiosk-test-scanner") that types each
		line written to /run/kiosk-test-scanner, then Enter, for the kiosk's evdev driver."""
		import os
		import socket

		import evdev
		from evdev import ecodes

		FIFO = "/run/kiosk-test-scanner"
		DIGITS = {str(n): getattr(ecodes, f"KEY_{n}") for n in range(10)}

		device = evdev.UInput({ecodes.EV_KEY: [*DIGITS.values(), ecodes.KEY_ENTER]},
		                      name="kiosk-test-scanner", vendor=0x1209, product=0x0001)


		def press(key):
		    for value in (1, 0):
		        device.write(ecodes.EV_KEY, key, value)
		        device.syn()


		if os.path.lexists(FIFO):
		    os.unlink(FIFO)
		os.mkfifo(FIFO, 0o600)
		notify = os.environ.get("NOTIFY_SOCKET", "")
		if notify:
		    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
		        sock.connect("\0" + notify[1:] if notify.startswith("@") else notify)
		        sock.send(b"READY=1")
		print(f"scanner {device.device.path} ready, typing what {FIFO} gets", flush=True)
		while True:
		    with open(FIFO, encoding="ascii") as lines:
		        for line in lines:
		            digits = line.strip()
		            for char in digits:
		                press(DIGITS[char])
		            press(ecodes.KEY_ENTER)
		            print(f"typed {len(digits)} digits", flush=True)
	EOF
	install -m 0644 /dev/stdin "${lib}/telemetry-checks.sh" <<-'EOF'
		# Sourced by check.sh (boot 1): the kiosk's telemetry through the broker on loopback. One
		# subscriber to everything runs through these checks; each check reads its messages with
		# a deadline (no sleeps) and every message is kept for the last check, the payloads'.
		MQTT_DIR=/usr/local/lib/kiosk-image-test/mosquitto
		TOPIC=kiosk/IMAGE-TEST
		MQTT_LOG="${MARK}/mqtt.log"
		mqtt_sub() {
		    LD_LIBRARY_PATH="${MQTT_DIR}/lib" "${MQTT_DIR}/bin/mosquitto_sub" -h 127.0.0.1 -p 1883 "$@"
		}
		mqtt_mark() { wc -l <"${MQTT_LOG}"; }
		# SECONDS ERE [FROM]: the first message ("topic payload") after line FROM of the log that
		# matches, in MQTT_LINE, read from the subscriber until the deadline.
		mqtt_wait() {
		    local deadline=$((SECONDS + $1)) line
		    MQTT_LINE="$(tail -n +"$((${3:-0} + 1))" "${MQTT_LOG}" | grep -m1 -E -- "$2")" && return 0
		    while [ "${SECONDS}" -lt "${deadline}" ] &&
		        IFS= read -r -t "$((deadline - SECONDS))" line <&"${mqtt_fd}"; do
		        printf '%s\n' "${line}" >>"${MQTT_LOG}"
		        grep -qE -- "$2" <<<"${line}" && { MQTT_LINE="${line}"; return 0; }
		    done
		    return 1
		}

		echo "KIOSK-TEST-INFO broker kiosk-test-mqtt.service $(prop kiosk-test-mqtt.service ActiveState), \
		scanner kiosk-test-scanner.service $(prop kiosk-test-scanner.service ActiveState)"
		: >"${MQTT_LOG}"
		coproc MQTT_SUB { mqtt_sub -v -W 900 -t '#' 2>&1; }
		mqtt_pid=${MQTT_SUB_PID}
		exec {mqtt_fd}<&"${MQTT_SUB[0]}"

		# Availability and state are retained: a client that subscribes later gets them at once.
		started=${SECONDS}
		mqtt_wait 120 "^${TOPIC}/availability online\$"
		avail="$(mqtt_sub --retained-only -C 1 -W 10 -t "${TOPIC}/availability" 2>&1)"
		state="$(mqtt_sub --retained-only -C 1 -W 10 -t "${TOPIC}/state" 2>&1)"
		check telemetry-online "after $((SECONDS - started)) s, retained: availability ${avail}, \
		state ${state}" test "${avail}" = online -a -n "$(grep -E '^\{.*"state":"[a-z_]+".*"firmware":' <<<"${state}")"

		# A sale: a fresh payment code typed by the scanner (last digits 0NNN: the simulator pays
		# at once), one `sale` message once the transaction is final.
		code="28$(printf '%06d%06d' $((RANDOM % 1000000)) $((RANDOM % 1000000)))0$(printf '%03d' $((RANDOM % 1000)))"
		from="$(mqtt_mark)"
		started=${SECONDS}
		timeout 30 bash -c 'echo "$1" >/run/kiosk-test-scanner' typed "${code}"
		mqtt_wait 180 "^${TOPIC}/sale " "${from}"
		sale="${MQTT_LINE#* }"
		check telemetry-sale "after $((SECONDS - started)) s: ${sale:-no sale message}" \
		    grep -qE '"state":"vended","amount":"1\.50","currency":"USD"' <<<"${sale}"
		[ -n "${sale}" ] || journalctl -b -u kiosk.service -u kiosk-test-scanner.service -o cat \
		    --no-pager -n 25 | sed 's/^/KIOSK-TEST-INFO sale-log /'

		# The last will: killed, the kiosk cannot say goodbye; the broker says it.
		kill_pid="$(prop kiosk.service MainPID)"
		from="$(mqtt_mark)"
		started=${SECONDS}
		systemctl kill -s KILL kiosk.service
		mqtt_wait 60 "^${TOPIC}/availability offline\$" "${from}"
		check telemetry-last-will "offline $((SECONDS - started)) s after SIGKILL of ${kill_pid}: \
		${MQTT_LINE:-none}; broker: $(journalctl -b -u kiosk-test-mqtt.service -o cat --no-pager |
		    grep -iE 'kiosk-IMAGE-TEST.*(closed|disconnect|exceeded|error)' | tail -1)" test -n "${MQTT_LINE}"
		# Restarted (RestartSec=), it reconnects: later checks find the service as before.
		back() { kiosk_active && [ "$(prop kiosk.service MainPID)" != "${kill_pid}" ]; }
		from="$(mqtt_mark)"
		started=${SECONDS}
		wait_for 120 back
		mqtt_wait 60 "^${TOPIC}/availability online\$" "${from}"
		check telemetry-back-online "kiosk.service $(prop kiosk.service ActiveState) as \
		$(prop kiosk.service MainPID), online again after $((SECONDS - started)) s" \
		    test -n "${MQTT_LINE}" -a "$(prop kiosk.service MainPID)" != "${kill_pid}"

		# Every message so far: no payment code (whole, the one typed, or masked), no key.
		kill "${mqtt_pid}" 2>/dev/null
		while IFS= read -r -t 10 line <&"${mqtt_fd}"; do printf '%s\n' "${line}" >>"${MQTT_LOG}"; done
		exec {mqtt_fd}<&-
		wait "${mqtt_pid}" 2>/dev/null
		payloads="$(cut -d' ' -f2- "${MQTT_LOG}")"
		runs="$(grep -oE '[0-9]+' <<<"${payloads}" |
		    awk '{ first = substr($0, 1, 2) + 0 } length($0) >= 16 && length($0) <= 24 && first >= 25 && first <= 30' |
		    wc -l)"
		typed="$(grep -cF -e "${code}" -e "*${code: -4}" <<<"${payloads}")"
		keys="$(cat /etc/kiosk/keys/*.pem /etc/kiosk-test/*.pem 2>/dev/null | grep -v -- '-----' |
		    grep -cF -f - <<<"${payloads}")"
		marker="$(grep -c 'PRIVATE KEY' <<<"${payloads}")"
		check telemetry-payloads-clean "$(wc -l <"${MQTT_LOG}") messages on \
		$(cut -d' ' -f1 "${MQTT_LOG}" | sort -u | wc -l) topics: ${runs} code-like digit runs, ${typed} with \
		the typed code or its last 4 masked, ${keys} with a line of a key, ${marker} PRIVATE KEY" \
		    test "${runs}" = 0 -a "${typed}" = 0 -a "${keys}" = 0 -a "${marker}" = 0
		sales="$(grep -c "^${TOPIC}/sale " "${MQTT_LOG}")"
		check telemetry-sale-once "${sales} sale messages in all, the kiosk killed and restarted \
		since" test "${sales}" = 1
		cut -d' ' -f1 "${MQTT_LOG}" | sort | uniq -c | sed 's/^ */KIOSK-TEST-INFO mqtt /'
	EOF
}

# The test overlay, written into the run's copy (debugfs, no mount) at each run, --reuse too: a
# rerun boots this checkout's checks. (The build bakes the same units into the image, less the
# broker; the power-cut rig's boots use its NTP server.)
write_test_overlay() {
	local overlay="${WORK}/run-overlay"
	make_overlay "${overlay}"
	make_hardening_overlay "${overlay}"
	make_telemetry_overlay "${overlay}"
	PYTHONPATH="${PROJECT}" "$(host_python)" - "${overlay}" "${IMAGE}" <<-'EOF'
		import os, sys
		from pathlib import Path
		from tests.powercut.ext4 import Ext4Image

		overlay, image = Path(sys.argv[1]), Path(sys.argv[2])
		count = 0
		with Ext4Image(image) as fs:
		    for folder, dirs, files in os.walk(overlay):
		        guest = "/" + Path(folder).relative_to(overlay).as_posix().lstrip(".").strip("/")
		        fs.mkdirs(guest)
		        for name in sorted(dirs + files):
		            path, target = Path(folder) / name, f"{guest.rstrip('/')}/{name}"
		            if path.is_symlink():
		                fs.symlink(target, os.readlink(path))
		            elif path.is_file():
		                fs.write(target, path.read_bytes(), path.stat().st_mode & 0o7777)
		            else:
		                continue
		            count += 1
		    fs.commit()
		print(f"image-test: test overlay: {count} files and links written into {image.name}",
		      file=sys.stderr)
	EOF
}

# The boot's kernel command line: the image's own cmdline.txt (root=PARTUUID=..., SysRq off),
# with the console on the virt machine's UART instead of HDMI.
guest_cmdline() {
	local boot cmdline
	boot="${IMAGE}@@$(partition_start "${IMAGE}" 1)"
	cmdline="$(mtype -i "${boot}" ::/cmdline.txt | tr -d '\r' | tr '\n' ' ')"
	cmdline="$(tr ' ' '\n' <<<"${cmdline}" | grep -vE '^(console=|cma=|$)' | tr '\n' ' ')"
	GUEST_CMDLINE="${cmdline}console=ttyAMA0 panic=-1 systemd.show_status=auto"
	log "guest command line: ${GUEST_CMDLINE}"
}

# After boot 1 provisioned: no line of the merchant key's PEM is left anywhere in the boot
# partition's bytes (deleted files' clusters included), read raw from the image.
check_boot_partition_bytes() {
	local start size found
	start="$(partition_start "${IMAGE}" 1)"
	size="$(parted -ms "${IMAGE}" unit B print | awk -F: '$1 == 1 { sub(/B$/, "", $4); print $4 }')"
	found="$(grep -v -- '-----' "${CARD}/merchant_private_key.pem" |
		grep -a -c -F -f - <(dd if="${IMAGE}" bs=1M iflag=skip_bytes,count_bytes \
			skip="${start}" count="${size}" status=none) || true)"
	local result=PASS
	[[ "${found}" -eq 0 ]] || result=FAIL
	echo "KIOSK-TEST ${result} boot-partition-raw-free-of-key ${found} runs of the key's base64 \
left in the ${size}-byte boot partition" | tee -a "${OUT}/results.txt" >&2
}

# The SBOM the build wrote beside the image: CycloneDX 1.5, valid against its JSON schema.
check_sbom() {
	local sbom="${PRISTINE%.img}.cdx.json" verdict result
	verdict="$("$(host_python)" - "${sbom}" 2>&1 <<-'EOF'
		import json, sys
		from cyclonedx.schema import SchemaVersion
		from cyclonedx.validation.json import JsonStrictValidator

		text = open(sys.argv[1], encoding="utf-8").read()
		error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
		if error is not None:
		    sys.exit(f"invalid: {error.data.message}")
		bom = json.loads(text)
		print(f"{len(bom['components'])} components:",
		      " ".join(f"{c['name']}=={c['version']}" for c in bom["components"]))
	EOF
	)" && result=PASS || result=FAIL
	echo "KIOSK-TEST ${result} sbom-valid ${sbom##*/}: $(tr '\n' ' ' <<<"${verdict}")" |
		tee -a "${OUT}/results.txt" >&2
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
		# What kiosk.service's sandbox is probed with: a USB keyboard (a scanner is one) and a
		# USB serial adapter (FTDI) on an xHCI controller; -M virt has a PL061 GPIO chip.
		# (qemu attaches usb-serial only once its chardev is open, which a null one never is.)
		-device qemu-xhci -device usb-kbd -chardev "ringbuf,id=vend" -device "usb-serial,chardev=vend"
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
		-append "${GUEST_CMDLINE}" \
		</dev/null >"${console}" 2>&1 || log "boot $1: qemu ended with status $?"
	# journal+console prefixes each line with the time and the unit's process.
	tr -d '\r' <"${console}" | grep -aoE 'KIOSK-TEST(-INFO)? .*' |
		tee -a "${OUT}/results.txt" >&2 || true
	grep -q "KIOSK-TEST END $1" <(tr -d '\r' <"${console}") || {
		echo "KIOSK-TEST FAIL boot$1-finished the check never ended (see ${console})" |
			tee -a "${OUT}/results.txt" >&2
	}
}

# --- Power cuts (tests/powercut/rig.py; `make powercut` runs 20) ----------------------------
# A fresh copy of the pristine image, provisioned for a serial scanner, a serial vending
# controller and the gateway simulator on the host, cut POWERCUT_CUTS times at different points
# of a sale (4 boots for 3 cuts), then the money checked against the simulator's ledger.
POWERCUT_CUTS=3
powercut_short() {
	local log="${OUT}/powercut.log" rc=0
	log "power cuts: ${POWERCUT_CUTS}, log in ${log}"
	(cd "${PROJECT}" && "$(host_python)" -m tests.powercut --image "${PRISTINE}" \
		--out "${OUT}/powercut" --cuts "${POWERCUT_CUTS}") >"${log}" 2>&1 || rc=$?
	grep -E '^powercut: (seed|cuts per|sales per|[0-9]+ cuts|FINDING)' "${log}" >&2 || true
	if [[ "${rc}" -eq 0 ]]; then
		echo "KIOSK-TEST PASS powercut ${POWERCUT_CUTS} cuts, every money rule kept"
	else
		echo "KIOSK-TEST FAIL powercut exit ${rc} (see ${log})"
	fi | tee -a "${OUT}/results.txt" >&2
}
# --- end of power cuts ------------------------------------------------------------------

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
	if [[ "${REUSE}" -eq 1 && -f "${PRISTINE}" && -f "${CARD}/merchant_private_key.pem" ]]; then
		log "reusing ${PRISTINE} and its card files"
	else
		phase keys
		rm -rf "${CARD}" "${PRISTINE}"
		make_card_files "${CARD}" "${WORK}/overlay"
		make_overlay "${WORK}/overlay"
		make_hardening_overlay "${WORK}/overlay"
		phase build
		bash "${HERE}/build-debian-image.sh" --overlay "${WORK}/overlay" "${PRISTINE}"
	fi
	phase card
	cp --sparse=always "${PRISTINE}" "${IMAGE}"
	make_card_config "${CARD}"
	provision_card
	phase overlay
	write_test_overlay
	guest_cmdline
	check_sbom
	phase boot1
	boot_guest 1
	check_boot_partition_bytes
	phase boot2
	boot_guest 2
	phase powercut
	powercut_short
	phase "done"

	required=(boot1-kiosk-ready provision-ran boot-secrets-removed key-owner-only telemetry-client-present
		hardening-in-force live-exposure-at-most-1.2 reload-same-process watchdog-restart journal-written
		boot2-kiosk-ready journal-survived-reboot journal-readable-after-reboot)
	required+=("${HARDENING_REQUIRED[@]}" "${TELEMETRY_REQUIRED[@]}")
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
