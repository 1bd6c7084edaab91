"""A scanner with no hardware: `scan(text)` delivers a code as if it had been read.

For `kiosk demo` (codes typed by a person or played from a script) and the daemon's tests.
It calls `on_scan` on the caller's thread, as a real driver calls it on its reader thread.
"""

from __future__ import annotations

import threading

from kiosk.ports import ScanCallback


class FakeScanner:
    """Implements `kiosk.ports.Scanner`; `scan()` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on_scan: ScanCallback | None = None
        self._closed = False
        self.scans: list[str] = []  # everything delivered, for tests

    def start(self, on_scan: ScanCallback) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("scanner is closed")
            self._on_scan = on_scan

    def scan(self, text: str) -> bool:
        """Deliver `text` as one scanned line. False when not started or already closed."""
        with self._lock:
            on_scan = None if self._closed else self._on_scan
            if on_scan is not None:
                self.scans.append(text)
        if on_scan is None:
            return False
        on_scan(text)
        return True

    def healthy(self) -> bool:
        return self._on_scan is not None and not self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._on_scan = None
