"""The payment flow: one scan's money, from the journal to Alipay to the vending side and back.

Read it top to bottom as a state machine (states are `TxnState`, SPEC section 5):

    new scan ─ journal ─► PAYING ──SUCCESS (signed, echoes this pay) ──────► VENDING ─► VENDED
                            │ FAILED (signed, echoes) ────────────────────► DECLINED
                            │   … naming an Alipay trade ─► CANCELLING (refusal shown at once)
                            │ refusal that proves nothing (unsigned) ─────► QUERYING (shown at once)
                            │ never sent (no connection) ─────────────────► DECLINED (OFFLINE)
                            └ UNKNOW, SYSTEM_ERROR, timeout, reset, ─► QUERYING
                              bad answer                                 │ TRADE_SUCCESS ► VENDING
                                                                         │ TRADE_CLOSED ─► DECLINED
                                                                         └ deadline ────► CANCELLING
    VENDING ── vend failed / timed out ─► CANCELLING ──SUCCESS──► CANCELLED
    abandoned (the machine dropped the request before approval): never VENDING; paid ─►
      CANCELLING, QUERYING ─► CANCELLING at once
                                            │ retry_flag=Y / unknown: again later
                                            └ retry_flag=N: query ─ paid ─► REFUNDING ──► REFUNDED
                                                                  └ closed ► CANCELLED  └ refused ─►
                                                                                      ATTENTION

Every request that can move money is journaled (fsync) before it is sent. The buyer's payment
code never reaches the journal (SPEC rule 6): the pay is sent once, from memory, and a pay
whose answer was lost is resolved by query and cancel, never sent again. Only a signed answer
that names this very request moves a transaction; anything less is unknown. Reversal always
tries cancel first and follows Alipay's answer, so the local clock never picks the path alone.
`sell()` runs a new scan in the foreground (its `abandoned` event, set when the controller
drops its request mid-payment on MDB, stops it from vending late); `settle()` drives a
journaled transaction one step on, for the background worker (which schedules the retries)
and after a restart. The flow does no I/O of its own beyond the client, the journal and the
vend output it is given.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from kiosk.alipay.client import (
    PAID_STATUSES,
    AlipayClient,
    Outcome,
    PayOrder,
    PayResult,
    QueryResult,
    TradeStatus,
)
from kiosk.error_codes import Reaction, cancel_before_final, reaction_for
from kiosk.errors import GatewayUnreachable
from kiosk.journal import FINAL_STATES, Journal, Transaction, TxnState
from kiosk.log import event
from kiosk.payment_code import PaymentCode
from kiosk.ports import VendOutput, VendResult, acknowledge, reports_name_the_vend

log = logging.getLogger("kiosk.payment")

ABSENT = "TRADE_NOT_EXIST"  # a query's answer that no such trade exists (yet)
BEIJING = timezone(timedelta(hours=8), "Beijing")
CANCEL_GRACE = timedelta(minutes=15)
ABANDON_POLL_S = 0.1  # while waiting on an abandon, how often a stop is looked for


class SaleResult(enum.StrEnum):
    """What the customer at the machine gets from one scan."""

    VENDED = "vended"  # paid and dispensed
    DECLINED = "declined"  # refused; the buyer was not charged (or it is being reversed)
    REVERSED = "reversed"  # paid, not dispensed, money returned (or being returned)
    UNRESOLVED = "unresolved"  # no answer in time; the worker cancels it in the background
    OUT_OF_SERVICE = "out_of_service"  # a merchant-configuration code: stop taking scans
    STOPPED = "stopped"  # the kiosk is stopping; parked at a journaled point


@dataclass(frozen=True)
class Sale:
    ref: str
    result: SaleResult
    reason: str  # for `DENIED <reason>`: an Alipay code or a kiosk reason
    state: TxnState


@dataclass(frozen=True)
class FlowSettings:
    terminal_id: str
    currency: str
    trans_name: str
    extend_info: Mapping[str, str]
    query_interval_s: float = 3.0
    query_deadline_s: float = 60.0
    vend_timeout_s: float = 30.0
    cancel_tries_in_foreground: int = 3
    retry_base_s: float = 2.0  # the journal worker's backoff between background retries
    retry_max_s: float = 300.0
    keep_days: int = 90  # the journal worker folds final transactions older than this


class GatewayWatch(Protocol):
    """Who the flow tells about the gateway, the merchant's set-up and the sale's progress."""

    def reachable(self) -> None: ...

    def unreachable(self) -> None: ...

    def merchant_problem(self, code: str) -> None: ...

    def vending(self, ref: str) -> None: ...


class _NullWatch:
    def reachable(self) -> None:
        pass

    def unreachable(self) -> None:
        pass

    def merchant_problem(self, code: str) -> None:
        pass

    def vending(self, ref: str) -> None:
        pass


@dataclass
class RefsInHand:
    """Refs being driven right now (a sale in the foreground, a settle in the worker); whoever
    holds a ref is the only one who moves it. One set for the whole process."""

    refs: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Refs already alarmed for belonging to another merchant (one alarm each per process).
    other_merchant: set[str] = field(default_factory=set)


def new_ref(terminal_id: str, now: datetime | None = None) -> str:
    """A fresh partner_trans_id: unique per scan, ≤64 characters, readable in a log."""
    now = now or datetime.now(UTC)
    return f"{terminal_id}-{now:%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def trans_create_time(now: datetime) -> str:
    """The pay's `trans_create_time`: Beijing time (UTC+8), as Alipay's MAPI stamps are."""
    return now.astimezone(BEIJING).strftime("%Y%m%d%H%M%S")


def cancel_window_open(stamp: str, now: datetime) -> bool:
    """Alipay cancels only trades of the same Beijing-time day, with 15 minutes of grace.
    `stamp` is the pay's `trans_create_time` (Beijing time). A hint only: the flow always
    tries cancel first and follows Alipay's answer."""
    created = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=BEIJING)
    closes = datetime.combine(created.date() + timedelta(days=1), time_of_day(0), BEIJING)
    return now < closes + CANCEL_GRACE


