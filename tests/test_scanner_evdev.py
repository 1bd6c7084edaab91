"""The evdev scanner driver against the fake input backend: finding, reading, grabbing, hotplug."""

from __future__ import annotations

import errno
import logging
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from evdev import ecodes as e

from drivers.fake_evdev import FakeInputBackend, FakeInputDevice, type_code
from drivers.scanner_evdev import EvdevScanner, physical_device

CODE = "281234567890123456"
OTHER_CODE = "301122334455667788"
WAIT_S = 5.0


@pytest.fixture
def backend() -> Iterator[FakeInputBackend]:
    fake = FakeInputBackend()
    yield fake
    fake.close()


class Scans:
    """Collects what the scanner hands over; `next()` waits for one."""

    def __init__(self) -> None:
        self.queue: queue.Queue[str] = queue.Queue()

    def __call__(self, line: str) -> None:
        self.queue.put(line)

    def next(self, timeout: float = WAIT_S) -> str:
        return self.queue.get(timeout=timeout)

    def none_within(self, timeout: float) -> bool:
        try:
            self.queue.get(timeout=timeout)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def scans() -> Scans:
    return Scans()


@pytest.fixture
def started(backend: FakeInputBackend, scans: Scans) -> Iterator[list[EvdevScanner]]:
    """Scanners made by a test; each is closed at the end even when the test fails."""
    made: list[EvdevScanner] = []
    yield made
    for scanner in made:
        scanner.close()


def start(
    made: list[EvdevScanner], backend: FakeInputBackend, on_scan: Scans, **kwargs: object
) -> EvdevScanner:
    kwargs.setdefault("match", "Barcode")
    scanner = EvdevScanner(backend=backend, **kwargs)  # type: ignore[arg-type]
    made.append(scanner)
    scanner.start(on_scan)
    return scanner


def wait_grabbed(dev: FakeInputDevice) -> None:
    assert dev.grab_event.wait(WAIT_S), f"{dev.path} was never grabbed"


