"""The boot clock: which boot of the kernel this is (its boot id) and the seconds since it
(CLOCK_BOOTTIME). A stamp of both outlives a restart of the kiosk, and no step of the wall
clock (NTP, `date -s`) moves it; so a code's age can be told across a restart (SPEC rule 7).

What it does not do: outlive a reboot. A new boot has a new id and starts its clock at zero;
a stamp of another boot says nothing of its age, and the wall clock must do."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
# Where /proc/sys is hidden (the unit's ProcSubset=pid), systemd passes the boot id in this
# variable instead (`Environment=KIOSK_BOOT_ID=%b`). The file comes first: a variable could
# have been left set by hand, and a boot id of another boot would age stamps wrongly.
BOOT_ID_ENV = "KIOSK_BOOT_ID"
_BOOT_ID = re.compile(r"[0-9a-f]{32}")


class BootStamp(NamedTuple):
    """A moment on the boot clock."""

    boot_id: str  # the kernel's boot id (32 hex digits): new at each boot
    seconds: float  # CLOCK_BOOTTIME: since that boot, suspend included, never stepped


# The boot clock now, or None where there is none (then the wall clock must do).
BootClock = Callable[[], BootStamp | None]


class SystemBootClock:
    """The kernel's boot clock. The boot id is read once (a process cannot outlive its boot),
    CLOCK_BOOTTIME at each call. Where either is missing (not Linux, no boot id to read) every
    reading is None and `unavailable` says why; it never raises."""

    def __init__(
        self,
        boot_id_file: Path = BOOT_ID_FILE,
        environ: Mapping[str, str] = os.environ,
        clock_id: int | None = getattr(time, "CLOCK_BOOTTIME", None),
    ) -> None:
        self.unavailable: str | None = None
        self._clock_id = clock_id if clock_id is not None else 0
        if clock_id is None:
            self._boot_id = ""
            self.unavailable = "this system has no CLOCK_BOOTTIME"
            return
        try:
            time.clock_gettime(clock_id)
        except OSError as exc:
            self._boot_id = ""
            self.unavailable = f"CLOCK_BOOTTIME: {exc.strerror or exc}"
            return
        self._boot_id, self.unavailable = _read_boot_id(boot_id_file, environ)

    def __call__(self) -> BootStamp | None:
        if self.unavailable is not None:
            return None
        return BootStamp(self._boot_id, time.clock_gettime(self._clock_id))


def _read_boot_id(boot_id_file: Path, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """(boot id, None) from the file, else from the environment; ("", why) if neither has one."""
    try:
        text = boot_id_file.read_bytes().decode("ascii")  # no codec module to load
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problem = f"{boot_id_file}: {why}"
    else:
        boot_id = text.strip().replace("-", "").lower()
        if _BOOT_ID.fullmatch(boot_id):
            return boot_id, None
        problem = f"{boot_id_file} holds no boot id"
    given = environ.get(BOOT_ID_ENV)
    if given is None:
        return "", f"no boot id: {problem}, and ${BOOT_ID_ENV} is not set"
    boot_id = given.strip().replace("-", "").lower()
    if _BOOT_ID.fullmatch(boot_id):
        return boot_id, None
    return "", f"no boot id: {problem}, and ${BOOT_ID_ENV} is not one (32 hex digits)"


_system: SystemBootClock | None = None


def system_boot_clock() -> SystemBootClock:
    """The kernel's boot clock, made once per process."""
    global _system
    if _system is None:
        _system = SystemBootClock()
    return _system
