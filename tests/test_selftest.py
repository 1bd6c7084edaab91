"""`kiosk selftest` at a machine: the gateway simulator on loopback for DNS, TLS and a signed
request, lights and buzzer on gpiozero's MockFactory, a serial scanner on a pty, a relay vend
output; each step is reported."""

from __future__ import annotations

import os
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin

from drivers.mdb_board import MdbBoard
from kiosk.config import load_config
from kiosk.selftest import check_mdb_board, run_selftest
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code

ALIPAY = "https://globalmapi.alipay.com/gateway.do"


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


def _config(tmp_path: Path, port: str, gateway: str = ALIPAY, md5_key: str = "") -> Path:
    path = tmp_path / "kiosk.toml"
    path.write_text(f"""
[kiosk]
terminal_id = "VM-SELF"
state_dir = "{tmp_path / "state"}"
[alipay]
gateway = "{gateway}"
allow_http = {"true" if gateway.startswith("http:") else "false"}
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
    key.write_text(md5_key or "8f0b3c7e2a9d4f6b1c5e7a9d3f2b4c6e")
    key.chmod(0o600)
    return path


def test_selftest_reports_every_step_and_pulses_the_relay(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str], simulator: GatewaySimulator
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
    status = run_selftest(
        _config(tmp_path, port, simulator.url),
        scan_timeout_s=10,
        out=out,
        step_s=0.01,
        clock_synced=lambda: True,
    )
    typist.join(10)
    assert status == 0, lines
    assert lines[:5] == [
        "[ok] gateway DNS 127.0.0.1: 127.0.0.1",
        "[skip] gateway TLS 127.0.0.1: plain http (alipay.allow_http): no TLS",
        "[ok] clock: synchronised",
        "[ok] Alipay signed request: accepted; the answer's signature verified",
        "[ok] lights: ready: look at the panel",
    ]
    assert any("[ok] lights: ready" in line for line in lines)
    assert any("[ok] buzzer: error" in line for line in lines)
    assert any("[ok] scanner: read a payment code" in line and "0001" in line for line in lines)
    assert any("[ok] vend output: vended" in line for line in lines)
    assert any(change.state for change in relay.states) and not relay.state  # one pulse, then off
    assert lines[-1] == "selftest: all good"


def test_selftest_says_which_step_failed_when_no_scan_comes(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str], simulator: GatewaySimulator
) -> None:
    _, port = scanner_pty
    lines: list[str] = []
    status = run_selftest(
        _config(tmp_path, port, simulator.url),
        scan_timeout_s=0.3,
        out=lines.append,
        step_s=0.01,
        clock_synced=lambda: True,
    )
    assert status == 1
    assert "[FAIL] scanner: no scan arrived" in lines
    assert lines[-1] == "selftest: 1 step(s) failed"


def test_selftest_says_alipay_refused_a_request_signed_with_the_wrong_key(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str], simulator: GatewaySimulator
) -> None:
    _, port = scanner_pty
    lines: list[str] = []
    config = _config(tmp_path, port, simulator.url, md5_key="0" * 32)
    run_selftest(config, scan_timeout_s=0.1, out=lines.append, step_s=0, clock_synced=lambda: True)
    signed = next(line for line in lines if "Alipay signed request" in line)
    assert signed.startswith("[FAIL] Alipay signed request: not accepted: ILLEGAL_SIGN"), signed


def test_selftest_fails_an_unsynchronised_clock(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str], simulator: GatewaySimulator
) -> None:
    _, port = scanner_pty
    lines: list[str] = []
    config = _config(tmp_path, port, simulator.url)
    run_selftest(config, scan_timeout_s=0.1, out=lines.append, step_s=0, clock_synced=lambda: False)
    assert "[FAIL] clock: not synchronised: no payments until NTP or timesyncd sets it" in lines


def test_selftest_with_a_person_asks_what_it_cannot_see(
    tmp_path: Path, pins: MockFactory, scanner_pty: tuple[int, str], simulator: GatewaySimulator
) -> None:
    _, port = scanner_pty
    lines: list[str] = []
    asked: list[str] = []

    def ask(question: str) -> bool:
        asked.append(question)
        return question != "did the red light come on?"

    config = _config(tmp_path, port, simulator.url)
    run_selftest(config, scan_timeout_s=0.1, out=lines.append, ask=ask, clock_synced=lambda: True)
    assert asked[0] == "did the green light come on?"
    assert len(asked) == 7  # four light states, two sounds, the relay (no sense input)
    assert asked[-1] == "did the relay click (or the machine dispense)?"
    assert "[ok] lights: ready: seen" in lines
    assert "[FAIL] lights: declined: not seen" in lines
    assert "[ok] buzzer: error: heard" in lines


# -- the MDB board (vend.driver = "mdb") ----------------------------------------------------


def _mdb_config(tmp_path: Path, scanner_port: str, gateway: str, board_port: str) -> Path:
    path = _config(tmp_path, scanner_port, gateway)
    text = path.read_text()
    text = text.replace('[sale]\nprice = "1.50"\n', '[sale]\nmode = "vmc"\n')
    text = text.replace(
        '[vend]\ndriver = "relay"\nrelay_pin = 23\npulse_ms = 50\n',
        f'[vend]\ndriver = "mdb"\nport = "{board_port}"\nmdb_address = 2\n',
    )
    path.write_text(text)
    return path


@pytest.fixture
def board() -> Iterator[MdbBoard]:
    board = MdbBoard.on_pty().start()
    try:
        yield board
    finally:
        board.close()


def test_selftest_configures_the_mdb_board_and_sees_the_reader_enabled(
    tmp_path: Path,
    pins: MockFactory,
    scanner_pty: tuple[int, str],
    simulator: GatewaySimulator,
    board: MdbBoard,
) -> None:
    _, port = scanner_pty
    assert board.device is not None
    lines: list[str] = []
    status = run_selftest(
        _mdb_config(tmp_path, port, simulator.url, board.device),
        scan_timeout_s=0.1,
        out=lines.append,
        step_s=0,
        clock_synced=lambda: True,
    )
    assert status == 1  # nobody scanned
    assert lines[3:6] == [
        "[ok] Alipay signed request: accepted; the answer's signature verified",
        f"[ok] MDB board: configured on {board.device} at 115200 baud, cashless #2",
        "[ok] MDB reader: the machine has enabled it (ENABLED)",
    ]
    assert board.config()["mdb-addr"] == "0x60"
    assert board.host_lines()[-1] == "C,0"  # left off: the machine sells for cash
    assert not [line for line in lines if "vend" in line]
    assert lines[-1] == "selftest: 1 step(s) failed"


def test_selftest_names_the_setting_the_mdb_board_refused(
    tmp_path: Path, scanner_pty: tuple[int, str], board: MdbBoard
) -> None:
    _, port = scanner_pty
    assert board.device is not None
    board.refuse("mdb-currency-code")
    config = load_config(_mdb_config(tmp_path, port, ALIPAY, board.device))
    lines: list[str] = []
    check_mdb_board(
        config,
        lambda name, ok, detail="", mark=None: lines.append(
            f"[{mark or ('ok' if ok else 'FAIL')}] {name}: {detail}"
        ),
    )
    assert lines[0] == (
        f"[FAIL] MDB board: {board.device} at 115200 baud: the MDB board refused "
        "mdb-currency-code=0x1840: invalid parameter"
    ), lines
    assert lines[1] == "[skip] MDB reader: skipped: the board is not configured"
