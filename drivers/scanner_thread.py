"""What every scanner driver shares: one reader thread started once, its health, its close,
and handing lines to the core without letting a core bug stop the reader."""

from __future__ import annotations

import logging
import threading
from typing import Any, Self

from kiosk.log import event
from kiosk.ports import ScanCallback

log = logging.getLogger("drivers.scanner")

JOIN_TIMEOUT_S = 2.0


class ScannerThread:
    """Base of the scanner drivers. A subclass sets `thread_name`, implements `_run()`, and may
    override `_wake_reader()` (unblock a read for close), `_release()` (after the reader
    ended) and `_where()` (fields that say which device, for log lines)."""

    thread_name = "scanner"

    def __init__(self) -> None:
        self._on_scan: ScanCallback | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._failing = False  # the reader hit an unexpected error: degraded until it recovers

    def start(self, on_scan: ScanCallback) -> None:
        if self._closed:
            raise RuntimeError("scanner is closed")
        if self._thread is not None:
            raise RuntimeError("scanner already started")
        self._on_scan = on_scan
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """True while reading, and while waiting for an unplugged scanner to come back."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._closed and not self._failing

    def close(self) -> None:
        """Stop the reader and release the device. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake_reader()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                event(log, "scanner.close_timeout", logging.ERROR, **self._where())
                return  # leave what the reader still uses to the reader
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deliver(self, line: str) -> None:
        assert self._on_scan is not None
        try:
            self._on_scan(line)
        except Exception as exc:  # the core's bug must not stop the scanner
            event(log, "scanner.callback_failed", logging.ERROR, error=repr(exc))

    def _run(self) -> None:
        raise NotImplementedError

    def _wake_reader(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _where(self) -> dict[str, Any]:
        return {}
