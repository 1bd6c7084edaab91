"""An MDB cashless device (a card reader, as far as the vending machine knows) through a Qibixx
MDB Pi HAT or MDB-USB, as a `VendOutput` (SPEC section 7; the facts are in MDB.md).

Two threads. The reader thread owns the port: it opens it exclusively, cuts the board's lines,
follows the machine's requests (`c,STATUS,VEND`), settles vends (`c,VEND,SUCCESS`,
`c,ERR,VEND 3`, a request dropped after approval) and reopens the port with backoff after an
unplug. The keeper thread looks after the board: it sends the reader's configuration at start,
after a reopen and after a board reset, switches the reader on and off with the kiosk's
availability, checks that a quiet board still answers `V`, and resets a board that does not
through its GPIO line (Pi HAT). Neither decides anything about money: the core does. What this
driver guards is the approval itself: `C,VEND` goes out only for the request the core accepted,
for the amount the machine asked, within `approve_within_s` of the request.

Not here: the board's master mode (`D,...`), its sniffer, its firmware update, and a native
9-bit MDB driver (which would replace this module, not extend it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import serial

from kiosk.iso4217 import mdb_currency_code
from kiosk.log import event
from kiosk.money import MAX_AMOUNT, format_amount, minor_digits
from kiosk.ports import VendListener, VendRequest, VendResult
from kiosk.vmc_protocol import ITEM_RE, LineFramer

log = logging.getLogger(__name__)

BAUD = 115200  # both boards, 8N1
ADDRESSES = {1: 0x10, 2: 0x60}  # vend.mdb_address → the reader's MDB address (cashless #1, #2)
JOIN_TIMEOUT_S = 2.0  # close() waits this long for each thread it woke
WRITE_TIMEOUT_S = 1.0  # a wedged port must not hang the payment flow
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
SETTLED_MEMORY = 256  # settled refs remembered, so a ref is never approved twice
OWED_MEMORY = 8  # requests and cancels the core has not answered yet
UNCLAIMED_TTL_S = 600.0  # a report from before a restart can be claimed this long

# Host to board. Lines end with "\n"; the board ignores a "\r" before it, we send none.
READER_OFF = b"C,0\n"
READER_ON = b"C,1\n"
STOP = b"C,STOP\n"
VERSION = b"V\n"

# The reader's states as the board reports them (`c,STATUS,<state>`). OFFLINE and ONLINE are
# what some firmware versions say after `C,0` / `C,1`: taken as INACTIVE and as an echo.
READER_STATES = frozenset({"INACTIVE", "DISABLED", "ENABLED", "IDLE", "OFFLINE", "ONLINE"})
_GONE = frozenset({"INACTIVE", "OFFLINE", "DISABLED", "ENABLED", "IDLE"})  # end an open request
_AMOUNT_RE = re.compile(r"\d{1,9}(?:\.\d{1,3})?")


@dataclass(frozen=True)
class MdbTimings:
    """How long the driver waits for the board. The defaults suit a real board; tests and a
    bench rig shorten them."""

    confirm_s: float = 2.0  # each C,SETCONF is answered c,SET,OK within this
    reader_off_s: float = 1.0  # C,0 is answered c,STATUS,INACTIVE within this (else: logged)
    prompted_s: float = 3.0  # an INACTIVE this soon after our C,0/C,1 answers it: no reset
    liveness_interval_s: float = 30.0  # a board quiet this long while idle is asked V
    liveness_timeout_s: float = 3.0  # ... and must answer within this
    reset_hold_s: float = 0.2  # the reset line is held low this long
    reset_boot_s: float = 2.0  # then the board gets this long to boot before its configuration
    retry_first_s: float = 1.0  # a failed configuration is retried after this, doubling ...
    retry_max_s: float = 60.0  # ... up to this


# -- the board's lines, checked where they enter ----------------------------------------------


@dataclass(frozen=True)
class ReaderStatus:
    """`c,STATUS,<state>`: the reader as the vending machine sees it."""

    state: str


@dataclass(frozen=True)
class VendAsked:
    """`c,STATUS,VEND,<amount>,<item>`: the customer chose; the machine asks for `amount`."""

    amount: Decimal
    item: str


@dataclass(frozen=True)
class VendAskedBadly:
    """A `c,STATUS,VEND` line that does not hold one amount and one item: refused."""

    reason: str


@dataclass(frozen=True)
class VendSucceeded:
    """`c,VEND,SUCCESS`: the machine reports the product dispensed."""


@dataclass(frozen=True)
class VendFailed:
    """`c,ERR,VEND <n>`: the machine reports the vend failed."""

    detail: str


@dataclass(frozen=True)
class SetAnswer:
    """`c,SET,<answer>`: the board's answer to `C,SETCONF` (`OK`, or anything else)."""

    ok: bool
    text: str


@dataclass(frozen=True)
class BoardError:
    """`c,ERR,<text>` other than a vend failure."""

    text: str


