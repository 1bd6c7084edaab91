"""Is the system clock synchronised? Signed requests carry timestamps and the cancel window is
a Beijing-time day, so the kiosk takes no payments on a clock nobody has set from a time source.

Asked of systemd-timesyncd's flag file and of the kernel (`adjtimex` with no changes, through
ctypes: no hardware library, no C extension). Under a unit with `ProtectClock=yes` the kernel
call is refused (EPERM) and the flag file alone answers. The kernel is asked only while the
flag is absent, so a kiosk whose clock timesyncd has set never loads ctypes (about 0.3 MiB
resident for the life of the daemon).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

TIME_ERROR = 5  # adjtimex's return value while the clock is not synchronised
STA_UNSYNC = 0x0040  # status bit: the clock is not synchronised
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


@functools.cache
def _adjtimex_reader() -> Callable[[], tuple[int, int] | None] | None:
    """A read-only call of libc's adjtimex, made once (the clock is checked every minute) from
    the symbols the interpreter already has loaded: libc is one of them, and
    `ctypes.util.find_library` would run `ldconfig -p` in a child process and keep subprocess
    loaded for nothing. None when ctypes or the call is unavailable."""
    try:
        import ctypes
    except ImportError:
        return None

    class Timex(ctypes.Structure):
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

    try:
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None

    def read() -> tuple[int, int] | None:
        timex = Timex()
        result = adjtimex(ctypes.byref(timex))
        if result < 0:
            return None
        return int(result), int(timex.status)

    return read


def kernel_clock_state() -> tuple[int, int] | None:
    """`adjtimex` with modes=0 (read only): (return value, status bits), or None when the
    call is unavailable or refused."""
    read = _adjtimex_reader()
    return None if read is None else read()


def clock_synchronised(
    kernel: Callable[[], tuple[int, int] | None] = kernel_clock_state,
    flag: Path = TIMESYNCD_FLAG,
) -> bool:
    """True when timesyncd says it synced the clock, or the kernel says it is synchronised."""
    try:
        if flag.exists():
            return True
    except OSError:
        pass  # unreadable: the kernel's word it is
    state = kernel()
    if state is None:
        return False
    result, status = state
    return result != TIME_ERROR and not status & STA_UNSYNC
