"""The guest side of the power-cut rig: what is written into a copy of the image before its
first boot (an agent unit), and what goes on its boot partition for provisioning.

The agent reports to the host on a virtio serial port (`/dev/virtio-ports/org.kiosk.powercut`,
a file on the host): the kiosk's journald lines as JSON, and in the last boot
(`kiosk.powercut=finish` on the kernel command line) `kiosk journal --json --all` once every
transaction is final or in attention, before it powers the machine off cleanly. It reads and
reports; it changes nothing of the kiosk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.powercut.ext4 import BOOT_PARTITION, Ext4Image, partition_offset

AGENT_PORT = "org.kiosk.powercut"
AGENT_DIR = "/usr/local/lib/kiosk-powercut"
UNIT = "kiosk-powercut-agent.service"
WANTS = "/etc/systemd/system/multi-user.target.wants"
# The image test's own units, which would run their checks and power off: not in these boots.
IMAGE_TEST_UNITS = ("kiosk-image-test.service", "kiosk-test-gateway.service")
FINISH_WAIT_S = 600  # the last boot: the journal must be worked off within this

AGENT = r"""#!/bin/bash
# Power-cut rig agent (test image only): the kiosk's log to the host, and in the last boot its
# journal once worked off. It changes nothing of the kiosk.
set -u
PORT=/dev/virtio-ports/__PORT__
for _ in $(seq 240); do [ -w "${PORT}" ] && break; sleep 0.5; done
exec >"${PORT}" 2>&1
mode="$(sed -n 's/.*kiosk\.powercut=\([a-z]*\).*/\1/p' /proc/cmdline)"
say() { echo "AGENT $*"; }
say "boot mode=${mode:-none} write_cache=$(tr ' ' _ </sys/block/vda/queue/write_cache)" \
    "root=$(findmnt -no OPTIONS /)"
journalctl -b -f -o json --output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID \
    -u kiosk.service -u kiosk-provision.service &
follower=$!
if [ "${mode}" != finish ]; then
    wait "${follower}"
    exit 0
fi
open_left() {
    python3 -c 'import json, sys
rows = json.load(sys.stdin)
print(sum(1 for r in rows if not r["final"] and r["state"] != "attention"))'
}
deadline=$((SECONDS + __WAIT__))
out=""
while :; do
    if [ "$(systemctl show -p ActiveState --value kiosk.service)" = active ]; then
        out="$(runuser -u kiosk -- /opt/kiosk/bin/kiosk journal --json --all \
            --config /etc/kiosk/kiosk.toml 2>/run/kiosk-powercut.err)"
        left="$(open_left <<<"${out}" 2>/dev/null || echo unreadable)"
        say "open ${left}"
        [ "${left}" = 0 ] && break
    fi
    if [ "${SECONDS}" -ge "${deadline}" ]; then
        say "timeout $(head -c 300 /run/kiosk-powercut.err | tr '\n' ' ')"
        break
    fi
    sleep 4
done
kill "${follower}"
wait "${follower}" 2>/dev/null
say "journal-begin"
printf '%s\n' "${out}" | base64 -w 76
say "journal-end"
# For the report: where this boot's time went (after the journal: never in its way).
timeout 60 systemd-analyze 2>/dev/null | head -1 | sed 's/^/AGENT analyze /'
timeout 120 systemd-analyze blame --no-pager 2>/dev/null | head -12 | sed 's/^ */AGENT blame /'
systemctl poweroff --no-block
"""

UNIT_TEXT = """[Unit]
Description=Power-cut rig agent: the kiosk's log and journal to the host (test image only)
After=systemd-journald.service

[Service]
ExecStart=/bin/bash __DIR__/agent.sh

[Install]
WantedBy=multi-user.target
"""


# TCG on a loaded 2-core host can take minutes to bring up udev's device links; systemd's 90 s
# for a device (fstab's x-systemd.device-timeout) would fail the boot partition's mount, and
# provisioning with it. The copy waits longer, as that option would make it; the image's own
# fstab is left as built.
DEVICE_WAIT = "[Unit]\nJobRunningTimeoutSec=15min\n"


def device_unit(spec: str) -> str:
    """The systemd device unit of an fstab device (`LABEL=X`, `PARTUUID=X`, a path), as
    `systemd-escape --path --suffix=device` names it."""
    for tag, folder in (("LABEL", "by-label"), ("PARTUUID", "by-partuuid"), ("UUID", "by-uuid")):
        if spec.startswith(f"{tag}="):
            spec = f"/dev/disk/{folder}/{spec[len(tag) + 1 :]}"
    path = "/".join(part for part in spec.split("/") if part)
    out = []
    for i, byte in enumerate(path.encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and i > 0):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) + ".device"


def install_agent(image: Path) -> None:
    """Write the agent and its unit into the image's root, enabled; take the image test's own
    check units out of the boot; let the boot partition's device come late (DEVICE_WAIT)."""
    with Ext4Image(image) as fs:
        for line in fs.read("/etc/fstab").decode().splitlines():
            fields = line.split()
            if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] == "/boot/firmware":
                folder = f"/etc/systemd/system/{device_unit(fields[0])}.d"
                fs.mkdirs(folder)
                fs.write(f"{folder}/powercut-rig.conf", DEVICE_WAIT.encode())
        fs.mkdirs(AGENT_DIR)
        agent = AGENT.replace("__PORT__", AGENT_PORT).replace("__WAIT__", str(FINISH_WAIT_S))
        fs.write(f"{AGENT_DIR}/agent.sh", agent.encode(), 0o755)
        fs.write(f"/etc/systemd/system/{UNIT}", UNIT_TEXT.replace("__DIR__", AGENT_DIR).encode())
        fs.mkdirs(WANTS)
        fs.symlink(f"{WANTS}/{UNIT}", f"/etc/systemd/system/{UNIT}")
        for unit in IMAGE_TEST_UNITS:
            fs.remove(f"{WANTS}/{unit}")
        fs.commit()


def boot_files(image: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the kernel and initrd off the boot partition (mtools: no mount)."""
    spec = f"{image}@@{partition_offset(image, BOOT_PARTITION)}"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    listing = subprocess.run(
        ["mdir", "-b", "-i", spec, "::/"], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    names = [name.removeprefix("::/") for name in listing]
    kernel = next((n for n in names if n.startswith("vmlinuz")), None)
    initrd = next((n for n in names if n.startswith("initrd.img")), None)
    if kernel is None or initrd is None:
        raise RuntimeError(f"no kernel or initrd on the boot partition of {image}")
    out = (dest / "vmlinuz", dest / "initrd.img")
    for name, path in zip((kernel, initrd), out, strict=True):
        subprocess.run(["mcopy", "-o", "-i", spec, f"::/{name}", str(path)], check=True, env=env)
    return out


def provision_card(image: Path, files: dict[str, bytes]) -> None:
    """Put the technician's files (name: content) on the boot partition."""
    spec = f"{image}@@{partition_offset(image, BOOT_PARTITION)}"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    staging = image.parent / "card"
    staging.mkdir(exist_ok=True)
    paths = []
    for name, data in files.items():
        path = staging / name
        path.write_bytes(data)
        path.chmod(0o600)
        paths.append(str(path))
    subprocess.run(["mcopy", "-o", "-i", spec, *paths, "::/"], check=True, env=env)
