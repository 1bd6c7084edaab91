"""A complete fake input backend for `EvdevScanner`: devices with real fds, hotplug, grabs.

Tests and rigs without `/dev/input` run the real driver code paths against it: `select` works
on each device's pipe, `read()` returns `evdev.InputEvent`s, and `unplug()` makes the next read
fail with ENODEV just as the kernel does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import deque
from typing import NamedTuple

from evdev import InputEvent
from evdev import ecodes as e

from drivers.keymap import keystrokes


class FakeDeviceInfo(NamedTuple):
    """Same fields as `evdev.DeviceInfo`."""

    bustype: int
    vendor: int
    product: int
    version: int


class FakeInputDevice:
    """One event node of a fake scanner. Events written with `emit()` or `type_code()` wait in
    a queue; a byte in a pipe per write makes the node's fd readable."""

    def __init__(
        self,
        path: str,
        name: str = "Fake Barcode Scanner",
        phys: str = "usb-fake-1/input0",
        vendor: int = 0x0C2E,
        product: int = 0x0B61,
    ) -> None:
        self.path = path
        self.name = name
        self.phys = phys
        self.info = FakeDeviceInfo(0x03, vendor, product, 1)
        self.monotonic_timestamps = True  # like a real node after EVIOCSCLOCKID
        self._lock = threading.Lock()
        self._consumed = threading.Condition(self._lock)
        self._attempted = threading.Condition(self._lock)
        self._queue: deque[InputEvent] = deque()
        self._keys_down: set[int] = set()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.plugged = True
        self.is_open = False
        self.grabbed = False
        self.open_count = 0
        self.opened = threading.Event()  # set on each open
        self.grab_event = threading.Event()  # set on each successful grab
        self.keys_down_at_grab: list[list[int]] = []  # active_keys() at each grab, for tests
        self.grab_attempts = 0  # every call of grab(), refused or not
        self._refusals: list[int] = []  # errnos the next grabs fail with, in order
        self.closed = threading.Event()  # set when the driver closes it

    # -- what the driver sees (evdev.InputDevice's shape) --------------------------------------

    def fileno(self) -> int:
        return self._r

    def read(self) -> list[InputEvent]:
        if not self.plugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        with self._lock:
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 4096)
            events = list(self._queue)
            self._queue.clear()
            self._consumed.notify_all()
        if not events:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return events

    def grab(self) -> None:
        if not self.plugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        with self._lock:
            self.grab_attempts += 1
            self._attempted.notify_all()
            refusal = self._refusals.pop(0) if self._refusals else None
        if refusal is not None:
            raise OSError(refusal, os.strerror(refusal))
        if self.grabbed:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self.keys_down_at_grab.append(self.active_keys())
        self.grabbed = True
        self.grab_event.set()

    def ungrab(self) -> None:
        if not self.grabbed:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.grabbed = False

    def active_keys(self) -> list[int]:
        with self._lock:
            return sorted(self._keys_down)

    def close(self) -> None:
        # The kernel drops a grab when its fd closes.
        self.grabbed = False
        self.is_open = False
        self.closed.set()

    # -- what a test does ----------------------------------------------------------------------

    def emit(self, type: int, code: int, value: int, at: float | None = None) -> None:
        """Queue one event, as if the device sent it (at `at` on the monotonic clock: now)."""
        now = time.monotonic() if at is None else at
        with self._lock:
            if type == e.EV_KEY:
                if value == 0:
                    self._keys_down.discard(code)
                else:
                    self._keys_down.add(code)
            self._queue.append(InputEvent(int(now), int(now % 1 * 1e6), type, code, value))
            os.write(self._w, b"e")

    def key(self, code: int, value: int) -> None:
        """One key event followed by its SYN_REPORT, as a keyboard sends it."""
        self.emit(e.EV_KEY, code, value)
        self.emit(e.EV_SYN, e.SYN_REPORT, 0)

    def tap(self, code: int) -> None:
        self.key(code, 1)
        self.key(code, 0)

    def refuse_grabs(self, *errnos: int) -> None:
        """The next grabs fail, one with each errno (EBUSY: another process holds it)."""
        with self._lock:
            self._refusals.extend(errnos)

    def wait_grab_attempts(self, count: int, timeout: float) -> bool:
        """Wait until the driver has tried to grab at least `count` times."""
        with self._attempted:
            return self._attempted.wait_for(lambda: self.grab_attempts >= count, timeout)

    def wait_consumed(self, timeout: float) -> bool:
        """Wait until the reader has taken every event written so far."""
        with self._consumed:
            return self._consumed.wait_for(lambda: not self._queue, timeout)

    def unplug(self) -> None:
        """The cable is pulled: the fd turns readable and the next read raises ENODEV."""
        self.plugged = False
        os.write(self._w, b"u")

    def destroy(self) -> None:
        """Release the pipe (test teardown)."""
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def type_code(dev: FakeInputDevice, text: str, layout: str = "us", enter: bool = True) -> None:
    """Type `text` on `dev` the way a scanner does: key down/up per character, shift around the
    characters that need it, then Enter."""
    for code, shift in keystrokes(text, layout):
        if shift:
            dev.key(e.KEY_LEFTSHIFT, 1)
        dev.tap(code)
        if shift:
            dev.key(e.KEY_LEFTSHIFT, 0)
    if enter:
        dev.tap(e.KEY_ENTER)


class FakeInputBackend:
    """Lists and opens `FakeInputDevice`s; `plug()`/`unplug()` are hotplug."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, FakeInputDevice] = {}
        self._all: list[FakeInputDevice] = []
        self._next_number = 0
        self._denials: dict[str, int] = {}
        self.list_calls = 0
        self.listed = threading.Condition()

    def plug(
        self,
        name: str = "Fake Barcode Scanner",
        phys: str = "usb-fake-1/input0",
        vendor: int = 0x0C2E,
        product: int = 0x0B61,
        path: str | None = None,
    ) -> FakeInputDevice:
        """A new event node appears (like the kernel, each gets a fresh eventN number)."""
        with self._lock:
            if path is None:
                path = f"/dev/input/event{self._next_number}"
                self._next_number += 1
            dev = FakeInputDevice(path, name, phys, vendor, product)
            self._devices[path] = dev
            self._all.append(dev)
            return dev

    def unplug(self, dev: FakeInputDevice) -> None:
        with self._lock:
            self._devices.pop(dev.path, None)
        dev.unplug()

    def deny_access(self, path: str, times: int) -> None:
        """The next `times` opens of `path` fail with EACCES (udev has not fixed it yet)."""
        self._denials[path] = times

    def list_devices(self) -> list[str]:
        with self.listed:
            self.list_calls += 1
            self.listed.notify_all()
        with self._lock:
            return sorted(self._devices)

    def open(self, path: str) -> FakeInputDevice:
        with self._lock:
            if self._denials.get(path, 0) > 0:
                self._denials[path] -= 1
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            dev = self._devices.get(path)
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        dev.is_open = True
        dev.open_count += 1
        dev.opened.set()
        return dev

    def close(self) -> None:
        """Release every device's pipe (test teardown, after the scanner is closed)."""
        with self._lock:
            devices, self._all = self._all, []
            self._devices.clear()
        for dev in devices:
            dev.destroy()
