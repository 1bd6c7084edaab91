"""The serial scanner driver on real ptys: line endings, garbage, overlong lines, replug."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from drivers.scanner_serial import LineSplitter, SerialScanner

CODE = "281234567890123456"
OTHER_CODE = "301122334455667788"
WAIT_S = 5.0


class Pty:
    """A pty pair whose slave is what the driver opens; the test writes to the master."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        os.close(slave)  # the master keeps the pair alive; the driver opens the slave by name

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class RecordingSerial:
    """`serial.Serial` that tells the test each time the driver has opened (and set up) the port:
    bytes written before that would go through the pty's default line discipline."""

    def __init__(self) -> None:
        self.opens = 0
        self.changed = threading.Condition()

    def __call__(self, *args: Any, **kwargs: Any) -> serial.Serial:
        port = serial.Serial(*args, **kwargs)
        with self.changed:
            self.opens += 1
            self.changed.notify_all()
        return port

    def wait_opens(self, n: int, timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.opens >= n, timeout)


class Scans:
    def __init__(self) -> None:
        self.queue: queue.Queue[str] = queue.Queue()

    def __call__(self, line: str) -> None:
        self.queue.put(line)

    def next(self, timeout: float = WAIT_S) -> str:
        return self.queue.get(timeout=timeout)


@pytest.fixture
def pty_pair() -> Iterator[Pty]:
    pair = Pty()
    yield pair
    pair.unplug()


@pytest.fixture
def rig(pty_pair: Pty) -> Iterator[tuple[Pty, SerialScanner, Scans, RecordingSerial]]:
    factory = RecordingSerial()
    scanner = SerialScanner(pty_pair.slave_name, serial_factory=factory)
    scans = Scans()
    scanner.start(scans)
    assert factory.wait_opens(1)
    yield pty_pair, scanner, scans, factory
    scanner.close()


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_each_line_ending_ends_one_code(
    rig: tuple[Pty, SerialScanner, Scans, RecordingSerial], ending: bytes
) -> None:
    pty, _, scans, _ = rig
    pty.write(CODE.encode() + ending + OTHER_CODE.encode() + ending)
    assert scans.next() == CODE
    assert scans.next() == OTHER_CODE
    assert scans.queue.empty()


def test_crlf_gives_no_empty_extra_line() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"2812\r") == ["2812"]
    assert splitter.feed(b"\n3012\r\n") == ["3012"]


def test_surrounding_whitespace_is_stripped(
    rig: tuple[Pty, SerialScanner, Scans, RecordingSerial],
) -> None:
    pty, _, scans, _ = rig
    pty.write(b"  " + CODE.encode() + b" \t\r\n")
    assert scans.next() == CODE


def test_overlong_line_is_dropped_and_logged(
    rig: tuple[Pty, SerialScanner, Scans, RecordingSerial], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pty, _, scans, _ = rig
    pty.write(b"9" * 65 + b"\r\n" + CODE.encode() + b"\r\n")
    assert scans.next() == CODE
    assert any(r.getMessage() == "scanner.dropped" for r in caplog.records)
    assert "9" * 20 not in caplog.text


def test_line_of_64_bytes_is_kept() -> None:
    assert LineSplitter().feed(b"7" * 64 + b"\n") == ["7" * 64]


def test_garbage_bytes_pass_on_as_replacement_characters(
    rig: tuple[Pty, SerialScanner, Scans, RecordingSerial],
) -> None:
    pty, _, scans, _ = rig
    pty.write(b"28\xff\xfe12\r\n")
    assert scans.next() == "28\ufffd\ufffd12"


def test_half_line_is_dropped_after_silence() -> None:
    splitter = LineSplitter()
    splitter.feed(b"2812")
    splitter.reset("idle")
    assert splitter.feed(b"3012\n") == ["3012"]


def test_unplug_then_new_pty_at_the_same_path_reconnects(tmp_path: Path) -> None:
    first, second = Pty(), Pty()
    link = tmp_path / "ttyACM-scanner"
    link.symlink_to(first.slave_name)
    factory = RecordingSerial()
    scans = Scans()
    scanner = SerialScanner(str(link), serial_factory=factory)
    try:
        scanner.start(scans)
        assert factory.wait_opens(1)
        first.write(CODE.encode() + b"\n")
        assert scans.next() == CODE

        # Pull the cable; the device comes back (as udev would re-point a by-id link).
        first.unplug()
        tmp_link = tmp_path / "new-link"
        tmp_link.symlink_to(second.slave_name)
        tmp_link.replace(link)
        assert factory.wait_opens(2)
        assert scanner.healthy()
        second.write(OTHER_CODE.encode() + b"\r\n")
        assert scans.next() == OTHER_CODE
    finally:
        scanner.close()
        first.unplug()
        second.unplug()


def test_port_missing_at_start_is_opened_when_it_appears(tmp_path: Path, pty_pair: Pty) -> None:
    link = tmp_path / "ttyACM-scanner"
    factory = RecordingSerial()
    scans = Scans()
    scanner = SerialScanner(str(link), serial_factory=factory)
    try:
        scanner.start(scans)
        assert scanner.healthy()
        link.symlink_to(pty_pair.slave_name)
        assert factory.wait_opens(1)
        pty_pair.write(CODE.encode() + b"\n")
        assert scans.next() == CODE
    finally:
        scanner.close()


def test_port_is_opened_exclusively() -> None:
    seen: dict[str, Any] = {}
    opened = threading.Event()

    def factory(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        opened.set()
        raise serial.SerialException("no port here")

    scanner = SerialScanner("/dev/nonexistent-scanner", baud=115200, serial_factory=factory)
    scanner.start(lambda line: None)
    try:
        assert opened.wait(WAIT_S)
    finally:
        scanner.close()
    assert seen["exclusive"] is True
    assert seen["baudrate"] == 115200
    assert seen["timeout"] is None  # idle reads block; close() wakes them with cancel_read


def test_close_is_prompt_and_safe_twice(
    rig: tuple[Pty, SerialScanner, Scans, RecordingSerial],
) -> None:
    _, scanner, _, _ = rig
    began = time.monotonic()
    scanner.close()
    scanner.close()
    assert time.monotonic() - began < 1.0
    assert not scanner.healthy()
