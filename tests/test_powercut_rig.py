"""The power-cut rig's host parts, without booting anything (the boots are `make powercut` and
the short run inside `make image-test`): the guest log's reading, the cut schedule, the scan of
a whole card image for payment codes, the ext4 writer and the kiosk layer's refresh; and the
image's fstab, which a power cut found wanting."""

from __future__ import annotations

import base64
import importlib.util
import json
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.campaign_checks import codes_in_file
from tests.powercut import guest
from tests.powercut.ext4 import SITE_PACKAGES, Ext4Image, refresh_kiosk
from tests.powercut.rig import POINTS, AgentLog, parse_kiosk_line, schedule

REPO = Path(__file__).resolve().parent.parent
needs_e2fsprogs = pytest.mark.skipif(
    not (shutil.which("debugfs") and shutil.which("mkfs.ext4") and shutil.which("e2fsck")),
    reason="e2fsprogs (debugfs, mkfs.ext4, e2fsck) not installed",
)


def test_kiosk_text_lines_are_read_back_as_events() -> None:
    line = (
        'info kiosk.daemon: event=kiosk.ready terminal_id=POWERCUT out_of_service="clock not set"'
    )
    assert parse_kiosk_line(line) == {
        "level": "info",
        "logger": "kiosk.daemon",
        "event": "kiosk.ready",
        "terminal_id": "POWERCUT",
        "out_of_service": "clock not set",
    }
    plain = parse_kiosk_line("error kiosk.daemon: sale failed\nTraceback ...")
    assert plain["event"] == "message" and plain["message"].startswith("sale failed")


def test_agent_log_reads_events_systemd_lines_and_the_journal_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    log = AgentLog(path, 1)
    rows = [{"ref": "R1", "state": "vended", "final": True}]
    encoded = base64.b64encode(json.dumps(rows).encode()).decode()
    kiosk = {
        "SYSLOG_IDENTIFIER": "kiosk",
        "MESSAGE": "info kiosk.daemon: event=indicator state=ready",
    }
    raw = {"SYSLOG_IDENTIFIER": "kiosk", "MESSAGE": list(b"info kiosk.x: event=odd v=\xff")}
    systemd = {"SYSLOG_IDENTIFIER": "systemd", "MESSAGE": "Started kiosk.service - kiosk."}
    text = (
        "AGENT boot mode=finish write_cache=write_back\n"
        + "\n".join(json.dumps(e) for e in (kiosk, raw, systemd))
        + f"\nAGENT journal-begin\n{encoded[:10]}\n{encoded[10:]}\nAGENT journal-end\n"
    )
    cut = len(text) // 3  # a line split between two reads
    path.write_text(text[:cut])
    log.poll()
    with open(path, "a") as f:
        f.write(text[cut:])
    log.poll()
    assert [e["event"] for e in log.events] == ["indicator", "odd"]
    assert log.events[0]["state"] == "ready"
    assert log.systemd == ["Started kiosk.service - kiosk."]
    assert log.agent[0].startswith("boot mode=finish")
    assert log.journal() == rows


def test_the_schedule_spreads_cuts_over_every_point() -> None:
    twenty = Counter(schedule(random.Random(5), 20))
    assert twenty == {point: 4 for point in POINTS}
    for seed in range(20):
        three = schedule(random.Random(seed), 3)
        assert len(set(three)) == 3


def test_codes_are_found_anywhere_in_a_sparse_image(tmp_path: Path) -> None:
    codes = {"281230000000070001", "281230000000080002", "281230000000090003"}
    image = tmp_path / "card.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)  # holes
        f.seek(3 << 20)
        f.write(b"\x00noise 2812300000000700019999 ")  # inside a longer run of digits
        f.seek((5 << 20) - 7)
        f.write(b"281230000000080002")  # across a chunk boundary
    assert codes_in_file(image, codes, chunk=1 << 20) == {
        "281230000000070001",
        "281230000000080002",
    }
    assert codes_in_file(image, {"12345678901234567890"}, chunk=1 << 20) == set()


def _ext4(tmp_path: Path, files: dict[str, str]) -> Path:
    tree = tmp_path / "tree"
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    image = tmp_path / "root.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-d", str(tree), str(image), "16M"], check=True, capture_output=True
    )
    return image


def _fsck_clean(image: Path) -> None:
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@needs_e2fsprogs
def test_ext4_writer_writes_links_and_removes_without_mounting(tmp_path: Path) -> None:
    image = _ext4(tmp_path, {"etc/old/a.txt": "a", "etc/old/sub/b.txt": "b", "etc/keep": "k"})
    with Ext4Image(image, offset=0) as fs:
        fs.mkdirs("/usr/local/lib/agent")
        fs.write("/usr/local/lib/agent/run.sh", b"#!/bin/sh\n", 0o755)
        fs.write("/etc/keep", b"replaced", 0o600)
        fs.symlink("/etc/link", "/usr/local/lib/agent/run.sh")
        fs.remove_tree("/etc/old")
        fs.commit()
        assert fs.read("/usr/local/lib/agent/run.sh") == b"#!/bin/sh\n"
        assert fs.read("/etc/keep") == b"replaced"
        assert not fs.exists("/etc/old")
        stat = fs.debugfs("stat /usr/local/lib/agent/run.sh")
        assert re.search(r"Mode:\s+0755", stat) and re.search(r"User:\s+0\s+Group:\s+0", stat)
        assert 'Fast link dest: "/usr/local/lib/agent/run.sh"' in fs.debugfs("stat /etc/link")
    _fsck_clean(image)


