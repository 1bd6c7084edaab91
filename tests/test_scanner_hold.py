"""The scanner `kiosk run` holds from its first moment: grabbed even while the kiosk waits out
of service with a bad config, its scans discarded (never delivered, never charged, logged
without the code), then handed to the running kiosk without a gap in the grab."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.fake_evdev import FakeInputBackend, FakeInputDevice, type_code
from drivers.scanner_evdev import EvdevScanner
from kiosk.config import ScannerSection, scanner_section
from kiosk.ports import Scanner
from kiosk.scanner_hold import HeldScanner
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.daemon_rig import DaemonRig

CODE = payment_code("0001")
MASKED = "*" * (len(CODE) - 4) + CODE[-4:]
WAIT_S = 10.0

# A config that fails the check (no [alipay], no [merchant]) but names its scanner soundly.
BAD_CONFIG = """\
[kiosk]
terminal_id = "VM-HOLD"

[sale]
mode = "fixed"
price = "1.5"

[scanner]
driver = "evdev"
match = "Barcode"
"""


@pytest.fixture
def backend() -> Iterator[FakeInputBackend]:
    fake = FakeInputBackend()
    yield fake
    fake.close()


@pytest.fixture
def held(backend: FakeInputBackend) -> Iterator[HeldScanner]:
    def build(section: ScannerSection) -> Scanner:
        return EvdevScanner(
            device=section.device,
            match=section.match,
            grab=section.grab,
            layout=section.layout,
            backend=backend,
        )

    scanner = HeldScanner(build)
    yield scanner
    scanner.release()


def config_file(tmp_path: Path, text: str = BAD_CONFIG) -> Path:
    path = tmp_path / "kiosk.toml"
    path.write_text(text)
    return path


def wait_grabbed(dev: FakeInputDevice) -> None:
    assert dev.grab_event.wait(WAIT_S), f"{dev.path} was never grabbed"


def discarded(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        r.kiosk_fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "scan.discarded"
    ]


def test_the_scanner_section_of_a_bad_config_is_read_on_its_own(tmp_path: Path) -> None:
    section = scanner_section(config_file(tmp_path))
    assert section is not None
    assert (section.driver, section.match, section.grab) == ("evdev", "Barcode", True)


@pytest.mark.parametrize(
    "text",
    [
        BAD_CONFIG.replace('match = "Barcode"', 'layout = "xx"'),  # no device, a bad layout
        BAD_CONFIG.replace("[scanner]", "[scanner"),  # not TOML
        "scanner = 5\n",
    ],
)
def test_a_scanner_section_with_a_mistake_names_no_scanner(tmp_path: Path, text: str) -> None:
    assert scanner_section(config_file(tmp_path, text)) is None


def test_a_bad_config_still_gets_its_scanner_grabbed_and_every_scan_discarded(
    tmp_path: Path,
    backend: FakeInputBackend,
    held: HeldScanner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dev = backend.plug()
    held.hold_early(config_file(tmp_path))
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert dev.wait_consumed(WAIT_S)
    held.release()  # the reader has handed over every line it read once it is let go
    assert discarded(caplog) == [
        {"event": "scan.discarded", "reason": "out of service", "code": MASKED}
    ]
    assert CODE not in caplog.text


def test_the_running_kiosk_takes_the_scans_from_the_scanner_held_since_the_start(
    tmp_path: Path, backend: FakeInputBackend, held: HeldScanner
) -> None:
    dev = backend.plug()
    path = config_file(tmp_path)
    held.hold_early(path)
    wait_grabbed(dev)
    section = scanner_section(path)
    assert section is not None
    held.hold(section)  # what `kiosk run` does once the config is good: the same scanner
    got: list[str] = []
    held.start(got.append)
    type_code(dev, CODE)
    assert dev.wait_consumed(WAIT_S)
    held.release()
    assert got == [CODE]
    assert dev.open_count == 1  # never let go in between
    assert len(dev.keys_down_at_grab) == 1


def test_a_changed_scanner_section_swaps_the_held_scanner(
    tmp_path: Path, backend: FakeInputBackend, held: HeldScanner
) -> None:
    old = backend.plug()
    new = backend.plug(name="Other Scanner", phys="usb-fake-2/input0", vendor=0x1234)
    held.hold_early(config_file(tmp_path))
    wait_grabbed(old)
    held.hold_early(config_file(tmp_path, BAD_CONFIG.replace('"Barcode"', '"Other"')))
    wait_grabbed(new)
    assert old.closed.is_set() and not old.grabbed


def test_a_config_that_names_no_scanner_keeps_the_one_held(
    tmp_path: Path, backend: FakeInputBackend, held: HeldScanner
) -> None:
    dev = backend.plug()
    held.hold_early(config_file(tmp_path))
    wait_grabbed(dev)
    held.hold_early(config_file(tmp_path, "not toml ["))
    assert dev.grabbed and not dev.closed.is_set()


def test_a_serial_scanner_is_not_held_before_the_kiosk_runs(
    tmp_path: Path, held: HeldScanner
) -> None:
    text = BAD_CONFIG.replace(
        'driver = "evdev"\nmatch = "Barcode"', 'driver = "serial"\nport = "/dev/null"'
    )
    held.hold_early(config_file(tmp_path, text))
    assert not held.healthy()


def test_a_stopping_kiosk_gets_no_more_scans_but_the_grab_stays_until_release(
    tmp_path: Path,
    backend: FakeInputBackend,
    held: HeldScanner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dev = backend.plug()
    held.hold_early(config_file(tmp_path))
    got: list[str] = []
    held.start(got.append)
    wait_grabbed(dev)
    held.close()  # the kiosk stops: it may still be finishing a sale
    held.close()
    assert dev.grabbed
    type_code(dev, CODE)
    assert dev.wait_consumed(WAIT_S)
    held.release()  # the process ends
    held.release()
    assert not dev.grabbed
    assert got == []
    assert [f["reason"] for f in discarded(caplog)] == ["stopping"]
    with pytest.raises(RuntimeError):
        held.start(got.append)


# -- the whole daemon ---------------------------------------------------------------------------


def test_kiosk_run_out_of_service_grabs_the_scanner_and_keeps_it_through_the_fix(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    scanner = {"driver": "evdev", "match": "Barcode", "port": None}
    rig = DaemonRig(
        tmp_path, simulator, extra_config={"scanner": scanner, "sale": {"price": "1.5"}}
    )
    child = [sys.executable, "tests/evdev_child.py"]
    try:
        rig.start(wait_ready=False, wrap=child, extra_env={"KIOSK_CHILD_CODE": CODE})
        # Out of service (and listening for SIGHUP) because of the config.
        out = rig.wait_log(lambda e: e.get("event") == "kiosk.out_of_service", 30, "out of service")
        assert str(out["reason"]).startswith("config: ")
        rig.wait_log(lambda e: e.get("event") == "scanner.grabbed", 30, "scanner.grabbed")
        scan = rig.wait_log(lambda e: e.get("event") == "scan.discarded", 30, "scan.discarded")
        assert scan["code"] == MASKED
        rig.rewrite_config(extra={"sale": {"price": "1.50"}})  # the technician fixes it
        rig.signal(signal.SIGHUP)
        rig.wait_log(lambda e: e.get("event") == "kiosk.ready", 30, "kiosk.ready")
        assert rig.stop() == 0
        summary = rig.wait_log(lambda e: e.get("event") == "child.summary", 10, "child.summary")
    finally:
        if rig.proc is not None and rig.proc.poll() is None:
            rig.kill()
        rig.scanner.close()
        rig.vmc.close()
    # One open and one grab for the whole run: no moment without the grab from first to last.
    assert (summary["opens"], summary["grabs"]) == (1, 1)
    assert not any(CODE in line for line in rig.raw_log)
    assert rig.journal() == []  # nothing charged, nothing even started
