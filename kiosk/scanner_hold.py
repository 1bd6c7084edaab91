"""The scanner `kiosk run` holds from its first moment, whatever else is wrong.

A keyboard-wedge scanner that the kiosk has not grabbed types into whatever owns the console,
a login prompt for one. So the daemon opens and grabs the evdev scanner its config names before
it knows whether it can sell: while the config or the journal is bad and it waits out of
service, every scan is read and discarded (typed nowhere, charged never, logged without the
code), and once the kiosk runs, the same open scanner hands it the scans, with no gap in the
grab. When the kiosk stops it closes its scanner, which only ends the handing over: the grab
stays until `release()`, at the very end of the process, so a scanner is not let go while the
kiosk still finishes a sale. A serial scanner types into nothing, and two readers of one port
would share its lines, so it is opened only for a kiosk that runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from kiosk.config import ScannerSection, scanner_section
from kiosk.log import event, mask_code
from kiosk.ports import ScanCallback, Scanner

log = logging.getLogger("kiosk.scanner")


class HeldScanner:
    """Implements `kiosk.ports.Scanner`. `hold()` opens the scanner a section names and keeps
    it reading; scans are discarded until `start()` names who takes them, and after `close()`.
    `release()` lets go of the device."""

    def __init__(self, build: Callable[[ScannerSection], Scanner]) -> None:
        self._build = build  # drivers.build_scanner_for: the core imports no driver
        self._lock = threading.Lock()
        self._section: ScannerSection | None = None
        self._scanner: Scanner | None = None
        self._on_scan: ScanCallback | None = None
        self._closed = False  # the kiosk is done with it: no more scans handed over
        self._released = False

    def hold(self, section: ScannerSection) -> None:
        """Hold the scanner `section` names: the one held already when it is the same, else a
        new one (the old one closed first, so the grab can pass to it). Raises whatever
        building the driver raises (a library missing, a bad device name)."""
        if self._released:
            raise RuntimeError("scanner is released")
        if self._scanner is not None and section == self._section:
            return
        self._let_go()
        scanner = self._build(section)
        scanner.start(self._deliver)
        self._scanner, self._section = scanner, section
        event(log, "scanner.held", driver=section.driver, device=section.device or section.match)

    def hold_early(self, config_path: Path) -> None:
        """Hold the evdev scanner the config names, if its [scanner] section is sound, whatever
        else the file gets wrong. Never raises: what cannot be held now is held by `hold()`
        once the config is good. A config that names no usable scanner (its check says why)
        keeps the one held."""
        section = scanner_section(config_path)
        if section is None:
            return
        if section.driver != "evdev":
            return
        try:
            self.hold(section)
        except Exception as exc:  # a driver that cannot be built: said again when the kiosk runs
            event(log, "scanner.not_held", logging.WARNING, reason=str(exc))

    # -- kiosk.ports.Scanner --------------------------------------------------------------

    def start(self, on_scan: ScanCallback) -> None:
        """From now on the scans go to `on_scan`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("scanner is closed")
            self._on_scan = on_scan

    def healthy(self) -> bool:
        scanner = self._scanner
        return scanner is not None and scanner.healthy()

    def close(self) -> None:
        """No more scans for the kiosk; the device stays held until `release()`. Safe to call
        twice."""
        with self._lock:
            self._closed = True
            self._on_scan = None

    def release(self) -> None:
        """Let go of the scanner and its grab (the process is ending). Safe to call twice."""
        self.close()
        self._released = True
        self._let_go()

    def _let_go(self) -> None:
        scanner, self._scanner, self._section = self._scanner, None, None
        if scanner is not None:
            scanner.close()

    def _deliver(self, line: str) -> None:
        with self._lock:
            on_scan, stopping = self._on_scan, self._closed
        if on_scan is None:
            # Nothing may sell with it; the customer sees the lights out of service.
            reason = "stopping" if stopping else "out of service"
            event(log, "scan.discarded", reason=reason, code=mask_code(line))
            return
        on_scan(line)
