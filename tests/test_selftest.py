"""`kiosk selftest` at a machine: lights and buzzer on gpiozero's MockFactory, a serial
scanner on a pty, a relay vend output; each step is reported."""

from __future__ import annotations

import os
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin

from kiosk.selftest import run_selftest
from tests.conftest import PARTNER, payment_code


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = MockFactory(pin_class=MockPWMPin)
    Device.pin_factory = factory
    try:
        yield factory
    finally:
        factory.reset()
        Device.pin_factory = None


@pytest.fixture
def scanner_pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def _config(tmp_path: Path, port: str) -> Path:
    path = tmp_path / "kiosk.toml"
    path.write_text(f"""
[kiosk]
terminal_id = "VM-SELF"
state_dir = "{tmp_path / "state"}"
[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "{PARTNER}"
sign_type = "MD5"
md5_key_file = "{tmp_path / "md5.key"}"
[merchant]
secondary_merchant_id = "M-1"
store_id = "S-1"
[sale]
price = "1.50"
[scanner]
driver = "serial"
port = "{port}"
[indicators]
driver = "gpio"
green = 17
red = 27
amber = 22
buzzer = 18
[vend]
driver = "relay"
relay_pin = 23
pulse_ms = 50
""")
    key = tmp_path / "md5.key"
    key.write_text("8f0b3c7e2a9d4f6b1c5e7a9d3f2b4c6e")
    key.chmod(0o600)
    return path


def test_selftest_reports_every_step_and_pulses_the_relay(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str]
) -> None:
    master, port = scanner_pty
    lines: list[str] = []
    waiting = threading.Event()

    relay = pins.pin(23)
    scanned = threading.Event()

    def type_until_read() -> None:
        # The port may open a moment after the prompt (pyserial flushes input on open):
        # a technician would scan again, and so does this one.
        waiting.wait(10)
        for _ in range(30):
            os.write(master, (payment_code("0001") + "\r").encode())
            if scanned.wait(0.3):
                return

    def out(line: str) -> None:
        lines.append(line)
        if line.startswith("scan any"):
            waiting.set()
        if "scanner:" in line:
            scanned.set()

    typist = threading.Thread(target=type_until_read)
    typist.start()
    status = run_selftest(_config(tmp_path, port), scan_timeout_s=10, out=out, step_s=0.01)
    typist.join(10)
    assert status == 0, lines
    assert any("[ok] lights: ready" in line for line in lines)
    assert any("[ok] buzzer: error" in line for line in lines)
    assert any("[ok] scanner: read a payment code" in line and "0001" in line for line in lines)
    assert any("[ok] vend output: vended" in line for line in lines)
    assert any(change.state for change in relay.states) and not relay.state  # one pulse, then off
    assert lines[-1] == "selftest: all good"


def test_selftest_says_which_step_failed_when_no_scan_comes(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str]
) -> None:
    _, port = scanner_pty
    lines: list[str] = []
    status = run_selftest(
        _config(tmp_path, port), scan_timeout_s=0.3, out=lines.append, step_s=0.01
    )
    assert status == 1
    assert "[FAIL] scanner: no scan arrived" in lines
    assert lines[-1] == "selftest: 1 step(s) failed"
