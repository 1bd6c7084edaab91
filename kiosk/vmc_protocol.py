"""The serial vend protocol, version 1 (SPEC section 4): parse the controller's lines and
format the kiosk's. Pure: no port here; `drivers/vend_serial.py` moves the bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from kiosk.errors import VendProtocolError
from kiosk.money import format_amount, parse_amount

MAX_LINE = 128  # bytes in a line, not counting its "\n" (or "\r\n")

ITEM_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
# A ref is the partner_trans_id (at most 64 characters at Alipay); a reason is an Alipay error
# code or a kiosk word. Both are one printable ASCII token, so they never split a line.
REF_RE = re.compile(r"[!-~]{1,64}")
REASON_RE = re.compile(r"[!-~]{1,64}")

# What `ERR <reason>` says about the last line.
UNKNOWN_VERB = "unknown-verb"
BAD_FIELDS = "bad-fields"
BAD_AMOUNT = "bad-amount"
BAD_ITEM = "bad-item"
BAD_REF = "bad-ref"
TOO_LONG = "too-long"
NOT_ASCII = "not-ascii"
EMPTY = "empty"  # a blank line; the serial link skips these without an answer
UNKNOWN_REF = "unknown-ref"  # a report for a ref the kiosk never approved

# The answers the core may give to `VEND` and `CANCEL` (`VendOutput.answer_vend`).
VEND_ANSWERS = frozenset({"OK", "BUSY", "OUT_OF_SERVICE", "CANCELLED", "TIMEOUT"})


@dataclass(frozen=True)
class Ping:
    """`PING`: the controller checks the link."""


@dataclass(frozen=True)
class Vend:
    """`VEND <item> <amount>`: the customer chose (vmc sale mode)."""

    item: str
    amount: Decimal


@dataclass(frozen=True)
class Cancel:
    """`CANCEL`: the customer gave up before paying."""


@dataclass(frozen=True)
class Success:
    """`SUCCESS <ref>`: the product came out."""

    ref: str


@dataclass(frozen=True)
class Failure:
    """`FAILURE <ref>`: the product did not come out; the kiosk reverses the charge."""

    ref: str


VmcMessage = Ping | Vend | Cancel | Success | Failure


def parse_vmc_line(raw: bytes, currency: str) -> VmcMessage:
    """Parse one line from the controller, with or without its `\\n` / `\\r\\n`.

    Raises `VendProtocolError` whose `reason` is what the kiosk answers with `ERR`.
    """
    line = raw.removesuffix(b"\n").removesuffix(b"\r")
    if len(line) > MAX_LINE:
        raise VendProtocolError(TOO_LONG)
    if not line:
        raise VendProtocolError(EMPTY)
    if not line.isascii():
        raise VendProtocolError(NOT_ASCII)
    verb, *fields = line.decode("ascii").split(" ")
    if verb in ("PING", "CANCEL"):
        _expect_fields(fields, 0)
        return Ping() if verb == "PING" else Cancel()
    if verb == "VEND":
        _expect_fields(fields, 2)
        item, amount_text = fields
        if not ITEM_RE.fullmatch(item):
            raise VendProtocolError(BAD_ITEM)
        try:
            amount = parse_amount(amount_text, currency)
        except ValueError:
            raise VendProtocolError(BAD_AMOUNT) from None
        return Vend(item, amount)
    if verb in ("SUCCESS", "FAILURE"):
        _expect_fields(fields, 1)
        (ref,) = fields
        if not REF_RE.fullmatch(ref):
            raise VendProtocolError(BAD_REF)
        return Success(ref) if verb == "SUCCESS" else Failure(ref)
    raise VendProtocolError(UNKNOWN_VERB)


def _expect_fields(fields: list[str], count: int) -> None:
    # "VEND  a 1.50" (two spaces) splits into an empty field: also the wrong shape.
    if len(fields) != count or "" in fields:
        raise VendProtocolError(BAD_FIELDS)


class LineFramer:
    """Cuts the byte stream from the controller into lines, keeping at most one line in memory.

    `feed()` returns each complete line (without its `\\n`), or None for a line that grew past
    `MAX_LINE` and was discarded up to its newline (the link answers `ERR too-long`).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        *complete, tail = data.split(b"\n")
        lines = [self._finish(chunk) for chunk in complete]
        if not self._discarding:
            self._buffer += tail
            # One byte of slack for a "\r" that belongs before the "\n".
            if len(self._buffer) > MAX_LINE + 1:
                self._buffer.clear()
                self._discarding = True
        return lines

    def reset(self) -> None:
        """Forget a half-received line (after the link dropped)."""
        self._buffer.clear()
        self._discarding = False

    def _finish(self, chunk: bytes) -> bytes | None:
        if self._discarding:
            self._discarding = False
            return None
        line = bytes(self._buffer) + chunk
        self._buffer.clear()
        return line if len(line) <= MAX_LINE + 1 else None


def _line(*fields: str) -> bytes:
    return (" ".join(fields) + "\n").encode("ascii")


def _token(text: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid {what}: one printable ASCII word expected")
    return text


def pong() -> bytes:
    return _line("PONG")


def ok() -> bytes:
    return _line("OK")


def busy() -> bytes:
    return _line("BUSY")


def out_of_service(reason: str) -> bytes:
    return _line("OUT_OF_SERVICE", _token(reason, REASON_RE, "reason"))


def cancelled() -> bytes:
    return _line("CANCELLED")


def timeout() -> bytes:
    return _line("TIMEOUT")


def approved(ref: str, amount: Decimal, currency: str) -> bytes:
    """`APPROVED <ref> <amount>`. An amount with more digits than the currency has is refused
    rather than rounded: the controller must see exactly what was charged."""
    text = format_amount(amount, currency)
    if Decimal(text) != amount:
        raise ValueError(f"{amount} has more minor digits than {currency} allows")
    return _line("APPROVED", _token(ref, REF_RE, "ref"), text)


def denied(reason: str) -> bytes:
    return _line("DENIED", _token(reason, REASON_RE, "reason"))


def ack(ref: str) -> bytes:
    return _line("ACK", _token(ref, REF_RE, "ref"))


def err(reason: str) -> bytes:
    return _line("ERR", _token(reason, REASON_RE, "reason"))


def vend_answer(answer: str) -> bytes:
    """The core's answer to `VEND`/`CANCEL`: `OK`, `BUSY`, `OUT_OF_SERVICE <reason>`,
    `CANCELLED` or `TIMEOUT`. Anything else is a programming error (ValueError)."""
    verb, _, reason = answer.partition(" ")
    if verb not in VEND_ANSWERS:
        raise ValueError(f"{answer!r} is not an answer to VEND")
    if verb == "OUT_OF_SERVICE":
        return out_of_service(reason)
    if reason:
        raise ValueError(f"{verb} takes no reason, got {answer!r}")
    return _line(verb)
