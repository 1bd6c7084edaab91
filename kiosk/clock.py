"""Is the system clock synchronised? Signed requests carry timestamps and the cancel window is
a Beijing-time day, so the kiosk takes no payments on a clock nobody has set from a time source.

Asked of the kernel (`adjtimex` with no changes, through ctypes: no hardware library, no C
extension) and of systemd-timesyncd's flag file. Under a unit with `ProtectClock=yes` the
kernel call is refused (EPERM) and the flag file alone answers.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

TIME_ERROR = 5  # adjtimex's return value while the clock is not synchronised
STA_UNSYNC = 0x0040  # status bit: the clock is not synchronised
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


class _Timex(ctypes.Structure):
    """`struct timex` (linux/timex.h); the tail is padded past the kernel's own padding."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 32),
    ]


@functools.cache
def _adjtimex() -> Callable[..., int] | None:
    """libc's adjtimex, looked up once (the clock is checked every minute) among the symbols the
    interpreter already has loaded: libc is one of them, and `ctypes.util.find_library` would
    run `ldconfig -p` in a child process and keep subprocess loaded for nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.adjtimex
    except (OSError, AttributeError):
        return None


def kernel_clock_state() -> tuple[int, int] | None:
    """`adjtimex` with modes=0 (read only): (return value, status bits), or None when the
    call is unavailable or refused."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    timex = _Timex()
    result = adjtimex(ctypes.byref(timex))
    if result < 0:
        return None
    return int(result), int(timex.status)


def clock_synchronised(
    kernel: Callable[[], tuple[int, int] | None] = kernel_clock_state,
    flag: Path = TIMESYNCD_FLAG,
) -> bool:
    """True when the kernel says the clock is synchronised, or timesyncd says it synced it."""
    state = kernel()
    if state is not None:
        result, status = state
        if result != TIME_ERROR and not status & STA_UNSYNC:
            return True
    try:
        return flag.exists()
    except OSError:
        return False
