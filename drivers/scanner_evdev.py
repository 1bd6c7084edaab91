"""Keyboard-wedge barcode scanner read through Linux evdev, with exclusive grab and hotplug.

Scope: finds the scanner (by path, vendor:product or name), reads every event node it has,
decodes keys with the kiosk's own keymap and hands each Enter-ended line to `on_scan`. It does
not validate codes (the core does) and never types into the console while it holds the grab.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import select
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evdev import ecodes

from drivers.keymap import IDLE_RESET_S, ScanDecoder, get_layout
from drivers.scanner_thread import ScannerThread
from kiosk.log import event

log = logging.getLogger(__name__)

RESCAN_MIN_S = 0.5
RESCAN_MAX_S = 5.0
GRAB_RETRY_S = 0.05  # how often to look again for a moment with no key down
# A grab another process holds (EBUSY) is tried again after this long, doubling up to the most.
GRAB_BACKOFF_MIN_S = 0.5
GRAB_BACKOFF_MAX_S = 10.0
OPEN_RETRIES = 5  # EACCES/EPERM right after hotplug: udev has not fixed the node yet
OPEN_RETRY_S = 0.2

_VENDOR_PRODUCT = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")


class InputNode(Protocol):
    """One open `/dev/input/event*` node: what `evdev.InputDevice` offers and we use."""

    path: str
    name: str
    phys: str
    info: Any  # has .vendor and .product (evdev.DeviceInfo)
    # True when event timestamps are CLOCK_MONOTONIC (same clock as time.monotonic()); the
    # decoder then measures silences between keys as typed, not as read by a busy thread.
    monotonic_timestamps: bool

    def fileno(self) -> int: ...

    def read(self) -> Iterable[Any]:
        """Pending events (objects with type, code, value). BlockingIOError when none;
        OSError(ENODEV) once the device is gone."""

    def grab(self) -> None: ...

    def ungrab(self) -> None: ...

    def active_keys(self) -> list[int]: ...

    def close(self) -> None: ...


class InputBackend(Protocol):
    """Where input nodes come from: the kernel in production, `FakeInputBackend` in tests."""

    def list_devices(self) -> list[str]: ...

    def open(self, path: str) -> InputNode: ...


class EvdevBackend:
    """The real kernel, through python-evdev."""

    def __init__(self, input_dir: str = "/dev/input") -> None:
        self.input_dir = input_dir

    def list_devices(self) -> list[str]:
        """The event nodes this process may read. Not `evdev.list_devices()`: it lists only
        nodes it may also write, and kiosk.service allows input devices read-only
        (DeviceAllow=char-input r), a policy access() answers too, so under the service's
        sandbox it would list nothing. Reading and grabbing need no write access."""
        nodes = glob.glob(os.path.join(self.input_dir, "event*"))
        return sorted(path for path in nodes if os.access(path, os.R_OK))

    def open(self, path: str) -> InputNode:
        import evdev

        return _EvdevNode(evdev.InputDevice(path))


_EVIOCSCLOCKID = 0x400445A0  # _IOW('E', 0xa0, int): python-evdev has no call for it


class _EvdevNode:
    """`evdev.InputDevice` with `read()` made eager, so ENODEV surfaces inside our try, and
    event timestamps switched from wall-clock time (which NTP moves) to CLOCK_MONOTONIC."""

    def __init__(self, device: Any) -> None:
        self._device = device
        self.path: str = device.path
        self.name: str = device.name
        self.phys: str = device.phys
        self.info = device.info
        try:
            fcntl.ioctl(device.fileno(), _EVIOCSCLOCKID, struct.pack("i", time.CLOCK_MONOTONIC))
            self.monotonic_timestamps = True
        except OSError:
            self.monotonic_timestamps = False

    def fileno(self) -> int:
        return int(self._device.fileno())

    def read(self) -> list[Any]:
        return list(self._device.read())

    def grab(self) -> None:
        self._device.grab()

    def ungrab(self) -> None:
        self._device.ungrab()

    def active_keys(self) -> list[int]:
        return list(self._device.active_keys())

    def close(self) -> None:
        self._device.close()


@dataclass(eq=False)
class _OpenNode:
    node: InputNode
    decoder: ScanDecoder
    grabbed: bool = False
    grab_error: str | None = None  # why the last grab failed; logged once per change
    grab_backoff_s: float = 0.0  # the wait after the last failed grab (0: none failed)
    grab_retry_at: float = 0.0  # monotonic time before which no grab is tried
    fd: int = field(init=False)

    def __post_init__(self) -> None:
        self.fd = self.node.fileno()


def physical_device(phys: str) -> str:
    """The physical device part of an input node's `phys` ("usb-0000:01:00.0-1.2/input0" ->
    "usb-0000:01:00.0-1.2"): the event nodes of one scanner share it."""
    return phys.rsplit("/", 1)[0]


class EvdevScanner(ScannerThread):
    """A scanner on evdev. `device` is a path (by-id/by-path symlinks are followed); `match` is
    `vendor:product` in hex or a substring of the device name. One of the two is required.
    `grab_backoff_s` is the (first, longest) wait before a failed grab is tried again."""

    def __init__(
        self,
        device: str | None = None,
        match: str | None = None,
        grab: bool = True,
        layout: str = "us",
        backend: InputBackend | None = None,
        idle_reset_s: float = IDLE_RESET_S,
        grab_backoff_s: tuple[float, float] = (GRAB_BACKOFF_MIN_S, GRAB_BACKOFF_MAX_S),
    ) -> None:
        if not device and not match:
            raise ValueError("an evdev scanner needs a device path or a match")
        get_layout(layout)  # fail now, not in the reader thread
        self.device = device
        self.match = match
        self.grab = grab
        self.layout = layout
        self.idle_reset_s = idle_reset_s
        self.grab_backoff_s = grab_backoff_s
        self.backend: InputBackend = backend if backend is not None else EvdevBackend()
        self._nodes: list[_OpenNode] = []
        self._expected_nodes = 0
        self._backoff = RESCAN_MIN_S
        self._rescan_at = 0.0
        super().__init__()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    # -- public -------------------------------------------------------------------------------

    thread_name = "scanner-evdev"

    def connected(self) -> bool:
        """True while at least one of the scanner's input nodes is open (link-down alarm)."""
        return bool(self._nodes)

    def _wake_reader(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _release(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- reader thread ------------------------------------------------------------------------

    def _run(self) -> None:
        self._rescan_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    self._step()
                    self._failing = False
                except Exception as exc:
                    # Never a thread that dies quietly: log, start over with backoff, and
                    # report unhealthy until a step succeeds again.
                    self._failing = True
                    event(log, "scanner.reader_failed", logging.ERROR, error=repr(exc))
                    for node in list(self._nodes):
                        self._drop(node, reason="error")
                    self._stopping.wait(self._backoff)
        finally:
            for node in list(self._nodes):
                self._drop(node, reason="close")

    def _step(self) -> None:
        if self._missing_nodes() and time.monotonic() >= self._rescan_at:
            if self._open_missing():
                self._backoff = RESCAN_MIN_S
            self._rescan_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RESCAN_MAX_S)
            if self._stopping.is_set():
                return
        if self.grab:
            self._grab_when_idle()
        self._wait_and_read(self._select_timeout())

    def _missing_nodes(self) -> bool:
        """Not found yet, unplugged, or one of its nodes went away: keep looking."""
        return len(self._nodes) < max(self._expected_nodes, 1)

    def _select_timeout(self) -> float | None:
        timeout: float | None = None
        if self._missing_nodes():
            timeout = max(self._rescan_at - time.monotonic(), 0.0)
        if self.grab:
            now = time.monotonic()
            for node in self._nodes:
                if not node.grabbed:
                    # A key down: look again soon. A failed grab: when its backoff is over.
                    wait = max(node.grab_retry_at - now, GRAB_RETRY_S)
                    timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def _wait_and_read(self, timeout: float | None) -> None:
        fds = [self._wake_r, *(n.fd for n in self._nodes)]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError) as exc:
            # An fd went bad under us: check each node by reading it, without spinning.
            event(log, "scanner.select_failed", logging.WARNING, error=str(exc))
            self._stopping.wait(GRAB_RETRY_S)
            readable = [n.fd for n in self._nodes]
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 64)
        for node in [n for n in self._nodes if n.fd in readable]:
            self._read(node)

    def _read(self, node: _OpenNode) -> None:
        try:
            events = list(node.node.read())
        except BlockingIOError:
            return
        except OSError as exc:
            # ENODEV (unplugged), even after select said readable; any other error alike:
            # close now, a dead fd left in the select set would spin a core.
            self._drop(node, reason=errno.errorcode.get(exc.errno or 0, "error"))
            return
        read_at = time.monotonic()
        stamped = node.node.monotonic_timestamps
        for ev in events:
            now = ev.sec + ev.usec / 1_000_000 if stamped else read_at
            line = node.decoder.feed(ev.type, ev.code, ev.value, now)
            if line is not None:
                self._deliver(line)
            elif ev.type == ecodes.EV_SYN and ev.code == ecodes.SYN_DROPPED:
                event(log, "scanner.events_lost", logging.WARNING, path=node.node.path)
                with contextlib.suppress(OSError):
                    node.decoder.sync_modifiers(node.node.active_keys())
        if self.grab and not node.grabbed:
            self._try_grab(node)

    def _drop(self, node: _OpenNode, reason: str) -> None:
        node.decoder.reset(reason)
        if node.grabbed:
            with contextlib.suppress(OSError):
                node.node.ungrab()
            node.grabbed = False
        with contextlib.suppress(OSError):
            node.node.close()
        if node in self._nodes:
            self._nodes.remove(node)
        if reason != "close":
            # It just went away: look again soon, then less and less often.
            self._backoff = RESCAN_MIN_S
            self._rescan_at = time.monotonic() + RESCAN_MIN_S
        level = logging.INFO if reason == "close" else logging.WARNING
        event(log, "scanner.node_closed", level, path=node.node.path, reason=reason)

    # -- grabbing -----------------------------------------------------------------------------

    def _grab_when_idle(self) -> None:
        for node in self._nodes:
            if not node.grabbed:
                self._try_grab(node)

    def _try_grab(self, node: _OpenNode) -> None:
        """Grab only with no key down, or that key sticks down system-wide. A grab that failed
        (EBUSY: another process holds the device) is tried again, less and less often; the
        node is read meanwhile."""
        now = time.monotonic()
        if now < node.grab_retry_at:
            return
        try:
            if node.node.active_keys():
                return
            node.node.grab()
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return  # the read that follows drops it
            self._grab_failed(node, str(exc), now)
            return
        node.grabbed = True
        if node.grab_error is None:
            event(log, "scanner.grabbed", path=node.node.path)
        else:
            event(log, "scanner.grabbed", path=node.node.path, after=node.grab_error)
        node.grab_error, node.grab_backoff_s, node.grab_retry_at = None, 0.0, 0.0

    def _grab_failed(self, node: _OpenNode, error: str, now: float) -> None:
        first, longest = self.grab_backoff_s
        node.grab_backoff_s = min(max(node.grab_backoff_s * 2, first), longest)
        node.grab_retry_at = now + node.grab_backoff_s
        if error != node.grab_error:  # once per change of reason, not on every try
            node.grab_error = error
            event(
                log,
                "scanner.grab_failed",
                logging.WARNING,
                path=node.node.path,
                error=error,
                retry=f"every {first:g}s doubling to {longest:g}s, until it is taken",
            )

    # -- finding the scanner ------------------------------------------------------------------

    def _open_missing(self) -> bool:
        """Open every node of the scanner not open yet. True when something was opened."""
        open_paths = {n.node.path for n in self._nodes}
        fresh: list[InputNode] = []
        for path in self._candidate_paths():
            if path in open_paths or self._stopping.is_set():
                continue
            node = self._open(path)
            if node is not None:
                fresh.append(node)
                open_paths.add(path)
        # Keep the matching nodes and their siblings (same physical device), in one pass over
        # all of them: a sibling may be listed before the node that matches.
        anchors = [n.node for n in self._nodes] + [n for n in fresh if self._matches(n)]
        opened = False
        for node in fresh:
            if not any(node is a or self._same_device(node, a) for a in anchors):
                with contextlib.suppress(OSError):
                    node.close()
                continue
            decoder = ScanDecoder(self.layout, self.idle_reset_s, source=node.path)
            self._nodes.append(_OpenNode(node, decoder))
            opened = True
            event(log, "scanner.node_opened", path=node.path, device_name=node.name, phys=node.phys)
        if opened:
            self._expected_nodes = max(self._expected_nodes, len(self._nodes))
        elif not self._nodes:
            self._expected_nodes = 0
        return opened

    def _candidate_paths(self) -> list[str]:
        try:
            listed = list(self.backend.list_devices())
        except OSError as exc:
            event(log, "scanner.list_failed", logging.WARNING, error=str(exc))
            listed = []
        if self.device:
            # The configured node first: it may be missing from the list while udev has not
            # yet given us access to it.
            target = os.path.realpath(self.device)
            return [target, *(p for p in listed if p != target)]
        return listed

    def _open(self, path: str) -> InputNode | None:
        for attempt in range(OPEN_RETRIES):
            try:
                return self.backend.open(path)
            except PermissionError as exc:
                if attempt == OPEN_RETRIES - 1 or self._stopping.wait(OPEN_RETRY_S):
                    event(log, "scanner.open_denied", logging.WARNING, path=path, error=str(exc))
                    return None
            except OSError:
                return None  # gone between listing and opening, or not an input node
        return None

    def _matches(self, node: InputNode) -> bool:
        if self.device:
            return node.path == os.path.realpath(self.device)
        assert self.match is not None
        vp = _VENDOR_PRODUCT.match(self.match)
        if vp:
            return (node.info.vendor, node.info.product) == (int(vp[1], 16), int(vp[2], 16))
        return self.match.lower() in node.name.lower()

    @staticmethod
    def _same_device(a: InputNode, b: InputNode) -> bool:
        if (a.info.vendor, a.info.product) != (b.info.vendor, b.info.product):
            return False
        if a.phys or b.phys:
            return physical_device(a.phys) == physical_device(b.phys)
        return a.name == b.name  # no phys (some virtual devices): fall back to the name