def refunds_paused(now: datetime) -> bool:
    """Alipay executes no synchronous refunds 00:00-01:30 Beijing time: a refusal then is
    not final, the refund is tried again later."""
    return now.astimezone(BEIJING).time() < time_of_day(1, 30)


class _Result(Protocol):
    @property
    def outcome(self) -> Outcome: ...

    @property
    def detail(self) -> str: ...


R = TypeVar("R", bound=_Result)


class PaymentFlow:
    def __init__(
        self,
        client: AlipayClient,
        journal: Journal,
        vend: VendOutput,
        settings: FlowSettings,
        *,
        watch: GatewayWatch | None = None,
        stopping: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        in_hand: RefsInHand | None = None,
    ) -> None:
        """`in_hand` shares the set of refs in hand with every other flow on the same journal
        (the foreground and the journal worker), so no two drive one transaction."""
        self.client = client
        self.journal = journal
        self.vend = vend
        self.settings = settings
        self.watch = watch or _NullWatch()
        self.stopping = stopping or threading.Event()
        self._clock = clock
        self._wall = wall_clock
        self.in_hand = in_hand or RefsInHand()

    # -- the foreground: one new scan ------------------------------------------------------

    def sell(
        self,
        code: PaymentCode,
        amount: Decimal,
        item: str,
        abandoned: threading.Event | None = None,
    ) -> Sale:
        """Charge a new scan and, once paid, vend. Blocks until the customer's answer is known.

        `abandoned` is set when the controller dropped its request before approval (MDB: the
        customer cancelled, or the machine gave up): from then on nothing is vended; a
        confirmed charge is reversed (cancel first), an open one is cancelled, and the sale
        ends with reason `CANCELLED`."""
        now = self._wall()
        ref = new_ref(self.settings.terminal_id, now)
        # Held before the row exists, so the worker never picks up a sale still in hand.
        partner, gateway = self._merchant()
        with self._holding(ref):
            stamp = trans_create_time(now)
            order = PayOrder(
                partner_trans_id=ref,
                amount=amount,
                currency=self.settings.currency,
                buyer_identity_code=code.digits,
                trans_name=self.settings.trans_name,
                trans_create_time=stamp,
                extend_info=self.settings.extend_info,
            )
            # The row and its pay request in one commit: journaled before it is sent. The
            # code itself stays in memory (rule 6); the journal keeps its last 4 digits. The
            # pay is signed on the client's own thread, started as the commit's fsync begins
            # (the sign need not wait for the disk); sending waits for both.
            txn = self.journal.open_transaction(
                ref=ref,
                amount=amount,
                currency=self.settings.currency,
                item=item,
                code_last4=code.last4,
                trans_create_time=stamp,
                first_request=("pay", _public_pay(ref, amount, self.settings, stamp)),
                partner=partner,
                gateway=gateway,
                code_digest=self.journal.code_digest(code.digits),
                meanwhile=lambda: self.client.sign_ahead(order),
            )
            event(log, "payment.start", ref=ref, amount=str(amount), item=item, code=code.masked)
            sale = self._sell(txn, order, abandoned or threading.Event())
        event(
            log,
            "payment.result",
            ref=sale.ref,
            outcome=sale.result.value,
            reason=sale.reason,
            state=sale.state.value,
        )
        return sale

    def _sell(self, txn: Transaction, order: PayOrder, abandoned: threading.Event) -> Sale:
        pay_started = self._clock()
        txn, refusal = self._pay(txn, order, abandoned)
        if refusal is not None:
            # The customer hears the refusal now. A trade that may still be open behind it
            # (unproven refusal, or one naming a trade) is settled by the worker: query, cancel.
            oos = reaction_for(refusal).reaction is Reaction.OUT_OF_SERVICE
            return self._sale(
                txn, SaleResult.OUT_OF_SERVICE if oos else SaleResult.DECLINED, refusal
            )
        if txn.state is TxnState.QUERYING:
            deadline = pay_started + self.settings.query_deadline_s
            txn = self._query_until_final(txn, deadline, abandoned)
        if txn.state is TxnState.DECLINED:
            oos = reaction_for(txn.error_code).reaction is Reaction.OUT_OF_SERVICE
            return self._sale(txn, SaleResult.OUT_OF_SERVICE if oos else SaleResult.DECLINED)
        if txn.state is TxnState.QUERYING and self.stopping.is_set():
            # Parked at a journaled point; the restart queries, then cancels.
            return self._sale(txn, SaleResult.STOPPED, "STOPPING")
        if abandoned.is_set():
            # The request is gone (checked here, before the vend): nothing is approved late.
            return self._abandon(txn)
        if txn.state is TxnState.VENDING:
            txn = self._vend(txn)
            if txn.state is TxnState.VENDED:
                return self._sale(txn, SaleResult.VENDED, "")
            txn = self._reverse_in_foreground(txn)
            return self._sale(txn, SaleResult.REVERSED, "VEND_FAILED")
        # No answer before the deadline: cancel (closes an unpaid trade, refunds a paid one).
        txn = self._reverse_in_foreground(txn)
        if txn.state is TxnState.CANCELLED:
            return self._sale(txn, SaleResult.DECLINED, "TIMEOUT")
        return self._sale(txn, SaleResult.UNRESOLVED, "TIMEOUT")

    def _abandon(self, txn: Transaction) -> Sale:
        """The controller dropped the request before approval. A charge Alipay confirmed
        (VENDING not yet vended, or turned to CANCELLING by `_paid`) is reversed like a failed
        vend; an outcome still unknown (QUERYING) is cancelled now rather than queried on."""
        charged = txn.state in (TxnState.VENDING, TxnState.CANCELLING)
        if txn.state not in (TxnState.CANCELLING, TxnState.REFUNDING):
            txn = self._start_reversal(txn, note="the customer cancelled before approval")
        txn = self._reverse_in_foreground(txn)
        if charged:
            return self._sale(txn, SaleResult.REVERSED, "CANCELLED")
        if txn.state is TxnState.CANCELLED:
            return self._sale(txn, SaleResult.DECLINED, "CANCELLED")
        return self._sale(txn, SaleResult.UNRESOLVED, "CANCELLED")

    def _sale(self, txn: Transaction, result: SaleResult, reason: str | None = None) -> Sale:
        return Sale(
            txn.ref, result, reason if reason is not None else (txn.error_code or ""), txn.state
        )

    # -- PAYING ----------------------------------------------------------------------------

    def _send(
        self,
        txn: Transaction,
        kind: str,
        params: dict[str, str],
        request: Callable[[], R],
        *,
        journaled: bool = False,
        record: bool = True,
        **changes: Any,
    ) -> tuple[Transaction, R | None]:
        """Journal a money-moving request durably (unless the caller already did), then send
        it. None: no gateway took the connection, so it never left the kiosk. With
        `record=False` the caller notes the outcome in its own next commit."""
        if not journaled:
            txn = self.journal.before_request(txn, kind, params, **changes)
        try:
            result = request()
        except GatewayUnreachable:
            self.watch.unreachable()
            txn = self.journal.after_request(txn, "not_sent", "no gateway reachable", sent=False)
            return txn, None
        self.watch.reachable()
        if record:
            self.journal.after_request(txn, result.outcome.value, result.detail)
        return txn, result

    def _pay(
        self, txn: Transaction, order: PayOrder, abandoned: threading.Event
    ) -> tuple[Transaction, str | None]:
        """PAYING (pay journaled with the transaction) → VENDING | DECLINED | CANCELLING |
        QUERYING. Also returns the code of a refusal the customer is shown now while the
        transaction stays open (an unproven refusal, or a refused trade still to be closed)."""
        txn, result = self._send(
            txn, "pay", {}, lambda: self.client.pay(order), journaled=True, record=False
        )
        if result is None:
            # No gateway took the connection: the request never left, a known refusal.
            return self.journal.update(txn, state=TxnState.DECLINED, error_code="OFFLINE"), None
        outcome = (result.outcome.value, result.detail)
        if result.outcome is Outcome.SUCCESS:
            return self._paid(txn, outcome, abandoned, alipay_trans_id=result.alipay_trans_id), None
        refusal = self._refusal(txn, result)
        if refusal is not None and result.outcome is Outcome.FAILED:
            # Signed and naming this pay: a proven refusal.
            if cancel_before_final(result.alipay_trans_id):
                # A refusal that names a trade: it may still be open at Alipay. Closed first,
                # final after.
                return self.journal.update(
                    txn,
                    state=TxnState.CANCELLING,
                    error_code=refusal,
                    alipay_trans_id=result.alipay_trans_id,
                    request_outcome=outcome,
                    note="refused, trade named: closing it",
                ), refusal
            return self.journal.update(
                txn, state=TxnState.DECLINED, error_code=refusal, request_outcome=outcome
            ), None
        # UNKNOW, SYSTEM_ERROR, a timeout, a reset, a bad or unproven answer: never guessed.
        txn = self.journal.update(
            txn,
            request_outcome=outcome,
            state=TxnState.QUERYING,
            error_code=result.error,
            alipay_trans_id=result.alipay_trans_id or txn.alipay_trans_id,
        )
        return txn, refusal

    def _refusal(self, txn: Transaction, result: PayResult) -> str | None:
        """The code of a pay refusal the customer should see now, or None. A signed FAILED or
        an unproven refusal (REJECTED) with a buyer's or merchant's code; the merchant's also
        puts the kiosk out of service. Anything else (unknown codes, SYSTEM_ERROR) is asked."""
        if result.outcome not in (Outcome.FAILED, Outcome.REJECTED):
            return None
        if not result.error:
            return None
        reaction = reaction_for(result.error)
        if reaction.alarm:
            event(
                log, "alarm", level=logging.ERROR, ref=txn.ref, code=result.error, why=reaction.why
            )
        if reaction.reaction is Reaction.OUT_OF_SERVICE:
            self.watch.merchant_problem(result.error)
            return result.error
        if reaction.reaction is Reaction.DECLINE:
            return result.error
        return None

    # -- QUERYING --------------------------------------------------------------------------

    def _query_until_final(
        self, txn: Transaction, deadline: float, abandoned: threading.Event
    ) -> Transaction:
        """Query every `query_interval_s` until paid, closed, or the deadline (→ CANCELLING).
        Returns the transaction still QUERYING if the kiosk is stopping or the sale was
        abandoned (the caller cancels it)."""
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return txn
            if self._pause(min(self.settings.query_interval_s, remaining), abandoned):
                return txn
            txn, status = self._query(txn)
            if status in PAID_STATUSES:
                return self._paid(txn, None, abandoned)
            if status is TradeStatus.TRADE_CLOSED:
                return self.journal.update(
                    txn, state=TxnState.DECLINED, error_code=txn.error_code or "TRADE_CLOSED"
                )

    def _pause(self, seconds: float, abandoned: threading.Event) -> bool:
        """Wait `seconds`; True at once when the kiosk is stopping or the sale is abandoned.
        The abandon wakes it at once; a stop within ABANDON_POLL_S."""
        deadline = self._clock() + seconds
        while not self.stopping.is_set():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            if abandoned.wait(min(remaining, ABANDON_POLL_S)):
                return True
        return True

    def _query(self, txn: Transaction) -> tuple[Transaction, TradeStatus | str | None]:
        """One query: the trade's status, `ABSENT`, or None when nothing certain came back.
        Only a signed answer naming this trade, amount and currency counts (the client
        judges that). Not money-moving, so it is counted (once it left) but not journaled as
        a request."""
        try:
            result: QueryResult = self.client.query(
                txn.ref, txn.alipay_trans_id, amount=txn.amount, currency=txn.currency
            )
        except GatewayUnreachable:
            self.watch.unreachable()
            return txn, None
        self.watch.reachable()
        # One commit: the count, and Alipay's trade id when this answer is the first to give it.
        new_id = result.outcome is Outcome.SUCCESS and result.alipay_trans_id
        txn = self.journal.update(
            txn,
            attempts=txn.attempts + 1,
            alipay_trans_id=(result.alipay_trans_id if new_id else txn.alipay_trans_id),
        )
        event(
            log,
            "payment.query",
            ref=txn.ref,
            outcome=result.outcome.value,
            status=result.trade_status,
            error=result.error,
            level=logging.DEBUG,
        )
        if result.outcome is Outcome.SUCCESS:
            return txn, result.trade_status
        if result.outcome is Outcome.FAILED and result.error == ABSENT:
            return txn, ABSENT  # the pay may not have arrived yet: not proof of anything alone
        return txn, None

    # -- VENDING ---------------------------------------------------------------------------

    def _paid(
        self,
        txn: Transaction,
        outcome: tuple[str, str] | None,
        abandoned: threading.Event | None = None,
        **changes: Any,
    ) -> Transaction:
        """Alipay confirmed the charge: straight to VENDING, in one commit, before APPROVED
        goes out (a crash after it is resolved by the controller's report, or reversed).
        A sale already abandoned never becomes VENDING (a restart would wait for a report that
        cannot be this sale's): CANCELLING, in the same one commit."""
        if abandoned is not None and abandoned.is_set():
            return self.journal.update(
                txn,
                state=TxnState.CANCELLING,
                request_outcome=outcome,
                note="paid after the customer cancelled",
                **changes,
            )
        return self.journal.update(txn, state=TxnState.VENDING, request_outcome=outcome, **changes)

    def _vend(self, txn: Transaction) -> Transaction:
        """VENDING → VENDED, or → CANCELLING when the vend failed. The controller's report is
        acknowledged only once its outcome is journaled: if that commit fails, it repeats the
        report, and the restart takes it (rule 1)."""
        self.watch.vending(txn.ref)
        result = self.vend.dispense(txn.ref, txn.amount, self.settings.vend_timeout_s)
        event(log, "vend.result", ref=txn.ref, result=result.value)
        if result is VendResult.VENDED:
            txn = self.journal.update(txn, state=TxnState.VENDED)
        else:
            txn = self._start_reversal(txn, note=f"vend {result.value}")
        acknowledge(self.vend, txn.ref)
        return txn

    def _start_reversal(self, txn: Transaction, note: str) -> Transaction:
        """Every reversal starts with cancel: it closes an unpaid trade, reverses a paid one
        on its Beijing day, and succeeds for a trade never created. Its answer decides the
        rest, so a wrong local clock can not send a refund for money never taken."""
        return self.journal.update(txn, state=TxnState.CANCELLING, note=note)

    # -- CANCELLING and REFUNDING ----------------------------------------------------------

    def _reverse_in_foreground(self, txn: Transaction) -> Transaction:
        """A few quick tries while the customer waits; the worker carries on after that."""
        if txn.state not in (TxnState.CANCELLING, TxnState.REFUNDING):
            txn = self._start_reversal(txn, note=txn.note or "no answer before the deadline")
        for attempt in range(self.settings.cancel_tries_in_foreground):
            if attempt and self.stopping.wait(self.settings.query_interval_s):
                break
            txn = self._reverse_once(txn)
            if txn.state in FINAL_STATES or txn.state is TxnState.ATTENTION:
                break
        return txn

    def _reverse_once(self, txn: Transaction) -> Transaction:
        if txn.state is TxnState.CANCELLING:
            return self._cancel(txn)
        return self._refund(txn)

    def _cancel(self, txn: Transaction) -> Transaction:
        # `timestamp` is the moment of this send, fresh on every retry; idempotency rests on
        # out_trade_no. The journaled params hold the value sent.
        stamp = int(self._wall().timestamp() * 1000)
        params = {
            "out_trade_no": txn.ref,
            "timestamp": str(stamp),
            "trade_no": txn.alipay_trans_id or "",
        }
        alipay_trans_id = txn.alipay_trans_id
        txn, result = self._send(
            txn, "cancel", params, lambda: self.client.cancel(txn.ref, stamp, alipay_trans_id)
        )
        if result is None:
            return txn
        event(
            log,
            "payment.cancel",
            ref=txn.ref,
            outcome=result.outcome.value,
            retry_flag=result.retry_flag,
            error=result.error,
        )
        if result.outcome is Outcome.SUCCESS:
            return self.journal.update(txn, state=TxnState.CANCELLED)
        if result.outcome is Outcome.FAILED:
            never = result.retry_flag is False or (
                # No retry_flag at all: past the trade's Beijing day (the hint) it will not
                # start working; within it, ask again.
                result.retry_flag is None
                and not cancel_window_open(txn.trans_create_time, self._wall())
            )
            if never:
                return self._after_cancel_refused(txn, result.error or "cancel refused")
        return txn  # retry_flag=Y, unknown or unproven: the same cancel again, later

    def _after_cancel_refused(self, txn: Transaction, why: str) -> Transaction:
        """Cancel will never work: refund only what a signed query shows as paid."""
        txn, status = self._query(txn)
        if status in PAID_STATUSES:
            return self.journal.update(
                txn, state=TxnState.REFUNDING, refund_id=txn.refund_id or f"{txn.ref}-R", note=why
            )
        if status is TradeStatus.TRADE_CLOSED:
            return self.journal.update(txn, state=TxnState.CANCELLED, note=f"closed ({why})")
        if status == ABSENT and txn.alipay_trans_id is None:
            # No trade, and no answer ever named one: nothing was taken, nothing to return.
            return self.journal.update(txn, state=TxnState.CANCELLED, note="trade never created")
        return txn  # waiting for the buyer, unknown, or a contradiction: ask again later

    def _refund(self, txn: Transaction) -> Transaction:
        refund_id = txn.refund_id or f"{txn.ref}-R"
        params = {
            "partner_trans_id": txn.ref,
            "partner_refund_id": refund_id,
            "refund_amount": str(txn.amount),
            "currency": txn.currency,
        }
        ref, amount, currency = txn.ref, txn.amount, txn.currency
        txn, result = self._send(
            txn,
            "refund",
            params,
            lambda: self.client.refund(ref, refund_id, amount, currency, reason="vend failed"),
            refund_id=refund_id,
        )
        if result is None:
            return txn
        event(log, "payment.refund", ref=txn.ref, outcome=result.outcome.value, error=result.error)
        if result.outcome is Outcome.SUCCESS:
            return self.journal.update(txn, state=TxnState.REFUNDED)
        if result.outcome is Outcome.FAILED:  # signed and naming this refund: a real refusal
            txn, status = self._query(txn)
            if status is TradeStatus.TRADE_CLOSED:  # an earlier refund went through
                return self.journal.update(txn, state=TxnState.REFUNDED)
            if status in PAID_STATUSES and not refunds_paused(self._wall()):
                event(
                    log,
                    "alarm",
                    level=logging.ERROR,
                    ref=txn.ref,
                    code=result.error,
                    why="refund refused; a person must return the money",
                )
                return self.journal.update(
                    txn,
                    state=TxnState.ATTENTION,
                    error_code=result.error,
                    note="refund refused: needs a person",
                )
        return txn  # unknown, unproven, or Alipay's night pause: the same refund again, later

    # -- the background: resuming and retrying ---------------------------------------------

    @contextlib.contextmanager
    def _holding(self, ref: str) -> Iterator[bool]:
        """Take a ref in hand for the duration; yields False if someone already holds it."""
        with self.in_hand.lock:
            taken = ref not in self.in_hand.refs
            self.in_hand.refs.add(ref)
        try:
            yield taken
        finally:
            if taken:
                with self.in_hand.lock:
                    self.in_hand.refs.discard(ref)

    def owns(self, ref: str) -> bool:
        with self.in_hand.lock:
            return ref in self.in_hand.refs

    def settle(self, txn: Transaction) -> Transaction:
        """Drive a journaled, unfinished transaction one step on and return it; the journal
        worker decides when to try again. A transaction whose pay was in flight when the
        kiosk stopped, or whose vend was never confirmed, is reversed: the customer has long
        gone."""
        if txn.state in FINAL_STATES or txn.state is TxnState.ATTENTION:
            return txn
        with self._holding(txn.ref) as held:
            if not held:
                return txn  # the foreground (or another worker) has it in hand
            # The caller's copy may predate the foreground's last write: work from the journal.
            fresh = self.journal.get(txn.ref)
            if fresh is None or fresh.final or fresh.state is TxnState.ATTENTION:
                return fresh or txn
            if not self._same_merchant(fresh):
                return fresh  # left open, untouched, until its own merchant is configured
            txn = self._settle(fresh)
        if txn.state in FINAL_STATES or txn.state is TxnState.ATTENTION:
            event(log, "payment.settled", ref=txn.ref, state=txn.state.value)
        return txn

    def _merchant(self) -> tuple[str, str]:
        """(partner, primary gateway URL) of this flow's client."""
        return self.client.settings.partner, self.client.settings.gateway

    def _same_merchant(self, txn: Transaction) -> bool:
        """A transaction is settled only with the partner and gateway it was paid through
        (None, from an older journal: as configured). Under another merchant a query would
        find nothing and a cancel "succeed" for a trade it never had, while the first
        merchant keeps the money: nothing is sent, and one alarm per ref is raised."""
        partner, gateway = self._merchant()
        if txn.partner in (None, partner) and txn.gateway in (None, gateway):
            return True
        with self.in_hand.lock:
            first = txn.ref not in self.in_hand.other_merchant
            self.in_hand.other_merchant.add(txn.ref)
        if first:
            event(
                log,
                "alarm",
                level=logging.ERROR,
                kind="other_merchant",
                ref=txn.ref,
                partner=txn.partner,
                gateway=txn.gateway,
                state=txn.state.value,
                why="paid to another partner or gateway than configured; left open until "
                "that configuration is back",
            )
        return False

    def _settle(self, txn: Transaction) -> Transaction:
        match txn.state:
            case TxnState.PAYING | TxnState.QUERYING:
                txn, status = self._query(txn)
                if status is TradeStatus.TRADE_CLOSED:
                    return self.journal.update(txn, state=TxnState.CANCELLED, note="closed unpaid")
                if status in PAID_STATUSES:
                    return self._start_reversal(txn, note="paid, but the sale was interrupted")
                return self._start_reversal(txn, note="outcome unknown after a restart")
            case TxnState.PAID:
                return self._start_reversal(txn, note="paid, vend never started")
            case TxnState.VENDING:
                if not reports_name_the_vend(self.vend) and any(
                    t.state is TxnState.VENDING and t.ref != txn.ref
                    for t in self.journal.unfinished()
                ):
                    # Two vends unconfirmed and reports that name neither: a report cannot
                    # say whose product came out. Reversed, never credited to the wrong one.
                    txn = self._start_reversal(txn, note="vend unconfirmed; another one too")
                    acknowledge(self.vend, txn.ref)
                    return txn
                result = self.vend.await_report(txn.ref, self.settings.vend_timeout_s)
                event(log, "vend.result", ref=txn.ref, result=result.value, after="restart")
                if result is VendResult.VENDED:
                    txn = self.journal.update(txn, state=TxnState.VENDED)
                else:
                    txn = self._start_reversal(
                        txn, note=f"vend unconfirmed after restart ({result})"
                    )
                acknowledge(self.vend, txn.ref)  # journaled: the controller may stop repeating
                return txn
            case TxnState.CANCELLING | TxnState.REFUNDING:
                return self._reverse_once(txn)
        return txn


def _public_pay(
    ref: str, amount: Decimal, settings: FlowSettings, trans_create_time: str
) -> dict[str, str]:
    """The pay request as journaled next to the transaction: everything but the buyer's code,
    which never reaches the disk (the pay is never sent again; a lost answer is queried)."""
    return {
        "partner_trans_id": ref,
        "trans_amount": str(amount),
        "currency": settings.currency,
        "trans_create_time": trans_create_time,
        "trans_name": settings.trans_name,
    }
