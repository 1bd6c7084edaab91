"""What a scan must look like to be charged, and the memory of codes already used."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from kiosk.boot_clock import BootStamp
from kiosk.errors import PaymentCodeError
from kiosk.log import mask_code

# Alipay payment codes: 16-24 digits starting 25-30.
_CODE_RE = re.compile(r"^(2[5-9]|30)\d{14,22}$")
CODE_REUSE_WINDOW_S = 180.0


@dataclass(frozen=True)
class PaymentCode:
    """A scanned Alipay payment code. Its repr never shows the whole code."""

    digits: str

    @classmethod
    def parse(cls, text: str) -> PaymentCode:
        """Accept a scanned line if it is a payment code, else raise PaymentCodeError saying why
        (without repeating the scan in full: it may be a code with one digit misread)."""
        cleaned = text.strip()
        if not cleaned:
            raise PaymentCodeError("empty scan")
        if not cleaned.isascii() or not cleaned.isdigit():
            raise PaymentCodeError(f"not a payment code: {len(cleaned)} characters, not all digits")
        if not 16 <= len(cleaned) <= 24:
            raise PaymentCodeError(
                f"not a payment code: {len(cleaned)} digits (an Alipay code has 16-24)"
            )
        if not _CODE_RE.match(cleaned):
            raise PaymentCodeError(
                f"not a payment code: starts {cleaned[:2]} (an Alipay code starts 25-30)"
            )
        return cls(cleaned)

    @property
    def masked(self) -> str:
        return mask_code(self.digits) or ""

    @property
    def last4(self) -> str:
        return self.digits[-4:]

    def __repr__(self) -> str:
        return f"PaymentCode({self.masked})"

    __str__ = __repr__


def code_digest(key: bytes, digits: str) -> bytes:
    """The keyed hash the kiosk remembers of a code, in memory and in the journal (rule 7)."""
    return hmac.new(key, digits.encode("ascii"), hashlib.sha256).digest()


class SeenCode(NamedTuple):
    """A code's keyed hash as the journal keeps it, with when it was seen."""

    digest: bytes
    seen_at: float  # wall clock, epoch seconds
    # The boot it was seen in and the boot clock then; None if journaled without a boot clock
    # (an older firmware, a system without one).
    boot_id: str | None = None
    boot_s: float | None = None

    def age(self, now_wall: float, now_boot: BootStamp | None) -> float:
        """Seconds since it was seen: by the boot clock if seen in this boot (no step of the
        wall clock moves that), else by the wall clock. Seen in another boot, it was before
        this boot began: at least as long ago as this boot's clock says, whatever the wall
        clock came back as after the reboot. A boot stamp ahead of this boot's clock is not of
        this boot: the wall clock then. Never below 0: a wall stamp ahead of now (the clock was
        set back since), by however much, is seen now."""
        wall_age = max(now_wall - self.seen_at, 0.0)
        if now_boot is None or self.boot_id is None:
            return wall_age
        if self.boot_id != now_boot.boot_id:
            return max(wall_age, now_boot.seconds)
        if self.boot_s is not None and self.boot_s <= now_boot.seconds:
            return now_boot.seconds - self.boot_s
        return wall_age


class RecentCodes:
    """Codes seen in the last few minutes, remembered as keyed hashes (never the code itself).

    Alipay codes are single-use; a second scan of the same screen must not start a second
    payment. The key is the journal's (`Journal.code_key`), so the hashes a sale journaled
    (`seed`) are still known after a restart; without a key given it is random, per process.
    """

    def __init__(
        self,
        window_s: float = CODE_REUSE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        key: bytes | None = None,
    ) -> None:
        self._key = key or os.urandom(32)
        self._window_s = window_s
        self._clock = clock
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()

    @property
    def window_s(self) -> float:
        return self._window_s

    def digest(self, code: PaymentCode) -> bytes:
        return code_digest(self._key, code.digits)

    def seed(
        self, seen: Iterable[SeenCode], now_wall: float, now_boot: BootStamp | None = None
    ) -> int:
        """Remember the hashes a journal kept, each as seen `SeenCode.age` ago (by the boot
        clock if seen in this boot, else by the wall clock); those older than the window are
        left out. Returns how many were taken."""
        now = self._clock()
        taken = 0
        with self._lock:
            for code in seen:
                age = code.age(now_wall, now_boot)
                if age <= self._window_s:
                    self._seen[code.digest] = max(self._seen.get(code.digest, now - age), now - age)
                    taken += 1
        return taken

    def seen_recently(self, code: PaymentCode) -> bool:
        """True if this code was remembered within the window; remembers it either way."""
        now = self._clock()
        digest = self.digest(code)
        with self._lock:
            for key in [k for k, t in self._seen.items() if now - t > self._window_s]:
                del self._seen[key]
            if digest in self._seen:
                return True
            self._seen[digest] = now
            return False