@dataclass(frozen=True)
class VersionInfo:
    """`v,<firmware>,<cpu id>`: the answer to `V`."""

    text: str


@dataclass(frozen=True)
class Polled:
    """`r,ACK`: the machine polled the reader."""


@dataclass(frozen=True)
class ReaderEcho:
    """`c,0` / `c,1`: the board repeats a reader switch."""

    on: bool


@dataclass(frozen=True)
class Unrecognised:
    """Anything else; logged and otherwise ignored."""

    text: str
    reason: str


BoardLine = (
    ReaderStatus
    | VendAsked
    | VendAskedBadly
    | VendSucceeded
    | VendFailed
    | SetAnswer
    | BoardError
    | VersionInfo
    | Polled
    | ReaderEcho
    | Unrecognised
)


def parse_board_line(raw: bytes, currency: str) -> BoardLine:
    """One line from the board (without its `\\n`) as a typed value. Never raises."""
    line = raw.removesuffix(b"\r")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return Unrecognised(_show(line), "not-ascii")
    if not text.isprintable():
        return Unrecognised(_show(line), "control-characters")
    fields = text.split(",")
    match fields:
        case ["c", "STATUS", "VEND", *rest]:
            return _vend_asked(rest, currency)
        case ["c", "STATUS", state] if state in READER_STATES:
            return ReaderStatus(state)
        case ["c", "VEND", "SUCCESS"]:
            return VendSucceeded()
        case ["c", "ERR", detail, *more] if detail.startswith("VEND"):
            return VendFailed(",".join([detail, *more]))
        case ["c", "ERR", *detail]:
            return BoardError(",".join(detail))
        case ["c", "SET", *answer]:
            joined = ",".join(answer)
            return SetAnswer(joined == "OK", joined)
        case ["c", "0" | "1" as on]:
            return ReaderEcho(on == "1")
        case ["v", *_]:
            return VersionInfo(text)
        case ["r", "ACK"]:
            return Polled()
    return Unrecognised(text[:64], "unknown")


def _vend_asked(fields: list[str], currency: str) -> VendAsked | VendAskedBadly:
    if len(fields) != 2:
        return VendAskedBadly("bad-fields")
    amount_text, item = fields
    if not _AMOUNT_RE.fullmatch(amount_text):
        return VendAskedBadly("bad-amount")
    try:
        amount = Decimal(amount_text)
    except InvalidOperation:  # pragma: no cover - the pattern already guards this
        return VendAskedBadly("bad-amount")
    quantum = Decimal(1).scaleb(-minor_digits(currency))
    if amount != amount.quantize(quantum):
        return VendAskedBadly("more-minor-digits-than-the-currency")
    if amount <= 0 or amount > MAX_AMOUNT:
        return VendAskedBadly("amount-out-of-range")
    if not ITEM_RE.fullmatch(item):
        return VendAskedBadly("bad-item")
    # "1.5" and "1.50" are the same decimal; the kiosk carries the currency's minor digits.
    return VendAsked(amount.quantize(quantum), item)


def reader_settings(address: int, currency: str) -> list[tuple[str, str]]:
    """The reader's configuration as `C,SETCONF` name/value pairs, in the order sent."""
    if address not in ADDRESSES:
        raise ValueError(f"mdb_address must be 1 or 2, not {address!r}")
    return [
        ("mdb-addr", f"0x{ADDRESSES[address]:02X}"),
        ("mdb-currency-code", mdb_currency_code(currency)),
        ("mdb-always-idle", "1"),
    ]


def setconf(name: str, value: str) -> bytes:
    return f"C,SETCONF,{name}={value}\n".encode("ascii")


def approve(amount: Decimal, currency: str) -> bytes:
    return f"C,VEND,{format_amount(amount, currency)}\n".encode("ascii")


# -- bookkeeping --------------------------------------------------------------------------------


