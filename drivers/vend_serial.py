"""The serial link to a vending controller (SPEC section 4) as a `VendOutput`, over pyserial.

A reader thread owns the port: it frames lines, answers `PING` and malformed lines itself,
hands `VEND`/`CANCEL` to the core's listener and hands `SUCCESS`/`FAILURE` to the vend waiting
for it. After an unplug it reopens the port with backoff. It does not decide anything about
money: the core does.

`ACK <ref>` tells the controller the kiosk has recorded the outcome, so it stops repeating its
report. A report is therefore only ACKed once the core says so (`acknowledge(ref)`, after the
journal commit); until then it is "reported" and a repeat of it gets no answer. A kiosk that
could not record it (journal full, power cut) hears the repeat after its restart.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import serial

from kiosk import vmc_protocol as vmc
from kiosk.errors import VendProtocolError
from kiosk.log import event
from kiosk.ports import VendListener, VendRequest, VendResult

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 2.0  # close() waits this long for the reader it woke
WRITE_TIMEOUT_S = 1.0  # a wedged port must not hang the payment flow
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
SETTLED_MEMORY = 256  # settled refs remembered, so a repeated report gets its ACK again
REPORTED_MEMORY = 256  # reports handed to the core, not yet acknowledged by it
UNCLAIMED_MEMORY = 32  # reports for refs nobody waits for yet (see await_report)

_REPORTED = {vmc.Success: VendResult.VENDED, vmc.Failure: VendResult.FAILED}


class _Vend:
    """One approved vend waiting for the controller's report."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: VendResult | None = None


