"""Barcode scanner on a serial port (USB CDC-ACM or UART): one code per CR, LF or CRLF line.

Reads on its own thread, reopens the port with backoff after unplug or errors, and hands each
line to `on_scan`. The core decides whether a line is a payment code.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import serial

from drivers.scanner_thread import ScannerThread
from kiosk.log import event, mask_partial

log = logging.getLogger(__name__)

MAX_LINE = 64  # bytes; longer than any payment code by far
IDLE_RESET_S = 0.5  # a half line followed by silence is noise, not the start of the next code
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 5.0

SerialFactory = Callable[..., Any]


class LineSplitter:
    """Bytes in, lines out: CR, LF and CRLF each end one line; over-long lines are dropped."""

    def __init__(self, max_len: int = MAX_LINE, source: str = "") -> None:
        self.max_len = max_len
        self.source = source
        self._buf = bytearray()
        self._too_long = False
        self._after_cr = False

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        for byte in data:
            if byte == 0x0A and self._after_cr:
                self._after_cr = False  # the LF of a CRLF: the line already ended
                continue
            self._after_cr = byte == 0x0D
            if byte in (0x0A, 0x0D):
                line = self._end_line()
                if line:
                    lines.append(line)
            elif not self._too_long:
                self._buf.append(byte)
                if len(self._buf) > self.max_len:
                    self._too_long = True
        return lines

    def reset(self, reason: str) -> None:
        """Drop the half-received line (logged, masked)."""
        if self._buf or self._too_long:
            text = self._buf.decode("ascii", errors="replace")
            event(
                log,
                "scanner.dropped",
                logging.WARNING,
                reason="too_long" if self._too_long else reason,
                source=self.source,
                length=len(self._buf),
                partial=mask_partial(text),
            )
        self._buf.clear()
        self._too_long = False
        self._after_cr = False

    def pending(self) -> bool:
        return bool(self._buf) or self._too_long

    def _end_line(self) -> str | None:
        if self._too_long:
            self.reset("too_long")
            return None
        # Non-ASCII bytes pass on as U+FFFD, so the core rejects the line with a message.
        line = self._buf.decode("ascii", errors="replace").strip()
        self._buf.clear()
        return line or None


class SerialScanner(ScannerThread):
    """A scanner on `port` (a path such as /dev/ttyACM0 or a by-id symlink to it)."""

    def __init__(
        self,
        port: str,
        baud: int = 9600,
        serial_factory: SerialFactory = serial.Serial,
        idle_reset_s: float = IDLE_RESET_S,
    ) -> None:
        self.port = port
        self.baud = baud
        self.serial_factory = serial_factory
        self.idle_reset_s = idle_reset_s
        super().__init__()
        self._port: Any | None = None  # the open port, for close() to wake a blocked read

    thread_name = "scanner-serial"

    def _wake_reader(self) -> None:
        port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            port.cancel_read()  # the reader blocks without a timeout: wake it now

    def _where(self) -> dict[str, Any]:
        return {"port": self.port}

    def connected(self) -> bool:
        """True while the port is open (for the link-down alarm)."""
        return self._port is not None

    # -- reader thread ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = REOPEN_MIN_S
        splitter = LineSplitter(source=self.port)
        while not self._stopping.is_set():
            port = self._open()
            if port is None:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, REOPEN_MAX_S)
                continue
            try:
                self._read_until_error(port, splitter)
                backoff = REOPEN_MIN_S  # it worked for a while: come back quickly
            except (serial.SerialException, OSError) as exc:
                # "readiness to read but returned no data": unplugged, or a second process on
                # the port. Either way: close, back off, reopen.
                event(log, "scanner.disconnected", logging.WARNING, port=self.port, error=str(exc))
                splitter.reset("disconnected")
                backoff = REOPEN_MIN_S
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, REOPEN_MAX_S)
            except Exception as exc:
                # Never a thread that dies quietly: log, back off, reopen; unhealthy meanwhile.
                self._failing = True
                event(log, "scanner.reader_failed", logging.ERROR, error=repr(exc))
                splitter.reset("error")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, REOPEN_MAX_S)
            finally:
                self._port = None
                with contextlib.suppress(Exception):
                    port.close()

    def _open(self) -> Any | None:
        try:
            # No read timeout while idle: the reader sleeps in the kernel until a byte comes
            # (nothing polls); close() wakes it with cancel_read().
            port = self.serial_factory(self.port, baudrate=self.baud, timeout=None, exclusive=True)
        except (serial.SerialException, OSError, ValueError, OverflowError) as exc:
            event(log, "scanner.open_failed", logging.WARNING, port=self.port, error=str(exc))
            return None
        event(log, "scanner.opened", port=self.port, baud=self.baud)
        self._failing = False
        self._port = port
        if self._stopping.is_set() and hasattr(port, "cancel_read"):
            port.cancel_read()  # close() came while opening
        return port

    def _read_until_error(self, port: Any, splitter: LineSplitter) -> None:
        last_byte_at = time.monotonic()
        while not self._stopping.is_set():
            # A half-typed line needs a wake-up to be dropped after silence; otherwise block.
            wanted = self.idle_reset_s if splitter.pending() else None
            if port.timeout != wanted:
                port.timeout = wanted
            data = port.read(max(1, port.in_waiting))
            now = time.monotonic()
            if not data:
                if splitter.pending() and now - last_byte_at > self.idle_reset_s:
                    splitter.reset("idle")
                continue
            if splitter.pending() and now - last_byte_at > self.idle_reset_s:
                splitter.reset("idle")
            last_byte_at = now
            for line in splitter.feed(data):
                self._deliver(line)