class _Vend:
    """One approved vend (or one vend from before a restart) waiting for the machine's report."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: VendResult | None = None


class _Request:
    """The machine's open request, from `c,STATUS,VEND` until it is approved and settled,
    refused, or dropped."""

    def __init__(self, amount: Decimal, item: str, opened_at: float) -> None:
        self.amount = amount
        self.item = item
        self.opened_at = opened_at
        self.accepted = False  # the core answered OK: a sale may be paying for this request
        self.ref: str | None = None  # set when approved
        self.vend: _Vend | None = None  # set when approved, until settled


class _Answer:
    """A line the keeper waits for (the board's answer to what it just sent)."""

    def __init__(self, accepts: Callable[[BoardLine], bool]) -> None:
        self.accepts = accepts
        self.line: BoardLine | None = None
        self.done = threading.Event()


def _answers_setconf(line: BoardLine) -> bool:
    return isinstance(line, SetAnswer | BoardError)


def _answers_reader_off(line: BoardLine) -> bool:
    return (isinstance(line, ReaderStatus) and line.state in ("INACTIVE", "OFFLINE")) or (
        isinstance(line, BoardError)
    )


def _answers_version(line: BoardLine) -> bool:
    return isinstance(line, VersionInfo)


# -- the driver ---------------------------------------------------------------------------------


class MdbVendOutput:
    """`VendOutput` for a vending machine's MDB bus, through a Qibixx board on `port`.

    `address` is 1 (cashless #1, MDB 0x10) or 2 (cashless #2, 0x60). `reset_pin` is the BCM pin
    wired to the Pi HAT's reset (GPIO 6 on the MDB Pi HAT; None for MDB-USB). `approve_within_s`
    is the machine's patience: a request older than this is never approved.
    """

    # The machine drops a request (customer cancel, its own timeout) while the kiosk may be
    # paying for it: the core then cancels that payment rather than answering BUSY (MDB.md).
    cancel_abandons_payment = True
    # A report (`c,VEND,SUCCESS`) names no vend: after a restart it can stand for a vend
    # approved before it only when that vend is the one left unconfirmed.
    reports_name_the_vend = False

    def __init__(
        self,
        port: str,
        currency: str,
        *,
        baud: int = BAUD,
        address: int = 1,
        reset_pin: int | None = None,
        approve_within_s: float = 60.0,
        available: bool = True,
        timings: MdbTimings | None = None,
        serial_factory: Callable[..., Any] = serial.Serial,
        pin_factory: Any = None,
    ) -> None:
        self._port_name = port
        self._baud = baud
        self._currency = currency
        self._settings = reader_settings(address, currency)  # refuses an unknown currency now
        self._approve_within_s = approve_within_s
        self._timings = timings or MdbTimings()
        self._serial_factory = serial_factory
        self._reset_line: Any = None
        if reset_pin is not None:
            # Imported here: MDB-USB needs no gpiozero. High = running, low = held in reset.
            from gpiozero import DigitalOutputDevice

            self._reset_line = DigitalOutputDevice(
                reset_pin, active_high=True, initial_value=True, pin_factory=pin_factory
            )
        self._listener: VendListener | None = None
        self._reader: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake = threading.Event()  # the keeper has something to look at
        # The open port, swapped by the reader thread; every writer holds _write_lock, so lines
        # never interleave on the wire.
        self._port: Any = None
        self._write_lock = threading.Lock()
        # Everything below is guarded by _lock; _changed wakes tests and the selftest.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._request: _Request | None = None
        self._owed: deque[tuple[str, _Request | None]] = deque()
        self._settled: OrderedDict[str, VendResult] = OrderedDict()
        self._awaiting: dict[str, _Vend] = {}
        self._unclaimed: tuple[VendResult, float] | None = None
        self._approved_any = False
        self._answer: _Answer | None = None
        self._available = available
        self._unavailable_reason: str | None = None
        self._reader_on: bool | None = None  # what the board was last told (None: unknown)
        self._needs_config = True
        self._configuring = False
        self._configurations = 0
        self._connections = 0
        self._resets = 0
        self._problem: str | None = None
        self._prompted_until = 0.0
        self._last_heard = time.monotonic()
        self._reader_state = "unknown"

    # -- VendOutput ---------------------------------------------------------------------------

    def start(self, listener: VendListener) -> None:
        """Open the port and configure the board in the background."""
        if self._reader is not None:
            raise RuntimeError("the MDB reader is already started")
        self._listener = listener
        self._reader = threading.Thread(target=self._read, name="vend-mdb", daemon=True)
        self._keeper = threading.Thread(target=self._keep, name="vend-mdb-board", daemon=True)
        self._reader.start()
        self._keeper.start()

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        """Approve the open request with `C,VEND,<amount>` and wait for the machine's report.

        Approves nothing (`C,STOP`, FAILED) unless a request is open, the core answered it OK,
        it is not yet approved, it asked for exactly `amount`, and it is younger than
        `approve_within_s`. A ref already settled is never approved again: its result returns.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            known = self._settled.get(ref)
            request = self._request
            refusal = None if known is not None else self._refusal(request, amount)
            vend: _Vend | None = None
            if known is None and refusal is None:
                assert request is not None
                vend = request.vend = _Vend()
                request.ref = ref
                self._approved_any = True
            elif known is None:
                self._remember(ref, VendResult.FAILED)
                # C,STOP ends an unapproved request; an approved one is left to its report.
                stop = request is None or request.vend is None
                if stop:
                    self._request = None
        if known is not None:
            event(log, "vend.dispense_repeated", logging.WARNING, ref=ref, result=known.value)
            return known
        if vend is None:
            event(
                log,
                "mdb.approval_refused",
                logging.WARNING,
                ref=ref,
                amount=str(amount),
                reason=refusal,
            )
            if stop:
                self._send(STOP)
            return VendResult.FAILED
        assert request is not None
        line = approve(amount, self._currency)
        with self._lock:
            # Checked again and sent under one hold (lock order: _lock, then the write lock):
            # a request the machine dropped or replaced since the check above is never
            # approved; the reader has settled this vend FAILED, and the wait returns that.
            current = self._request is request and request.vend is vend
            sent = current and self._send(line)
        if current and not sent:
            # The board never saw the approval: nothing can come out. Reverse at once.
            event(log, "vend.approve_not_sent", logging.WARNING, ref=ref)
            with self._lock:
                request.vend = None
                request.ref = None
                self._settle_locked(ref, vend, VendResult.TIMED_OUT)
            return VendResult.TIMED_OUT
        if sent:
            event(log, "vend.approved", ref=ref, amount=str(amount), currency=self._currency)
        return self._wait(ref, vend, deadline)

    def await_report(self, ref: str, timeout_s: float) -> VendResult:
        """After a restart: wait for a `c,VEND,SUCCESS` / `c,ERR,VEND` about a vend approved
        before it, without approving anything. The machine cannot be asked; a report that came
        in before this call (with no vend of ours open) counts."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            known = self._settled.get(ref)
            early: VendResult | None = None
            vend: _Vend | None = None
            if known is None and self._unclaimed is not None:
                result, seen_at = self._unclaimed
                self._unclaimed = None
                if time.monotonic() - seen_at <= UNCLAIMED_TTL_S:
                    early = result
                    self._remember(ref, result)
            if known is None and early is None:
                if ref in self._awaiting:
                    raise RuntimeError(f"a report for {ref} is already awaited")
                vend = self._awaiting[ref] = _Vend()
        if known is not None:
            return known
        if early is not None:
            event(log, "vend.report_claimed", ref=ref, result=early.value)
            return early
        assert vend is not None
        event(log, "vend.awaiting_report", ref=ref, timeout_s=timeout_s)
        return self._wait(ref, vend, deadline)

    def deny(self, reason: str) -> None:
        """The payment for the accepted request was refused: `C,STOP` while it is open.

        A deny for the open request the core has not answered yet (say, over
        `sale.max_price`) is the core's answer to it: it refuses it like `BUSY` does, with
        `C,STOP`, and settles the answer the driver was owed for it, so later answers still
        find their own request or drop."""
        with self._lock:
            request = self._request
            if request is not None and not request.accepted and self._owes(request):
                # Answers are in order: this one belongs to the oldest request still owed.
                _, request = self._take_owed("OUT_OF_SERVICE")
            elif request is not None and not request.accepted:
                request = None  # answered already; this deny is not about it
            stop = request is not None and request is self._request and request.vend is None
            if stop:
                self._request = None
        if stop:
            event(log, "mdb.denied", reason=reason)
            self._send(STOP)

    def answer_vend(self, answer: str) -> None:
        """The core's answer to a request or a drop. `OK` sends nothing (the board keeps the
        machine waiting while the customer scans); `BUSY`, `OUT_OF_SERVICE <reason>` and
        `TIMEOUT` refuse the request they answer with `C,STOP`; `CANCELLED` answers a request
        the machine already dropped, so nothing is left to stop.

        The core answers each `on_vend_request` and `on_vend_cancel` once, in order; `TIMEOUT`
        comes unasked and concerns the request the core accepted.
        """
        word = answer.split(" ", 1)[0]
        with self._lock:
            target: _Request | None = None
            if word == "TIMEOUT":
                target = self._request if self._request and self._request.accepted else None
            elif word in ("OK", "BUSY", "OUT_OF_SERVICE", "CANCELLED"):
                kind, answered = self._take_owed(word)
                if kind == "request" and answered is not None:
                    if word == "OK":
                        answered.accepted = answered is self._request
                    elif word in ("BUSY", "OUT_OF_SERVICE"):
                        target = answered
            stop = target is not None and target is self._request and target.vend is None
            if stop:
                self._request = None
        if word not in ("OK", "BUSY", "OUT_OF_SERVICE", "CANCELLED", "TIMEOUT"):
            event(log, "mdb.answer_unknown", logging.WARNING, answer=answer[:48])
        if stop:
            event(log, "mdb.request_refused", answer=answer[:48])
            self._send(STOP)

    def running(self) -> bool:
        """True while both threads run: the driver is doing its job, even while the board has
        a problem it retries by itself (the core's watchdog asks this, not `healthy()`)."""
        threads = (self._reader, self._keeper)
        alive = all(t is not None and t.is_alive() for t in threads)
        return alive and not self._closing.is_set()

    def healthy(self) -> bool:
        """True while both threads run and the board has no problem (see `problem()`)."""
        threads = (self._reader, self._keeper)
        alive = all(t is not None and t.is_alive() for t in threads)
        with self._lock:
            return alive and not self._closing.is_set() and self._problem is None

    def close(self) -> None:
        """Switch the reader off (the machine sells for cash while the kiosk is away), stop both
        threads, release the port and the reset line, end any wait as TIMED_OUT. Safe twice."""
        first = not self._closing.is_set()
        self._closing.set()  # from here on the reader handles no more lines
        if first and self.connected():
            self._send(READER_OFF)
        self._wake.set()
        with self._write_lock:
            # Under the lock: the reader closes the port under it too, so this never wakes a
            # port that is already closed.
            port = self._port
            if port is not None and hasattr(port, "cancel_read"):
                with contextlib.suppress(OSError):
                    port.cancel_read()  # wake the reader now rather than never
        for thread in (self._reader, self._keeper):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=JOIN_TIMEOUT_S)
        with self._lock:
            waits = list(self._awaiting.items())
            if self._request is not None and self._request.vend is not None:
                assert self._request.ref is not None
                waits.append((self._request.ref, self._request.vend))
            for ref, vend in waits:
                self._settle_locked(ref, vend, VendResult.TIMED_OUT)
        if self._reset_line is not None:
            self._reset_line.close()

    def __enter__(self) -> MdbVendOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reader switch (kiosk.ports.ReaderSwitch) -----------------------------------------

    def set_available(self, available: bool, reason: str | None = None) -> None:
        """Switch the reader on (`C,1`) when the kiosk can take payments, off (`C,0`) when it
        cannot, so the machine sells for cash meanwhile. Returns at once; the keeper sends the
        line once the board is configured and no approved vend is waiting for its report."""
        with self._lock:
            changed = available != self._available
            self._available = available
            self._unavailable_reason = None if available else reason
        if changed:
            event(log, "mdb.availability", available=available, reason=reason)
        self._wake.set()

    def problem(self) -> str | None:
        """Why the board cannot take payments (for `out_of_service`), or None."""
        with self._lock:
            return self._problem

    # -- link and board state, for the selftest and tests ------------------------------------

    def connected(self) -> bool:
        with self._write_lock:
            return self._port is not None

    def reader_state(self) -> str:
        """The reader as the machine last reported it (`INACTIVE`, `ENABLED`, ...)."""
        with self._lock:
            return self._reader_state

    def wait_reader_state(self, state: str, timeout_s: float) -> bool:
        """Wait until the machine's last word about the reader is `state`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._reader_state == state, timeout_s)

    def wait_configured(self, timeout_s: float, times: int = 1) -> bool:
        """Wait until the board has confirmed its configuration `times` times in all."""
        with self._changed:
            return self._changed.wait_for(lambda: self._configurations >= times, timeout_s)

    def wait_problem(self, timeout_s: float) -> str | None:
        """Wait until the board has a problem; return it (None if none came)."""
        with self._changed:
            self._changed.wait_for(lambda: self._problem is not None, timeout_s)
            return self._problem

    # -- approvals and reports ---------------------------------------------------------------

    def _refusal(self, request: _Request | None, amount: Decimal) -> str | None:
        # Called with _lock held. Why the open request cannot be approved for `amount`.
        if request is None:
            return "no request open"
        if request.vend is not None:
            return "the request is already approved"
        if not request.accepted:
            return "the kiosk did not accept this request"
        if request.amount != amount:
            return f"the machine asked {request.amount}"
        if time.monotonic() - request.opened_at > self._approve_within_s:
            return "older than approve_within_s"
        return None

    def _take_owed(self, word: str) -> tuple[str | None, _Request | None]:
        # Called with _lock held: the request or drop this answer belongs to.
        wanted = {"OK": ("request",), "OUT_OF_SERVICE": ("request",), "CANCELLED": ("cancel",)}
        kinds = wanted.get(word, ("request", "cancel"))  # BUSY answers either
        while self._owed:
            kind, request = self._owed.popleft()
            if kind in kinds:
                return kind, request
        return None, None

    def _owes(self, request: _Request) -> bool:
        # Called with _lock held: the core has not answered this request yet.
        return any(owed is request for kind, owed in self._owed if kind == "request")

    def _owe(self, kind: str, request: _Request | None) -> None:
        self._owed.append((kind, request))
        while len(self._owed) > OWED_MEMORY:
            self._owed.popleft()

    def _wait(self, ref: str, vend: _Vend, deadline: float) -> VendResult:
        vend.done.wait(max(0.0, deadline - time.monotonic()))
        # A report and the deadline may race: whichever takes the lock first decides.
        with self._lock:
            if vend.result is None:
                self._settle_locked(ref, vend, VendResult.TIMED_OUT)
                if self._request is not None and self._request.vend is vend:
                    self._request = None
            result = vend.result
        assert result is not None
        event(log, "vend.result", ref=ref, result=result.value)
        self._wake.set()  # a reader switch held back during the vend may go out now
        return result

    def _settle_locked(self, ref: str, vend: _Vend, result: VendResult) -> None:
        self._awaiting.pop(ref, None)
        vend.result = result
        self._remember(ref, result)
        vend.done.set()

    def _remember(self, ref: str, result: VendResult) -> None:
        self._settled[ref] = result
        while len(self._settled) > SETTLED_MEMORY:
            self._settled.popitem(last=False)

    def _vend_in_flight(self) -> bool:
        # Called with _lock held.
        return self._request is not None and self._request.vend is not None

    def _on_report(self, result: VendResult, detail: str) -> None:
        """`c,VEND,SUCCESS` or `c,ERR,VEND <n>`."""
        cancelled = False
        with self._lock:
            request = self._request
            if request is not None and request.vend is not None:
                assert request.ref is not None
                ref: str | None = request.ref
                self._settle_locked(request.ref, request.vend, result)
                self._request = None
                outcome = "settled"
            elif (
                self._awaiting
                and request is None
                and len(self._awaiting) == 1
                and (not self._approved_any)
            ):
                # An MDB report names no vend. It can be the one vend approved before the
                # restart only while nothing was approved since and no new session is open.
                ref, vend = next(iter(self._awaiting.items()))
                self._settle_locked(ref, vend, result)
                outcome = "settled"
            elif self._awaiting and request is None:
                ref = None
                outcome = "unattributable"  # the awaited vend times out and is reversed
            elif request is not None:
                # A report about a request nobody approved: the machine ended it.
                ref = None
                self._request = None
                self._owe("cancel", None)
                cancelled = True
                outcome = "unapproved"
            elif not self._approved_any:
                ref = None
                self._unclaimed = (result, time.monotonic())
                outcome = "unclaimed"
            else:
                ref = None
                outcome = "late"
        if outcome == "settled":
            event(log, "vend.report", ref=ref, result=result.value, detail=detail)
            self._wake.set()
        elif outcome == "unapproved":
            event(log, "mdb.report_without_approval", logging.ERROR, result=result.value)
        elif outcome == "unclaimed":
            event(log, "mdb.report_unclaimed", result=result.value)
        elif outcome == "unattributable":
            event(log, "mdb.report_unattributable", logging.WARNING, result=result.value)
        else:
            # The vend's wait is over and the core is reversing: a late SUCCESS means free goods.
            event(log, "vend.report_late", logging.WARNING, result=result.value)
        if cancelled:
            self._tell_listener(lambda listener: listener.on_vend_cancel())

    def _on_request(self, asked: VendAsked) -> None:
        """`c,STATUS,VEND,<amount>,<item>`: a new request (ending any open one first)."""
        self._end_request("replaced")
        with self._lock:
            request = _Request(asked.amount, asked.item, time.monotonic())
            self._request = request
            self._reader_state = "VEND"
            self._owe("request", request)
            self._changed.notify_all()
        event(log, "vend.requested", item=asked.item, amount=str(asked.amount))
        self._tell_listener(
            lambda listener: listener.on_vend_request(VendRequest(asked.item, asked.amount))
        )

    def _end_request(self, why: str) -> None:
        """The machine dropped the open request: before approval it is a cancel for the core;
        after approval without a report it is a failed vend."""
        cancelled = False
        with self._lock:
            request = self._request
            if request is None:
                return
            self._request = None
            if request.vend is not None:
                assert request.ref is not None
                ref = request.ref
                self._settle_locked(ref, request.vend, VendResult.FAILED)
            else:
                self._owe("cancel", None)
                cancelled = True
        if cancelled:
            event(log, "mdb.request_dropped", why=why, item=request.item)
            self._tell_listener(lambda listener: listener.on_vend_cancel())
        else:
            event(log, "vend.report", logging.WARNING, ref=ref, result="failed", detail=why)
            self._wake.set()

    def _tell_listener(self, call: Callable[[VendListener], None]) -> None:
        if self._listener is None:
            return
        try:
            call(self._listener)
        except Exception:  # a bug in the core must not take the reader down
            log.exception("vend listener failed")

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, line: bytes) -> bool:
        with self._write_lock:
            port = self._port
            if port is None:
                event(log, "mdb.line_not_sent", logging.WARNING, line=_show(line), why="no port")
                return False
            try:
                port.write(line)
            except (serial.SerialException, OSError) as exc:
                event(log, "mdb.line_not_sent", logging.WARNING, line=_show(line), why=str(exc))
                return False
        log.debug("host> %s", _show(line))
        return True

    def _read(self) -> None:
        backoff = BACKOFF_FIRST_S
        reported_outage = False
        while not self._closing.is_set():
            try:
                port = self._serial_factory(
                    port=self._port_name,
                    baudrate=self._baud,
                    timeout=None,  # block until a byte comes; close() uses cancel_read()
                    write_timeout=WRITE_TIMEOUT_S,
                    exclusive=True,
                )
            except (serial.SerialException, OSError, ValueError, OverflowError) as exc:
                if not reported_outage:
                    event(
                        log,
                        "mdb.port_unavailable",
                        logging.WARNING,
                        port=self._port_name,
                        error=str(exc),
                    )
                    reported_outage = True
                    self._set_problem(f"MDB board port {self._port_name} unavailable: {exc}")
                self._closing.wait(backoff)  # never a busy loop while the cable is out
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_FIRST_S
            reported_outage = False
            with self._write_lock:
                self._port = port
                if self._closing.is_set() and hasattr(port, "cancel_read"):
                    port.cancel_read()  # close() came while the port was opening
            with self._changed:
                self._connections += 1
                self._needs_config = True  # a board behind a new port may have been reset
                self._last_heard = time.monotonic()
                self._changed.notify_all()
            self._wake.set()
            event(log, "mdb.port_open", port=self._port_name)
            try:
                self._read_until_lost(port)
            finally:
                with self._write_lock:
                    self._port = None
                    with contextlib.suppress(serial.SerialException, OSError):
                        port.close()
            if not self._closing.is_set():
                event(log, "mdb.port_lost", logging.WARNING, port=self._port_name)
                self._closing.wait(BACKOFF_FIRST_S)

    def _read_until_lost(self, port: Any) -> None:
        framer = LineFramer()
        while not self._closing.is_set():
            try:
                data = port.read(port.in_waiting or 1)
            except (serial.SerialException, OSError) as exc:
                event(log, "mdb.port_error", logging.WARNING, port=self._port_name, error=str(exc))
                return
            if self._closing.is_set():
                return  # what comes now answers close()'s C,0, or nobody waits for it
            for raw in framer.feed(data):
                try:
                    self._handle(raw)
                except Exception:  # a bug here must not kill the reader and the link with it
                    log.exception("MDB line handling failed")

    def _handle(self, raw: bytes | None) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_heard = now
        if raw is None:
            event(log, "mdb.line_too_long", logging.WARNING)
            return
        if not raw.strip():
            return
        line = parse_board_line(raw, self._currency)
        with self._lock:
            answer = self._answer
            if answer is not None and answer.accepts(line):
                answer.line = line
                answer.done.set()
                self._answer = None
        match line:
            case VendAsked():
                self._on_request(line)
            case VendAskedBadly(reason=reason):
                event(log, "mdb.request_malformed", logging.WARNING, reason=reason, line=_show(raw))
                self._end_request("malformed request")
                self._send(STOP)
            case VendSucceeded():
                self._on_report(VendResult.VENDED, "SUCCESS")
            case VendFailed(detail=detail):
                self._on_report(VendResult.FAILED, detail)
            case ReaderStatus(state=state):
                self._on_status(state, now)
            case BoardError(text=text):
                event(log, "mdb.board_error", logging.WARNING, error=text[:64])
            case SetAnswer() | VersionInfo() | Polled() | ReaderEcho():
                log.debug("board> %s", _show(raw))
            case Unrecognised(reason=reason):
                event(log, "mdb.line_unknown", logging.WARNING, reason=reason, line=_show(raw))

    def _on_status(self, state: str, now: float) -> None:
        if state == "ONLINE":
            return  # an echo of C,1 on some firmware
        reset = False
        with self._lock:
            self._reader_state = "INACTIVE" if state == "OFFLINE" else state
            if state in ("INACTIVE", "OFFLINE"):
                prompted = self._configuring or now < self._prompted_until
                if not prompted:
                    # Nobody asked for it: the board restarted (and forgot its configuration),
                    # or the machine reset the reader. Either way: configure again.
                    reset = True
                    self._needs_config = True
                    self._reader_on = None
            else:
                # The machine has moved the reader on since our C,0/C,1: an INACTIVE from now
                # on is news, not that switch's answer.
                self._prompted_until = 0.0
            self._changed.notify_all()
        if state in _GONE:
            self._end_request(f"reader {state}")
        if reset:
            event(log, "mdb.board_reset_seen", logging.WARNING)
            self._wake.set()

    # -- the keeper: configuration, reader switch, liveness, reset ---------------------------

    def _keep(self) -> None:
        t = self._timings
        retry_s = t.retry_first_s
        retry_at = 0.0
        while not self._closing.is_set():
            self._wake.clear()
            now = time.monotonic()
            wait_s = t.liveness_interval_s
            with self._lock:
                link = self._port is not None
                in_flight = self._vend_in_flight()
                needs_config = self._needs_config
                quiet_s = now - self._last_heard
                idle = self._request is None
            if not link or in_flight:
                pass  # nothing to do until the port is back or the vend is settled
            elif needs_config:
                if now >= retry_at:
                    outcome = self._configure()
                    if outcome == "ok":
                        retry_s = t.retry_first_s
                    else:
                        if outcome == "silent" and self._reset_line is not None:
                            self._reset_board("no answer to its configuration")
                        retry_at = time.monotonic() + retry_s
                        wait_s = retry_s
                        retry_s = min(retry_s * 2, t.retry_max_s)
                else:
                    wait_s = retry_at - now
            else:
                self._switch_reader()
                if idle and quiet_s >= t.liveness_interval_s:
                    self._check_alive()
                else:
                    wait_s = max(t.liveness_interval_s - quiet_s, 0.01)
            self._wake.wait(wait_s)

    def _ask(
        self, line: bytes, accepts: Callable[[BoardLine], bool], timeout_s: float
    ) -> BoardLine | None:
        """Send `line` and wait for the board's answer to it (None: none in time, or unsent)."""
        answer = _Answer(accepts)
        with self._lock:
            self._answer = answer
        if line in (READER_OFF, READER_ON):
            with self._lock:
                self._prompted_until = time.monotonic() + self._timings.prompted_s
        if not self._send(line):
            with self._lock:
                self._answer = None
            return None
        answer.done.wait(timeout_s)
        with self._lock:
            if self._answer is answer:
                self._answer = None
        return answer.line

    def _configure(self) -> str:
        """Reader off, its configuration, then reader on if the kiosk is available.
        Returns "ok", "refused" or "silent" (nothing at all came back)."""
        t = self._timings
        with self._lock:
            self._configuring = True
            self._needs_config = False  # a reset seen from now on asks for another round
            self._reader_on = None
            heard_before = self._last_heard
        try:
            event(log, "mdb.configuring", port=self._port_name)
            if self._ask(READER_OFF, _answers_reader_off, t.reader_off_s) is None:
                event(log, "mdb.reader_off_unconfirmed", logging.WARNING)
            for name, value in self._settings:
                answer = self._ask(setconf(name, value), _answers_setconf, t.confirm_s)
                if isinstance(answer, SetAnswer) and answer.ok:
                    continue
                with self._lock:
                    self._needs_config = True
                    silent = self._last_heard == heard_before
                if answer is None and silent:
                    why = f"the MDB board on {self._port_name} does not answer"
                elif answer is None:
                    why = f"the MDB board did not confirm {name}={value} within {t.confirm_s:g} s"
                else:
                    text = answer.text if isinstance(answer, SetAnswer | BoardError) else "?"
                    why = f"the MDB board refused {name}={value}: {text[:48]}"
                event(log, "mdb.configuration_failed", logging.ERROR, reason=why)
                self._set_problem(why)
                return "silent" if answer is None and silent else "refused"
            with self._changed:
                self._configurations += 1
                self._reader_on = False  # C,0 opened the round
                self._changed.notify_all()
        finally:
            with self._lock:
                self._configuring = False
        event(log, "mdb.configured", settings=",".join(f"{n}={v}" for n, v in self._settings))
        self._set_problem(None)
        self._switch_reader()
        return "ok"

    def _switch_reader(self) -> None:
        """Send C,1 / C,0 when the kiosk's availability and the reader differ."""
        with self._lock:
            if self._needs_config or self._configuring or self._vend_in_flight():
                return
            want = self._available
            if self._reader_on == want:
                return
            self._reader_on = want
            self._prompted_until = time.monotonic() + self._timings.prompted_s
            reason = self._unavailable_reason
        if self._send(READER_ON if want else READER_OFF):
            event(log, "mdb.reader_on" if want else "mdb.reader_off", reason=reason)
        else:
            with self._lock:
                self._reader_on = None

    def _check_alive(self) -> None:
        t = self._timings
        if self._ask(VERSION, _answers_version, t.liveness_timeout_s) is not None:
            return
        event(log, "mdb.board_silent", logging.WARNING, timeout_s=t.liveness_timeout_s)
        with self._lock:
            self._needs_config = True
            self._reader_on = None
        if self._reset_line is not None:
            self._reset_board("no answer to V")
        else:
            self._set_problem(f"the MDB board on {self._port_name} does not answer")

    def _reset_board(self, why: str) -> None:
        """Hold the Pi HAT in reset for a moment, let it boot, and ask for its configuration."""
        t = self._timings
        event(log, "mdb.board_reset", logging.WARNING, why=why)
        self._set_problem(f"the MDB board was reset ({why})")
        self._reset_line.off()
        self._closing.wait(t.reset_hold_s)
        self._reset_line.on()
        with self._changed:
            self._resets += 1
            self._needs_config = True
            self._reader_on = None
            self._changed.notify_all()
        self._closing.wait(t.reset_boot_s)

    def _set_problem(self, problem: str | None) -> None:
        with self._changed:
            if problem == self._problem:
                return
            self._problem = problem
            self._changed.notify_all()
        if problem is not None:
            event(log, "mdb.problem", logging.ERROR, problem=problem)
        else:
            event(log, "mdb.problem_cleared")
        listener = self._listener
        tell = getattr(listener, "on_vend_problem", None) if listener is not None else None
        if tell is not None:
            try:
                tell(problem)
            except Exception:
                log.exception("vend listener failed")


def _show(line: bytes) -> str:
    # The board's lines carry no secrets; cut them short all the same.
    return line[:64].decode("ascii", "replace").rstrip("\r\n")
