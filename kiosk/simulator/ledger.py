"""The simulated Alipay's books: every trade, what it charged and what it gave back.

All state lives here under one lock; the MAPI services in `services.py` change it only while
holding `Ledger.lock`. Time-driven changes (buyer confirms, unpaid trade closes) are applied
lazily from the ledger's clock whenever the ledger is read. The clock is `time.monotonic()`
(and `time.time()` for Alipay's wall clock) plus an offset a rig can move forward with
`shift_clock`, to play a restart a day later: unpaid trades close, the Beijing-day cancel
window shuts.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

BEIJING_S = 8 * 3600  # Alipay's clock is Beijing time, UTC+8
CANCEL_GRACE_S = 15 * 60  # a cancel still works this long past the Beijing midnight


class TradeStatus(enum.StrEnum):
    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
    TRADE_SUCCESS = "TRADE_SUCCESS"
    TRADE_CLOSED = "TRADE_CLOSED"
    TRADE_FINISHED = "TRADE_FINISHED"


@dataclass
class Trade:
    partner: str
    partner_trans_id: str
    alipay_trans_id: str
    amount: Decimal
    currency: str
    buyer_code_hash: str
    status: str = TradeStatus.WAIT_BUYER_PAY
    charged: bool = False  # money was taken at some point
    reversed: bool = False  # cancelled after pay, or refunded in full
    refunded: Decimal = Decimal(0)
    refunds: dict[str, Decimal] = field(default_factory=dict)
    created_monotonic: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)
    pay_time: str | None = None  # alipay_pay_time, Beijing wall clock: a record, not a deadline
    confirm_at: float | None = None  # monotonic: when the buyer confirms on the phone
    close_at: float | None = None  # monotonic: when an unpaid trade closes
    created_wall: float | None = None  # the ledger's wall clock when created (set by add)

    @property
    def holds_money(self) -> bool:
        return self.charged and not self.reversed

    @property
    def held(self) -> Decimal:
        """The money Alipay holds for this trade now."""
        return self.amount - self.refunded if self.holds_money else Decimal(0)

    def to_json(self) -> dict[str, Any]:
        return {
            "partner": self.partner,
            "partner_trans_id": self.partner_trans_id,
            "alipay_trans_id": self.alipay_trans_id,
            "amount": str(self.amount),
            "currency": self.currency,
            "status": str(self.status),
            "charged": self.charged,
            "reversed": self.reversed,
            "refunded": str(self.refunded),
            "refunds": {key: str(value) for key, value in self.refunds.items()},
            "holds_money": self.holds_money,
            "events": list(self.events),
        }


class Ledger:
    """Thread-safe; trades keyed by (partner, partner_trans_id)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._trades: dict[tuple[str, str], Trade] = {}
        self._by_alipay_id: dict[str, Trade] = {}
        # Ids cancelled before any trade existed: a later pay with one gets TRADE_HAS_CLOSE.
        self.burnt_ids: set[tuple[str, str]] = set()
        # Payment code hash -> the (partner, partner_trans_id) that used it: codes are single-use.
        self.used_codes: dict[str, tuple[str, str]] = {}
        # Ids whose magic code behaviour was already played once (a retry then just pays).
        self.magic_played: set[tuple[str, str]] = set()
        self._counter = 0
        # How far the simulated Alipay's clocks run ahead of this machine's (shift_clock).
        self.clock_offset_s = 0.0
        # Cancels refused past the Beijing-day cancel window, as Alipay does.
        self.enforce_cancel_window = True

    # The clock ---------------------------------------------------------------------------

    def now(self) -> float:
        """The ledger's monotonic clock: `time.monotonic()` plus the shift."""
        return time.monotonic() + self.clock_offset_s

    def wall(self) -> float:
        """Alipay's wall clock in epoch seconds: `time.time()` plus the shift."""
        return time.time() + self.clock_offset_s

    def shift_clock(self, seconds: float) -> None:
        """Move the simulated Alipay's clocks forward (or back) by `seconds`; what the new time
        decides (buyers confirming, unpaid trades closing) happens at once."""
        with self.lock:
            self.clock_offset_s += seconds
            self.advance()
            self.changed()

    def past_cancel_window(self, trade: Trade) -> bool:
        """Alipay cancels only trades of the same Beijing-time day (15 minutes of grace)."""
        if not self.enforce_cancel_window or trade.created_wall is None:
            return False
        created_day = int((trade.created_wall + BEIJING_S) // 86400)
        return self.wall() + BEIJING_S - CANCEL_GRACE_S >= (created_day + 1) * 86400

    # Reading -----------------------------------------------------------------------------

    def trade(self, partner: str, partner_trans_id: str) -> Trade | None:
        with self.lock:
            self.advance()
            return self._trades.get((partner, partner_trans_id))

    def trades(self) -> list[Trade]:
        with self.lock:
            self.advance()
            return list(self._trades.values())

    def charged_total(self) -> Decimal:
        """Money currently held: paid and not refunded or cancelled."""
        with self.lock:
            self.advance()
            return sum((t.held for t in self._trades.values()), Decimal(0))

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            trades = self.trades()
            return {
                "trades": [t.to_json() for t in trades],
                "charged_total": str(self.charged_total()),
            }

    def wait_for_status(
        self, partner: str, partner_trans_id: str, status: str, timeout: float
    ) -> bool:
        """Block until the trade reaches `status` (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                real = time.monotonic()
                now = self.now()
                self.advance(now)
                trade = self._trades.get((partner, partner_trans_id))
                if trade is not None and trade.status == status:
                    return True
                if real >= deadline:
                    return False
                # Sleep until the next scheduled change, a notified change, or the deadline.
                self._changed.wait(min(deadline - real, self._next_due(now) - now))

    # Changing (callers hold `lock`) --------------------------------------------------------

    def find(self, partner: str, partner_trans_id: str) -> Trade | None:
        return self._trades.get((partner, partner_trans_id))

    def find_by_alipay_id(self, alipay_trans_id: str) -> Trade | None:
        return self._by_alipay_id.get(alipay_trans_id)

    def add(self, trade: Trade) -> None:
        if trade.created_wall is None:
            trade.created_wall = self.wall()
        self._trades[(trade.partner, trade.partner_trans_id)] = trade
        self._by_alipay_id[trade.alipay_trans_id] = trade
        self.changed()

    def next_alipay_trans_id(self) -> str:
        """28 digits like Alipay's: date, a fixed block, a counter."""
        self._counter += 1
        return time.strftime("%Y%m%d", time.gmtime(self.wall())) + "1100" + f"{self._counter:016d}"

    def changed(self) -> None:
        self._changed.notify_all()

    def advance(self, now: float | None = None) -> None:
        """Apply what time has decided: buyers who confirmed, unpaid trades that closed."""
        now = self.now() if now is None else now
        with self.lock:
            for trade in self._trades.values():
                if trade.status != TradeStatus.WAIT_BUYER_PAY:
                    continue
                confirm = trade.confirm_at
                close = trade.close_at
                if confirm is not None and confirm <= now and (close is None or confirm < close):
                    mark_paid(trade, "buyer confirmed on the phone", self.wall())
                    self.changed()
                elif close is not None and close <= now:
                    trade.status = TradeStatus.TRADE_CLOSED
                    trade.events.append("closed: unpaid for too long")
                    self.changed()

    def _next_due(self, now: float) -> float:
        due = [
            t
            for trade in self._trades.values()
            if trade.status == TradeStatus.WAIT_BUYER_PAY
            for t in (trade.confirm_at, trade.close_at)
            if t is not None
        ]
        return max(min(due), now + 0.001) if due else now + 60.0


def mark_paid(trade: Trade, why: str, wall: float | None = None) -> None:
    """`wall`: the ledger's wall clock (`Ledger.wall()`), for the pay time."""
    trade.status = TradeStatus.TRADE_SUCCESS
    trade.charged = True
    # Alipay's clock is Beijing time (UTC+8).
    moment = time.time() if wall is None else wall
    trade.pay_time = time.strftime("%Y%m%d%H%M%S", time.gmtime(moment + BEIJING_S))
    trade.events.append(f"charged {trade.amount} {trade.currency}: {why}")