def test_typed_code_arrives_at_on_scan(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_shifted_characters_arrive_decoded(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(dev)
    type_code(dev, "Kiosk-42!")
    assert scans.next() == "Kiosk-42!"


def test_configured_layout_is_used(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans, layout="fr")
    wait_grabbed(dev)
    type_code(dev, CODE, layout="fr")
    assert scans.next() == CODE


def test_silence_is_measured_between_key_timestamps_not_reads(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(dev)
    t = time.monotonic()
    # All read in one batch, but typed with a 1 s pause after "99": that stray start is dropped.
    for i, key in enumerate([e.KEY_9, e.KEY_9]):
        dev.emit(e.EV_KEY, key, 1, at=t + i * 0.001)
        dev.emit(e.EV_KEY, key, 0, at=t + i * 0.001)
    for i, char in enumerate(CODE):
        code = getattr(e, f"KEY_{char}")
        dev.emit(e.EV_KEY, code, 1, at=t + 1.0 + i * 0.001)
        dev.emit(e.EV_KEY, code, 0, at=t + 1.0 + i * 0.001)
    dev.emit(e.EV_KEY, e.KEY_ENTER, 1, at=t + 1.1)
    assert scans.next() == CODE


def test_code_with_lost_events_is_not_handed_over(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(dev)
    type_code(dev, CODE[:6], enter=False)
    dev.emit(e.EV_SYN, e.SYN_DROPPED, 0)  # the kernel dropped the middle of the code
    type_code(dev, CODE[-8:])
    type_code(dev, OTHER_CODE)
    assert scans.next() == OTHER_CODE


def test_two_scanners_interleaved_deliver_their_own_codes(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    a = backend.plug(name="Barcode A", phys="usb-fake-1/input0", product=1)
    b = backend.plug(name="Barcode B", phys="usb-fake-2/input0", product=2)
    start(started, backend, scans, match="Barcode A")
    start(started, backend, scans, match="Barcode B")
    wait_grabbed(a)
    wait_grabbed(b)
    # Both type at once, key by key: each node's decoder keeps its own line and shift.
    a.key(e.KEY_LEFTSHIFT, 1)
    for ka, kb in zip(CODE, OTHER_CODE, strict=True):
        a.tap(getattr(e, f"KEY_{ka}"))
        b.tap(getattr(e, f"KEY_{kb}"))
    a.key(e.KEY_LEFTSHIFT, 0)
    a.tap(e.KEY_ENTER)
    b.tap(e.KEY_ENTER)
    got = {scans.next(), scans.next()}
    assert got == {"@*!@#$%^&*()!@#$%^", OTHER_CODE}  # CODE with shift held


def test_every_event_node_of_one_scanner_is_read(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    keyboard = backend.plug(name="Honeywell Barcode", phys="usb-0000:00:14.0-3/input0")
    keypad = backend.plug(name="Honeywell Keypad", phys="usb-0000:00:14.0-3/input1")
    start(started, backend, scans, match="Honeywell Barcode")
    wait_grabbed(keyboard)
    wait_grabbed(keypad)
    type_code(keypad, CODE)
    assert scans.next() == CODE
    type_code(keyboard, OTHER_CODE)
    assert scans.next() == OTHER_CODE


def test_other_devices_are_left_alone(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    keyboard = backend.plug(name="AT Keyboard", phys="isa0060/serio0/input0", vendor=1, product=1)
    scanner_dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(scanner_dev)
    assert not keyboard.grabbed
    type_code(keyboard, CODE)
    type_code(scanner_dev, OTHER_CODE)
    assert scans.next() == OTHER_CODE


def test_grab_waits_until_no_key_is_down(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    dev.key(e.KEY_LEFTSHIFT, 1)  # held before the kiosk starts
    start(started, backend, scans)
    assert dev.opened.wait(WAIT_S)
    assert not dev.grab_event.wait(0.3)
    dev.key(e.KEY_LEFTSHIFT, 0)
    wait_grabbed(dev)
    assert dev.keys_down_at_grab == [[]]


def test_grab_is_released_on_close(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    scanner = start(started, backend, scans)
    wait_grabbed(dev)
    scanner.close()
    assert not dev.grabbed
    assert not dev.is_open
    assert not scanner.healthy()


def test_no_grab_when_configured_off(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans, grab=False)
    assert dev.opened.wait(WAIT_S)
    type_code(dev, CODE)
    assert scans.next() == CODE
    assert not dev.grabbed


def test_grab_held_by_another_process_still_reads(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    dev.grab()  # someone else has it
    dev.grab_event.clear()
    start(started, backend, scans)
    assert dev.opened.wait(WAIT_S)
    type_code(dev, CODE)
    assert scans.next() == CODE


def grab_events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [
        r.kiosk_fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == name
    ]


FAST_RETRY = (0.01, 0.04)  # the grab backoff, short for tests


def test_a_refused_grab_is_tried_again_until_it_is_taken(
    backend: FakeInputBackend,
    scans: Scans,
    started: list[EvdevScanner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.scanner_evdev")
    dev = backend.plug()
    dev.refuse_grabs(errno.EBUSY, errno.EBUSY, errno.EBUSY)
    scanner = start(started, backend, scans, grab_backoff_s=FAST_RETRY)
    wait_grabbed(dev)
    assert dev.grabbed
    scanner.close()  # the reader has logged all it will
    assert dev.grab_attempts == 4
    # Logged once for the reason, not once per try; the grab names what it overcame.
    [failed] = grab_events(caplog, "scanner.grab_failed")
    assert failed["error"] == f"[Errno {errno.EBUSY}] {os.strerror(errno.EBUSY)}"
    [grabbed] = grab_events(caplog, "scanner.grabbed")
    assert grabbed["after"] == failed["error"]


def test_a_new_reason_for_a_refused_grab_is_logged_again(
    backend: FakeInputBackend,
    scans: Scans,
    started: list[EvdevScanner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.scanner_evdev")
    dev = backend.plug()
    dev.refuse_grabs(errno.EBUSY, errno.EBUSY, errno.EPERM, errno.EPERM)
    scanner = start(started, backend, scans, grab_backoff_s=FAST_RETRY)
    wait_grabbed(dev)
    scanner.close()
    errors = [f["error"] for f in grab_events(caplog, "scanner.grab_failed")]
    assert errors == [
        f"[Errno {errno.EBUSY}] {os.strerror(errno.EBUSY)}",
        f"[Errno {errno.EPERM}] {os.strerror(errno.EPERM)}",
    ]


def test_a_grab_another_process_held_is_taken_once_it_lets_go(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    dev.grab()  # someone else has it
    dev.grab_event.clear()
    start(started, backend, scans, grab_backoff_s=FAST_RETRY)
    assert dev.wait_grab_attempts(3, WAIT_S)  # refused, and tried again
    dev.ungrab()  # the other process lets go
    wait_grabbed(dev)
    assert dev.grabbed
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_unplug_mid_code_drops_the_half_code_and_stays_healthy(
    backend: FakeInputBackend,
    scans: Scans,
    started: list[EvdevScanner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dev = backend.plug()
    scanner = start(started, backend, scans)
    wait_grabbed(dev)
    type_code(dev, CODE[:9], enter=False)
    assert dev.wait_consumed(WAIT_S)
    backend.unplug(dev)
    assert dev.closed.wait(WAIT_S)
    assert scanner.healthy()
    assert any(r.getMessage() == "scanner.dropped" for r in caplog.records)
    assert CODE[:9] not in caplog.text

    again = backend.plug()
    wait_grabbed(again)
    type_code(again, OTHER_CODE)
    assert scans.next() == OTHER_CODE
    assert scanner.healthy()


def test_scanner_missing_at_start_is_found_when_plugged(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    scanner = start(started, backend, scans)
    with backend.listed:
        assert backend.listed.wait_for(lambda: backend.list_calls >= 1, WAIT_S)
    assert scanner.healthy()
    dev = backend.plug()
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_waiting_for_an_unplugged_scanner_does_not_spin(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    start(started, backend, scans)
    wait_grabbed(dev)
    backend.unplug(dev)
    assert dev.closed.wait(WAIT_S)
    before = backend.list_calls
    cpu_before = time.process_time()
    # Backoff from 0.5 s: within ~1.2 s of waiting there are at most a few rescans.
    with backend.listed:
        backend.listed.wait_for(lambda: backend.list_calls - before > 4, timeout=1.2)
    assert backend.list_calls - before <= 3
    assert time.process_time() - cpu_before < 0.3  # a dead fd in select would burn a core


def test_open_by_path_follows_by_id_symlink(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner], tmp_path: Path
) -> None:
    backend.plug(name="Some Keyboard", phys="usb-fake-9/input0", product=9)
    dev = backend.plug(name="Vendor Scanner")
    by_id = tmp_path / "usb-Vendor_Scanner-event-kbd"
    os.symlink(dev.path, by_id)
    start(started, backend, scans, match=None, device=str(by_id))
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_open_by_vendor_product(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    backend.plug(name="Other Scanner", phys="usb-fake-7/input0", vendor=0x1234, product=0x5678)
    dev = backend.plug(name="Scanner", vendor=0x0C2E, product=0x0B61)
    start(started, backend, scans, match="0c2e:0B61")
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_open_by_name_substring_ignores_case(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug(name="Zebra DS2208 Barcode Scanner")
    start(started, backend, scans, match="ds2208")
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_open_is_retried_while_permission_is_denied(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    backend.deny_access(dev.path, times=2)
    start(started, backend, scans, match=None, device=dev.path)
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE


def test_callback_error_does_not_stop_the_scanner(
    backend: FakeInputBackend, started: list[EvdevScanner]
) -> None:
    scans = Scans()
    calls: list[str] = []

    def failing_then_collecting(line: str) -> None:
        calls.append(line)
        if len(calls) == 1:
            raise RuntimeError("core bug")
        scans(line)

    dev = backend.plug()
    scanner = start(started, backend, failing_then_collecting)  # type: ignore[arg-type]
    wait_grabbed(dev)
    type_code(dev, CODE)
    type_code(dev, OTHER_CODE)
    assert scans.next() == OTHER_CODE
    assert scanner.healthy()


def test_unexpected_backend_error_is_survived(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    real_open = backend.open
    failures = [RuntimeError("backend bug")]

    def open_failing_once(path: str) -> FakeInputDevice:
        if failures:
            raise failures.pop()
        return real_open(path)

    backend.open = open_failing_once  # type: ignore[method-assign]
    scanner = start(started, backend, scans)
    wait_grabbed(dev)
    type_code(dev, CODE)
    assert scans.next() == CODE
    assert scanner.healthy()


def test_close_is_prompt_and_safe_twice(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    dev = backend.plug()
    scanner = start(started, backend, scans)
    wait_grabbed(dev)
    began = time.monotonic()
    scanner.close()
    scanner.close()
    assert time.monotonic() - began < 1.0
    assert not dev.grabbed


def test_close_while_waiting_for_the_device_is_prompt(
    backend: FakeInputBackend, scans: Scans, started: list[EvdevScanner]
) -> None:
    scanner = start(started, backend, scans)
    with backend.listed:
        assert backend.listed.wait_for(lambda: backend.list_calls >= 1, WAIT_S)
    began = time.monotonic()
    scanner.close()
    assert time.monotonic() - began < 1.0


def test_a_device_path_or_match_is_required() -> None:
    with pytest.raises(ValueError):
        EvdevScanner(backend=FakeInputBackend())


def test_unknown_layout_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="layout"):
        EvdevScanner(match="x", layout="xx", backend=FakeInputBackend())


def test_physical_device_strips_the_interface() -> None:
    assert physical_device("usb-0000:01:00.0-1.2/input1") == "usb-0000:01:00.0-1.2"
    assert physical_device("py-evdev-uinput") == "py-evdev-uinput"


def test_real_backend_lists_nodes_it_may_only_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kiosk.service allows input devices read-only, and access() reports that policy: a node
    that may be read but not written is still a scanner candidate; one that may not be read
    is not. (evdev.list_devices() asks for both, and would list nothing in the service.)"""
    from drivers import scanner_evdev

    for name in ("event3", "event1", "event2", "mice"):
        (tmp_path / name).write_bytes(b"")
    unreadable = str(tmp_path / "event2")

    def access(path: str, mode: int) -> bool:
        if mode & os.W_OK:
            return False  # DeviceAllow=char-input r
        return path != unreadable

    monkeypatch.setattr(scanner_evdev.os, "access", access)
    listed = scanner_evdev.EvdevBackend(str(tmp_path)).list_devices()
    assert listed == [str(tmp_path / "event1"), str(tmp_path / "event3")]
