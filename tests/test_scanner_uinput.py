"""The evdev scanner driver against a real kernel: a virtual scanner made with /dev/uinput.

Runs on a Pi rig, or here through tests/test_uinput_in_qemu.py (this machine's kernel has no
uinput); skips where /dev/uinput is missing or not writable.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from drivers.keymap import keystrokes
from drivers.scanner_evdev import EvdevBackend, EvdevScanner, InputNode


def _uinput_unavailable() -> str | None:
    if not os.path.exists("/dev/uinput"):
        return "no /dev/uinput on this kernel (run on a Pi rig, or via tests/qemu)"
    if not os.access("/dev/uinput", os.W_OK):
        return "/dev/uinput is not writable by this user (add it to the input group)"
    return None


pytestmark = [
    pytest.mark.uinput,
    pytest.mark.skipif(_uinput_unavailable() is not None, reason=str(_uinput_unavailable())),
]

NAME = "Kiosk Test Barcode Scanner"
CODE = "281234567890123456"
WAIT_S = 10.0


class RecordingNode:
    """A real node, with events for the test when the driver grabs or closes it."""

    def __init__(self, node: InputNode) -> None:
        self._node = node
        self.path, self.name, self.phys, self.info = node.path, node.name, node.phys, node.info
        self.monotonic_timestamps = node.monotonic_timestamps
        self.grabbed = threading.Event()
        self.closed = threading.Event()
        self.keys_read = 0
        self._progress = threading.Condition()

    def fileno(self) -> int:
        return self._node.fileno()

    def read(self) -> Any:
        events = self._node.read()
        with self._progress:
            self.keys_read += sum(1 for ev in events if ev.type == 1)  # EV_KEY
            self._progress.notify_all()
        return events

    def wait_keys_read(self, n: int) -> bool:
        with self._progress:
            return self._progress.wait_for(lambda: self.keys_read >= n, WAIT_S)

    def grab(self) -> None:
        self._node.grab()
        self.grabbed.set()

    def ungrab(self) -> None:
        self._node.ungrab()

    def active_keys(self) -> list[int]:
        return self._node.active_keys()

    def close(self) -> None:
        self._node.close()
        self.closed.set()


class RecordingBackend(EvdevBackend):
    """The production backend; the test learns which of our nodes the driver opened."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: queue.Queue[RecordingNode] = queue.Queue()

    def open(self, path: str) -> InputNode:
        node = RecordingNode(super().open(path))
        if node.name == NAME:
            self.nodes.put(node)
        return node

    def next_node(self) -> RecordingNode:
        return self.nodes.get(timeout=WAIT_S)


def make_virtual_scanner() -> Any:
    from evdev import UInput
    from evdev import ecodes as e

    keys = sorted({code for code, _ in keystrokes("0123456789abcdefghijklmnopqrstuvwxyz-")})
    keys += [e.KEY_LEFTSHIFT, e.KEY_ENTER, e.KEY_KPENTER, e.KEY_CAPSLOCK]
    return UInput(
        {e.EV_KEY: keys}, name=NAME, vendor=0x0C2E, product=0x0B61, phys="usb-kiosk-test/input0"
    )


def type_code(ui: Any, node: RecordingNode, text: str) -> None:
    """Type like a scanner, one character at a time. Between characters, wait for the driver
    to have read them: under emulation a whole code can outrun the kernel's event buffer
    (that case, SYN_DROPPED, is the fake backend tests' job)."""
    from evdev import ecodes as e

    written = node.keys_read
    for code, shift in [*keystrokes(text), (e.KEY_ENTER, False)]:
        keys = [e.KEY_LEFTSHIFT, code] if shift else [code]
        for key in keys:
            ui.write(e.EV_KEY, key, 1)
            ui.syn()
        for key in reversed(keys):
            ui.write(e.EV_KEY, key, 0)
            ui.syn()
        written += 2 * len(keys)
        assert node.wait_keys_read(written)


@pytest.fixture
def virtual_scanner() -> Iterator[Any]:
    ui = make_virtual_scanner()
    yield ui
    ui.close()


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def scans() -> queue.Queue[str]:
    return queue.Queue()


@pytest.fixture
def scanner(backend: RecordingBackend, scans: queue.Queue[str]) -> Iterator[EvdevScanner]:
    # Under qemu's software emulation a typed code can pause for a second; the silence rule
    # is covered by the keymap tests, so here it is relaxed.
    driver = EvdevScanner(match=NAME, backend=backend, idle_reset_s=5.0)
    yield driver
    driver.close()


def test_code_typed_with_shift_arrives_decoded(
    virtual_scanner: Any,
    backend: RecordingBackend,
    scanner: EvdevScanner,
    scans: queue.Queue[str],
) -> None:
    scanner.start(scans.put)
    node = backend.next_node()
    assert node.grabbed.wait(WAIT_S)
    type_code(virtual_scanner, node, "Kiosk-" + CODE)
    assert scans.get(timeout=WAIT_S) == "Kiosk-" + CODE
    assert node.monotonic_timestamps


def test_scanner_is_grabbed_exclusively_and_released_on_close(
    virtual_scanner: Any, backend: RecordingBackend, scanner: EvdevScanner
) -> None:
    import evdev

    scanner.start(lambda line: None)
    node = backend.next_node()
    assert node.grabbed.wait(WAIT_S)
    other = evdev.InputDevice(node.path)
    try:
        with pytest.raises(OSError) as refused:
            other.grab()
        assert refused.value.errno == errno.EBUSY
        scanner.close()
        other.grab()  # free again once the kiosk let go
        other.ungrab()
    finally:
        other.close()


def test_a_grab_another_process_holds_is_taken_once_it_lets_go(
    virtual_scanner: Any, backend: RecordingBackend, scans: queue.Queue[str]
) -> None:
    import evdev

    path = next(p for p in evdev.list_devices() if evdev.InputDevice(p).name == NAME)
    other = evdev.InputDevice(path)
    other.grab()  # the kernel refuses any other grab of the node now (EBUSY)
    driver = EvdevScanner(match=NAME, backend=backend, idle_reset_s=5.0, grab_backoff_s=(0.05, 0.2))
    try:
        driver.start(scans.put)
        node = backend.next_node()
        assert not node.grabbed.wait(0.5)  # refused, and tried again meanwhile
        other.ungrab()
        assert node.grabbed.wait(WAIT_S)
        type_code(virtual_scanner, node, CODE)
        assert scans.get(timeout=WAIT_S) == CODE
    finally:
        driver.close()
        other.close()


def test_unplug_and_replug_the_driver_survives(
    backend: RecordingBackend, scanner: EvdevScanner, scans: queue.Queue[str]
) -> None:
    ui = make_virtual_scanner()
    try:
        scanner.start(scans.put)
        node = backend.next_node()
        assert node.grabbed.wait(WAIT_S)
    finally:
        ui.close()  # unplug
    assert node.closed.wait(WAIT_S)
    assert scanner.healthy()

    ui = make_virtual_scanner()  # replug: a new event node
    try:
        again = backend.next_node()
        assert again.grabbed.wait(WAIT_S)
        type_code(ui, again, CODE)
        assert scans.get(timeout=WAIT_S) == CODE
        assert scanner.healthy()
    finally:
        ui.close()