class SerialVendOutput:
    """`VendOutput` for a vending controller (or an MDB bridge) on a serial line."""

    def __init__(
        self,
        port: str,
        baud: int,
        currency: str,
        serial_factory: Callable[..., Any] = serial.Serial,
    ) -> None:
        self._port_name = port
        self._baud = baud
        self._currency = currency
        self._serial_factory = serial_factory
        self._listener: VendListener | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        # The open port; swapped by the reader thread, used by every writer under _write_lock,
        # so lines from the core and the reader never interleave on the wire.
        self._port: Any = None
        self._write_lock = threading.Lock()
        # Vend bookkeeping: who waits for which ref, and how settled refs ended.
        self._lock = threading.Lock()
        self._waiting: dict[str, _Vend] = {}
        self._settled: OrderedDict[str, VendResult] = OrderedDict()
        self._reported: OrderedDict[str, VendResult] = OrderedDict()  # no ACK sent yet
        self._unclaimed: OrderedDict[str, VendResult] = OrderedDict()
        self._link = threading.Condition()
        self._connections = 0

    # -- VendOutput ---------------------------------------------------------------------------

    def start(self, listener: VendListener) -> None:
        """Open the port in the background and start answering the controller."""
        if self._thread is not None:
            raise RuntimeError("the vend link is already started")
        self._listener = listener
        self._thread = threading.Thread(target=self._run, name="vend-serial", daemon=True)
        self._thread.start()

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        """Send `APPROVED <ref> <amount>` and wait for `SUCCESS`/`FAILURE <ref>`.

        A ref that was already dispensed is never approved twice: its known result comes back.
        When the line cannot be written (link down) the controller never saw it: TIMED_OUT at
        once, so the core reverses the charge without waiting.
        """
        line = vmc.approved(ref, amount, self._currency)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            known = self._known(ref)
            vend = self._expect(ref) if known is None else None
        if vend is None:
            assert known is not None
            event(log, "vend.dispense_repeated", logging.WARNING, ref=ref, result=known.value)
            return known
        if not self._send(line):
            event(log, "vend.approve_not_sent", logging.WARNING, ref=ref)
            return self._give_up(ref, vend)
        event(log, "vend.approved", ref=ref, amount=str(amount), currency=self._currency)
        return self._wait(ref, vend, deadline)

    def await_report(self, ref: str, timeout_s: float) -> VendResult:
        """After a restart: wait for a report about a vend approved before it, without
        approving again. A report that came in before this call (and got `ERR unknown-ref`)
        counts; it is ACKed when the core acknowledges it."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            known = self._known(ref)
            early = self._unclaimed.pop(ref, None) if known is None else None
            if early is not None:
                self._note_reported(ref, early)
            vend = self._expect(ref) if known is None and early is None else None
        if known is not None:
            return known
        if early is not None:
            event(log, "vend.report_claimed", ref=ref, result=early.value)
            return early
        assert vend is not None
        event(log, "vend.awaiting_report", ref=ref, timeout_s=timeout_s)
        return self._wait(ref, vend, deadline)

    def acknowledge(self, ref: str) -> None:
        """The core has recorded the outcome of `ref`'s report (journal committed): `ACK <ref>`
        now, and the same ACK for any repeat of it from here on. A ref with no report waiting
        for its ACK (timed out, or acknowledged already) sends nothing."""
        with self._lock:
            reported = self._reported.pop(ref, None)
            if reported is not None:
                self._remember(ref, reported)
        if reported is not None:
            self._send(vmc.ack(ref))

    def deny(self, reason: str) -> None:
        """`DENIED <reason>`: the payment was refused (shown by the controller, if it wants)."""
        self._send(vmc.denied(reason))

    def answer_vend(self, answer: str) -> None:
        """Answer `VEND`/`CANCEL`: `OK`, `BUSY`, `OUT_OF_SERVICE <reason>`, `CANCELLED`,
        `TIMEOUT`."""
        self._send(vmc.vend_answer(answer))

    def healthy(self) -> bool:
        """True while the reader runs: the port is open or being reopened."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._closing.is_set()

    def close(self) -> None:
        """Stop the reader, release the port, and end any wait as TIMED_OUT. Safe twice."""
        self._closing.set()
        with self._write_lock:
            port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            port.cancel_read()  # wake the reader now rather than at its read timeout
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=JOIN_TIMEOUT_S)
        with self._lock:
            for ref, vend in list(self._waiting.items()):
                self._give_up_locked(ref, vend)

    def __enter__(self) -> SerialVendOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- link state, for selftest and tests ---------------------------------------------------

    def connected(self) -> bool:
        """True while the port is open."""
        with self._write_lock:
            return self._port is not None

    def wait_connected(self, timeout_s: float, times: int = 1) -> bool:
        """Wait until the port is open and has been opened at least `times` times."""
        with self._link:
            return self._link.wait_for(
                lambda: self._connections >= times and self._port is not None, timeout_s
            )

    # -- vend bookkeeping ---------------------------------------------------------------------

    def _expect(self, ref: str) -> _Vend:
        # Called with _lock held.
        if ref in self._waiting:
            raise RuntimeError(f"a vend for {ref} is already waiting for its report")
        vend = self._waiting[ref] = _Vend()
        return vend

    def _wait(self, ref: str, vend: _Vend, deadline: float) -> VendResult:
        vend.done.wait(max(0.0, deadline - time.monotonic()))
        # A report and the deadline may race: whichever takes the lock first decides.
        with self._lock:
            if vend.result is None:
                self._give_up_locked(ref, vend)
            result = vend.result
        assert result is not None
        event(log, "vend.result", ref=ref, result=result.value)
        return result

    def _give_up(self, ref: str, vend: _Vend) -> VendResult:
        with self._lock:
            self._give_up_locked(ref, vend)
        return VendResult.TIMED_OUT

    def _give_up_locked(self, ref: str, vend: _Vend) -> None:
        self._waiting.pop(ref, None)
        vend.result = VendResult.TIMED_OUT
        self._remember(ref, VendResult.TIMED_OUT)
        vend.done.set()

    def _known(self, ref: str) -> VendResult | None:
        # Called with _lock held: how `ref` ended, whether or not the core acknowledged it.
        known = self._settled.get(ref)
        return known if known is not None else self._reported.get(ref)

    def _note_reported(self, ref: str, result: VendResult) -> None:
        # Called with _lock held: handed to the core, ACK held back until it acknowledges.
        self._reported[ref] = result
        while len(self._reported) > REPORTED_MEMORY:
            self._reported.popitem(last=False)

    def _remember(self, ref: str, result: VendResult) -> None:
        self._settled[ref] = result
        while len(self._settled) > SETTLED_MEMORY:
            self._settled.popitem(last=False)

    def _report(self, ref: str, reported: VendResult) -> None:
        """`SUCCESS`/`FAILURE <ref>` from the controller. Handed to the vend waiting for it; ACKed
        when the core has recorded it (`acknowledge`), or at once for a ref settled before."""
        with self._lock:
            vend = self._waiting.pop(ref, None)
            settled = self._settled.get(ref)
            unacknowledged = self._reported.get(ref)
            if vend is not None:
                vend.result = reported
                self._note_reported(ref, reported)
                vend.done.set()
            elif settled is None and unacknowledged is None:
                self._unclaimed[ref] = reported
                while len(self._unclaimed) > UNCLAIMED_MEMORY:
                    self._unclaimed.popitem(last=False)
        if vend is not None:
            event(log, "vend.report", ref=ref, result=reported.value)
            return  # the ACK waits for the core to record the outcome
        if unacknowledged is not None:
            # The core has it but has not recorded it yet: the ACK follows when it has.
            event(log, "vend.report_unacknowledged", ref=ref, result=reported.value)
            return
        if settled is VendResult.TIMED_OUT:
            # The core has already reversed this charge; a late SUCCESS means free goods.
            event(log, "vend.report_late", logging.WARNING, ref=ref, result=reported.value)
        elif settled is not None:
            level = logging.INFO if settled is reported else logging.WARNING
            event(
                log,
                "vend.report_repeated",
                level,
                ref=ref,
                result=reported.value,
                settled=settled.value,
            )
        else:
            event(log, "vend.report_unknown_ref", logging.WARNING, ref=ref)
            self._send(vmc.err(vmc.UNKNOWN_REF))
            return
        self._send(vmc.ack(ref))

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, line: bytes) -> bool:
        with self._write_lock:
            port = self._port
            if port is None:
                event(
                    log, "vend.line_not_sent", logging.WARNING, line=_show(line), reason="link down"
                )
                return False
            try:
                port.write(line)
            except (serial.SerialException, OSError) as exc:
                event(log, "vend.line_not_sent", logging.WARNING, line=_show(line), reason=str(exc))
                return False
        return True

    def _run(self) -> None:
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
                        "vend.link_unavailable",
                        logging.WARNING,
                        port=self._port_name,
                        error=str(exc),
                    )
                    reported_outage = True
                self._closing.wait(backoff)  # never a busy loop while the cable is out
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_FIRST_S
            reported_outage = False
            with self._write_lock, self._link:
                self._port = port
                self._connections += 1
                self._link.notify_all()
                if self._closing.is_set() and hasattr(port, "cancel_read"):
                    port.cancel_read()  # close() came while the port was opening
            event(log, "vend.link_up", port=self._port_name)
            try:
                self._read_until_lost(port)
            finally:
                with self._write_lock:
                    self._port = None
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()
            if not self._closing.is_set():
                event(log, "vend.link_lost", logging.WARNING, port=self._port_name)
                self._closing.wait(BACKOFF_FIRST_S)

    def _read_until_lost(self, port: Any) -> None:
        framer = vmc.LineFramer()
        while not self._closing.is_set():
            try:
                data = port.read(port.in_waiting or 1)
            except (serial.SerialException, OSError) as exc:
                event(log, "vend.link_error", logging.WARNING, port=self._port_name, error=str(exc))
                return
            for line in framer.feed(data):
                try:
                    self._handle(line)
                except Exception:  # a bug here must not kill the reader and the link with it
                    log.exception("vend line handling failed")

    def _handle(self, line: bytes | None) -> None:
        if line is None:
            event(log, "vend.line_malformed", logging.WARNING, reason=vmc.TOO_LONG)
            self._send(vmc.err(vmc.TOO_LONG))
            return
        try:
            message = vmc.parse_vmc_line(line, self._currency)
        except VendProtocolError as exc:
            if exc.reason == vmc.EMPTY:
                return  # a blank line carries nothing to answer
            event(log, "vend.line_malformed", logging.WARNING, reason=exc.reason, line=_show(line))
            self._send(vmc.err(exc.reason))
            return
        match message:
            case vmc.Ping():
                self._send(vmc.pong())
            case vmc.Vend(item=item, amount=amount):
                event(log, "vend.requested", item=item, amount=str(amount))
                self._tell_listener(lambda lst: lst.on_vend_request(VendRequest(item, amount)))
            case vmc.Cancel():
                event(log, "vend.cancel_requested")
                self._tell_listener(lambda lst: lst.on_vend_cancel())
            case vmc.Success(ref=ref) | vmc.Failure(ref=ref):
                self._report(ref, _REPORTED[type(message)])

    def _tell_listener(self, call: Callable[[VendListener], None]) -> None:
        if self._listener is None:
            return
        try:
            call(self._listener)
        except Exception:  # a bug in the core must not take the link down
            log.exception("vend listener failed")


def _show(line: bytes) -> str:
    # The controller's lines carry no secrets; cut them short all the same.
    return line[:48].decode("ascii", "replace").rstrip("\r\n")
