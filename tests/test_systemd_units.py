"""The shipped systemd units: they parse cleanly, the kiosk unit is hardened, and it stops late
enough for a vend in flight to finish."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kiosk.boot_clock import BOOT_ID_ENV
from kiosk.config import VendSection

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = sorted(SYSTEMD_DIR.glob("*.service"))
KIOSK_BINARY = "/opt/kiosk/bin/kiosk"
# systemd-analyze only warns on these and still exits 0.
PARSE_WARNING = re.compile(r"Unknown key|Unknown section|Failed to parse|ignoring", re.IGNORECASE)
MAX_EXPOSURE = 1.2

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _runnable_copy(unit: Path, folder: Path) -> Path:
    """A copy whose commands point at a binary that exists here: verify fails on a missing one."""
    copy = folder / unit.name
    copy.write_text(unit.read_text().replace(KIOSK_BINARY, shutil.which("true") or "/bin/true"))
    return copy


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _directives(unit: Path, key: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.split("=", 1)[0].strip() == key
    ]


def _seconds(value: str) -> float:
    """A systemd time span as used in these units ("45s", "2min", "45")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value.strip())
    assert match, f"unsupported time span {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * 60 if unit in ("min", "m") else number


def test_both_units_are_shipped() -> None:
    assert {unit.name for unit in UNITS} == {"kiosk.service", "kiosk-provision.service"}


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_verifies_without_warnings(unit: Path, tmp_path: Path) -> None:
    copy = _runnable_copy(unit, tmp_path)
    result = _analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if PARSE_WARNING.search(line)]
    assert not warnings, "\n".join(warnings)


@needs_systemd_analyze
def test_kiosk_service_exposure_is_at_most_1_2(tmp_path: Path) -> None:
    copy = _runnable_copy(SYSTEMD_DIR / "kiosk.service", tmp_path)
    result = _analyze("security", "--offline=true", "--no-pager", str(copy))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_stop_timeout_outlasts_the_default_vend_timeout() -> None:
    (stop,) = _directives(SYSTEMD_DIR / "kiosk.service", "TimeoutStopSec")
    assert _seconds(stop) > VendSection().timeout_s


def test_kiosk_service_is_notify_with_a_watchdog_and_restarts() -> None:
    unit = SYSTEMD_DIR / "kiosk.service"
    assert _directives(unit, "Type") == ["notify"]
    assert _directives(unit, "NotifyAccess") == ["main"]
    assert _seconds(_directives(unit, "WatchdogSec")[0]) > 0
    assert _directives(unit, "Restart") == ["always"]
    assert _seconds(_directives(unit, "RestartSec")[0]) >= 1


def test_kiosk_service_runs_as_kiosk_with_its_device_groups() -> None:
    unit = SYSTEMD_DIR / "kiosk.service"
    assert _directives(unit, "User") == ["kiosk"]
    assert set(" ".join(_directives(unit, "SupplementaryGroups")).split()) == {
        "input",
        "gpio",
        "dialout",
    }
    # Its own user namespace: the groups are set before it is entered, so the kernel still
    # grants the device nodes by group (the image test opens each kind under the sandbox).
    assert _directives(unit, "PrivateUsers") == ["yes"]


def test_lgpio_gets_a_writable_working_directory() -> None:
    unit = SYSTEMD_DIR / "kiosk.service"
    (runtime,) = _directives(unit, "RuntimeDirectory")
    assert _directives(unit, "WorkingDirectory") == [f"/run/{runtime}"]
    assert "GPIOZERO_PIN_FACTORY=lgpio" in _directives(unit, "Environment")


def test_the_daemon_runs_without_docstrings_from_byte_code_the_image_compiled() -> None:
    """python -OO (PYTHONOPTIMIZE=2) on a read-only root: the image layer compiles the
    *.opt-2.pyc of every module it names, so each name must be a module of the kiosk's."""
    unit = SYSTEMD_DIR / "kiosk.service"
    environment = _directives(unit, "Environment")
    assert "PYTHONOPTIMIZE=2" in environment
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    layer = (SYSTEMD_DIR.parent / "image-build" / "kiosk-layer.sh").read_text()
    found = re.search(r"^DAEMON_MODULES=\((.*?)\)$", layer, re.M | re.S)
    assert found is not None, "kiosk-layer.sh names no DAEMON_MODULES"
    modules = found.group(1).split()
    assert {"kiosk.daemon", "kiosk.telemetry", "drivers.vend_mdb"} <= set(modules)
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{module}: no such module"