@needs_e2fsprogs
def test_refresh_replaces_the_kiosk_packages_with_valid_byte_code(tmp_path: Path) -> None:
    site = SITE_PACKAGES.lstrip("/")
    image = _ext4(
        tmp_path,
        {
            f"{site}/kiosk/gone.py": "raise SystemExit('stale module')\n",
            f"{site}/kiosk/__pycache__/gone.cpython-311.pyc": "stale",
            f"{site}/drivers/__init__.py": "",
            "usr/lib/systemd/system/kiosk.service": "[Service]\n",
        },
    )
    changed = refresh_kiosk(image, offset=0)
    assert f"{SITE_PACKAGES}/kiosk" in changed
    out = tmp_path / "out"
    with Ext4Image(image, offset=0) as fs:
        assert not fs.exists(f"{SITE_PACKAGES}/kiosk/gone.py")
        assert (
            fs.read(f"{SITE_PACKAGES}/kiosk/journal.py") == (REPO / "kiosk/journal.py").read_bytes()
        )
        assert (
            fs.read("/usr/lib/systemd/system/kiosk.service")
            == (REPO / "systemd/kiosk.service").read_bytes()
        )
        copy = fs.dump_tree(f"{SITE_PACKAGES}/kiosk", out)
    # The byte code is hash-checked against its source: valid whatever the files' mtimes.
    pyc = copy / "__pycache__" / "journal.cpython-311.pyc"
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11  # hash-based, checked
    # And the service's (`python -OO`), without the docstrings.
    optimized = copy / "__pycache__" / "journal.cpython-311.opt-2.pyc"
    assert int.from_bytes(optimized.read_bytes()[4:8], "little") == 0b11
    assert len(optimized.read_bytes()) < len(pyc.read_bytes())
    spec = importlib.util.spec_from_file_location("kiosk_copy_journal", copy / "journal.py")
    assert spec is not None and spec.loader is not None
    assert spec.loader.get_code("kiosk_copy_journal") is not None  # type: ignore[attr-defined]
    _fsck_clean(image)


def test_the_agent_script_parses() -> None:
    agent = guest.AGENT.replace("__PORT__", guest.AGENT_PORT).replace("__WAIT__", "60")
    done = subprocess.run(["bash", "-n"], input=agent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck"):
        lint = subprocess.run(
            ["shellcheck", "-s", "bash", "-"], input=agent, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout


def test_the_boot_partition_never_holds_the_boot_up() -> None:
    """A power cut leaves the FAT boot partition dirty (it has no journal), and under load its
    device can come late: a boot that waits for it fails into emergency mode, and the kiosk,
    which needs nothing from it after provisioning, never starts. It is `nofail`."""
    script = (REPO / "image-build/build-debian-image.sh").read_text()
    # The options may be a variable of the script (NAME=value at the start of a line).
    names = dict(re.findall(r"^([A-Z_]+)=(\S+)$", script, flags=re.MULTILINE))
    lines = [line.split() for line in script.splitlines() if "/boot/firmware" in line]
    mounts = [fields for fields in lines if len(fields) >= 4 and fields[2] == "vfat"]
    assert mounts, "no fstab line for /boot/firmware in build-debian-image.sh"
    for fields in mounts:
        options = re.sub(r"\$\{([A-Z_]+)\}", lambda m: names.get(m[1], m[0]), fields[3])
        assert "nofail" in options.split(","), (fields, options)


def test_device_units_are_named_as_systemd_names_them() -> None:
    specs = ("LABEL=RASPIFIRM", "PARTUUID=1234abcd-01", "/dev/vda1")
    expected = [
        "dev-disk-by\\x2dlabel-RASPIFIRM.device",
        "dev-disk-by\\x2dpartuuid-1234abcd\\x2d01.device",
        "dev-vda1.device",
    ]
    assert [guest.device_unit(spec) for spec in specs] == expected


def test_the_initramfs_checks_the_root_after_a_cut() -> None:
    """The image is built in a chroot, where initramfs-tools' FSTYPE=auto finds no root device:
    its fsck hook then left fsck out, the initramfs printed "fsck not present, so skipping root
    file system" after every power cut, and `rw` on the command line skips systemd's check
    too. The build names the root's type and fails if fsck.ext4 is missing."""
    script = (REPO / "image-build/build-debian-image.sh").read_text()
    body = script[script.index("build_initramfs() {") :]
    body = body[: body.index("\n}\n")]
    assert 'echo "FSTYPE=ext4" >"${ROOT}/etc/initramfs-tools/conf.d/' in body
    assert body.index("FSTYPE=ext4") < body.index("update-initramfs")
    assert "lsinitramfs" in body and "fsck" in body.split("lsinitramfs", 1)[1]
