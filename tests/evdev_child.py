"""`kiosk run` with its evdev scanner on the fake input backend (drivers/fake_evdev.py), for the
daemon tests that need a keyboard-wedge scanner without /dev/input. Driven by
tests/test_scanner_hold.py through DaemonRig's `wrap`.

usage: evdev_child.py PYTHON -m kiosk run ARGS...   (the command DaemonRig would have run)

One fake scanner ("Fake Barcode Scanner") is plugged in. With KIOSK_CHILD_CODE set, that code is
typed on it once the kiosk has grabbed it. At exit one JSON line on stderr tells the test what
the device saw: {"event": "child.summary", "opens": ..., "grabs": ..., "grabbed": ...}.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading

import drivers.scanner_evdev
from drivers.fake_evdev import FakeInputBackend, type_code

backend = FakeInputBackend()
device = backend.plug()
drivers.scanner_evdev.EvdevBackend = lambda: backend  # type: ignore[assignment,misc,return-value]


def summary() -> None:
    line = {
        "event": "child.summary",
        "opens": device.open_count,
        "grabs": len(device.keys_down_at_grab),
        "grabbed": device.grabbed,
    }
    print(json.dumps(line), file=sys.stderr, flush=True)


def type_when_grabbed(code: str) -> None:
    if device.grab_event.wait(60):
        type_code(device, code)


def main() -> int:
    argv = sys.argv[1:]
    kiosk_args = argv[argv.index("-m") + 2 :]
    atexit.register(summary)
    code = os.environ.get("KIOSK_CHILD_CODE")
    if code:
        threading.Thread(target=type_when_grabbed, args=(code,), daemon=True).start()
    from kiosk.cli import main as kiosk_main

    return kiosk_main(kiosk_args)


if __name__ == "__main__":
    sys.exit(main())