def test_the_kiosk_is_given_the_boot_id_its_proc_subset_hides() -> None:
    # Rule 7 across a restart stamps each code's hash with the boot id and CLOCK_BOOTTIME;
    # ProcSubset=pid hides /proc/sys/kernel/random/boot_id, so systemd passes it (%b).
    unit = SYSTEMD_DIR / "kiosk.service"
    assert _directives(unit, "ProcSubset") == ["pid"]
    assert f"{BOOT_ID_ENV}=%b" in _directives(unit, "Environment")


def test_device_access_is_limited_to_scanner_gpio_and_serial() -> None:
    unit = SYSTEMD_DIR / "kiosk.service"
    assert _directives(unit, "DevicePolicy") == ["closed"]
    allowed = {line.split()[0]: line.split()[1] for line in _directives(unit, "DeviceAllow")}
    assert allowed["char-input"] == "r"
    assert allowed["char-gpiochip"] == "rw"
    assert {"char-ttyACM", "char-ttyUSB", "char-ttyAMA"} <= allowed.keys()


def test_kiosk_service_reaches_unicast_addresses_only() -> None:
    unit = SYSTEMD_DIR / "kiosk.service"
    assert _directives(unit, "IPAddressDeny") == ["any"]
    allowed = " ".join(_directives(unit, "IPAddressAllow")).split()
    assert "localhost" in allowed
    # Everything else is unicast space: no catch-all, no multicast or limited broadcast.
    assert not {"any", "0.0.0.0/0", "::/0", "multicast", "224.0.0.0/4", "ff00::/8"} & set(allowed)
    networks = [ipaddress.ip_network(entry) for entry in allowed if entry != "localhost"]
    for address in ("1.1.1.1", "203.0.113.9", "192.168.1.1", "2001:db8::1", "fe80::1"):
        assert any(ipaddress.ip_address(address) in net for net in networks), address
    for address in ("224.0.0.251", "239.255.255.250", "255.255.255.255", "ff02::fb"):
        assert not any(ipaddress.ip_address(address) in net for net in networks), address


def test_kiosk_service_starts_after_time_sync_and_provisioning() -> None:
    after = " ".join(_directives(SYSTEMD_DIR / "kiosk.service", "After")).split()
    assert {"time-sync.target", "network-online.target", "kiosk-provision.service"} <= set(after)


def test_provisioning_runs_only_when_a_config_was_dropped_on_the_boot_partition() -> None:
    unit = SYSTEMD_DIR / "kiosk-provision.service"
    assert _directives(unit, "Type") == ["oneshot"]
    assert _directives(unit, "ConditionPathExists") == [
        "|/boot/firmware/kiosk.toml",
        "|/boot/firmware/kiosk-keygen.txt",  # or when asked to make the merchant key pair
    ]
    assert "/boot/firmware" in " ".join(_directives(unit, "RequiresMountsFor")).split()
    assert "kiosk.service" in _directives(unit, "Before")
    (command,) = _directives(unit, "ExecStart")
    assert command == f"{KIOSK_BINARY} provision --from /boot/firmware/kiosk.toml"


def test_udev_rules_keep_modemmanager_off_serial_adapters() -> None:
    rules = (SYSTEMD_DIR / "udev" / "rules.d" / "60-kiosk.rules").read_text()
    serial = [line for line in rules.splitlines() if 'SUBSYSTEM=="tty"' in line]
    assert serial, "no rule for serial adapters"
    assert all('ENV{ID_MM_DEVICE_IGNORE}="1"' in line for line in serial)
    assert all('GROUP="dialout"' in line for line in serial)


def test_udev_rules_give_gpiochips_to_the_gpio_group() -> None:
    rules = (SYSTEMD_DIR / "udev" / "rules.d" / "60-kiosk.rules").read_text()
    assert re.search(r'KERNEL=="gpiochip\[0-9\]\*".*GROUP="gpio".*MODE="0660"', rules)


def test_udev_rules_link_known_scanner_vendors() -> None:
    rules = (SYSTEMD_DIR / "udev" / "rules.d" / "60-kiosk.rules").read_text()
    (line,) = [line for line in rules.splitlines() if "kiosk-scanner" in line and "SYMLINK" in line]
    for vendor in ("0c2e", "05e0", "05f9", "1eab"):
        assert vendor in line
    assert 'GROUP="input"' in line
