"""`kiosk report`: sales by day, item and outcome, and a reconciliation of what Alipay holds
against what was vended, per day — read from the journal's transactions and from the daily
totals that old ones were folded into, in one snapshot.

Days are UTC days of when a transaction was made, as the journal stamps it. An outcome is the
transaction's state: final (`vended`, `declined`, `cancelled`, `refunded`, `resolved`) or where
it stands now (`attention`, `cancelling`, ...). Only `kiosk report` loads this module.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from kiosk.journal import JOURNAL_FILE, DailyTotal, Journal, Transaction, TxnState, UnreadableRow
from kiosk.money import format_amount

FORMATS = ("table", "csv", "json")

# What each outcome says of the money at Alipay. A signed answer showed the charge, and nothing
# has given it back: Alipay holds it. (A `paid` row comes only from another firmware's journal.)
HOLDS = frozenset(
    {TxnState.VENDED, TxnState.PAID, TxnState.VENDING, TxnState.REFUNDING, TxnState.ATTENTION}
)
# Not known yet whether Alipay took it; the journal worker is finding out (query, cancel).
UNSETTLED = frozenset({TxnState.PAYING, TxnState.QUERYING, TxnState.CANCELLING})
# Settled by a person outside the kiosk: the kiosk cannot say where that money is.
BY_HAND = frozenset({TxnState.RESOLVED})
# declined, cancelled, refunded: Alipay holds nothing of them.


@dataclass(frozen=True)
class SalesLine:
    """The transactions of one day, item, outcome and currency."""

    day: str
    item: str
    outcome: str
    currency: str
    count: int
    amount: Decimal

    def export(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "item": self.item,
            "outcome": self.outcome,
            "currency": self.currency,
            "count": self.count,
            "amount": format_amount(self.amount, self.currency),
        }


@dataclass(frozen=True)
class DayBalance:
    """One day and currency: what Alipay holds (paid, not given back) against what was
    vended. They differ while a charge waits for its vend or its reversal, or needs a person."""

    day: str
    currency: str
    alipay_holds: Decimal
    vended: Decimal
    unsettled: Decimal  # outcome not known yet
    unsettled_count: int
    resolved: Decimal  # settled by a person outside the kiosk
    resolved_count: int

    @property
    def status(self) -> str:
        """`differs`: money held without goods (or goods without money); `open`: equal so
        far, with outcomes still unknown; `ok`."""
        if self.alipay_holds != self.vended:
            return "differs"
        return "open" if self.unsettled_count else "ok"

    def export(self) -> dict[str, Any]:
        def money(amount: Decimal) -> str:
            return format_amount(amount, self.currency)

        return {
            "day": self.day,
            "currency": self.currency,
            "alipay_holds": money(self.alipay_holds),
            "vended": money(self.vended),
            "difference": money(self.alipay_holds - self.vended),
            "unsettled": money(self.unsettled),
            "unsettled_count": self.unsettled_count,
            "resolved": money(self.resolved),
            "resolved_count": self.resolved_count,
            "status": self.status,
        }


def sales_lines(rows: Iterable[Transaction], totals: Iterable[DailyTotal]) -> list[SalesLine]:
    """Live rows and folded totals, added up by day, item, outcome and currency."""
    sums: dict[tuple[str, str, str, str], tuple[int, Decimal]] = {}

    def add(key: tuple[str, str, str, str], count: int, amount: Decimal) -> None:
        n, total = sums.get(key, (0, Decimal(0)))
        sums[key] = (n + count, total + amount)

    for txn in rows:
        add((txn.created_at[:10], txn.item, txn.state.value, txn.currency), 1, txn.amount)
    for total in totals:
        add((total.day, total.item, total.outcome, total.currency), total.count, total.amount)
    return [SalesLine(*key, count, amount) for key, (count, amount) in sorted(sums.items())]


@dataclass
class _Day:
    holds: Decimal = Decimal(0)
    vended: Decimal = Decimal(0)
    unsettled: Decimal = Decimal(0)
    unsettled_count: int = 0
    resolved: Decimal = Decimal(0)
    resolved_count: int = 0


def reconcile(lines: Iterable[SalesLine]) -> list[DayBalance]:
    """Per day and currency, what Alipay holds against what was vended."""
    days: dict[tuple[str, str], _Day] = {}
    for line in lines:
        day = days.setdefault((line.day, line.currency), _Day())
        try:
            state: TxnState | None = TxnState(line.outcome)
        except ValueError:
            state = None  # a later firmware's outcome: counted in the sales view only
        if state in HOLDS:
            day.holds += line.amount
        if state is TxnState.VENDED:
            day.vended += line.amount
        if state in UNSETTLED:
            day.unsettled += line.amount
            day.unsettled_count += line.count
        if state in BY_HAND:
            day.resolved += line.amount
            day.resolved_count += line.count
    return [
        DayBalance(
            day=key[0],
            currency=key[1],
            alipay_holds=d.holds,
            vended=d.vended,
            unsettled=d.unsettled,
            unsettled_count=d.unsettled_count,
            resolved=d.resolved,
            resolved_count=d.resolved_count,
        )
        for key, d in sorted(days.items())
    ]


def read(
    state_dir: Path, since: date | None, until: date | None
) -> tuple[list[SalesLine], list[UnreadableRow]]:
    """The sales lines of the journal in `state_dir` (none before its first run)."""
    if not (state_dir / JOURNAL_FILE).exists():
        return [], []
    unreadable: list[UnreadableRow] = []
    with Journal(state_dir, read_only=True) as journal:
        rows, totals = journal.sales(since, until, unreadable)
    return sales_lines(rows, totals), unreadable


def render(records: list[dict[str, Any]], columns: list[str], fmt: str) -> str:
    """Rows of the same keys as a table, CSV or a JSON array."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in records)
        return out.getvalue()
    table = [columns] + [[str(r[c]) for c in columns] for r in records]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    words = ("day", "item", "outcome", "currency", "status")
    numeric = {i for i, c in enumerate(columns) if c not in words}
    lines = []
    for row in table:
        cells = [
            cell.rjust(w) if i in numeric and row is not table[0] else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


SALES_COLUMNS = ["day", "item", "outcome", "currency", "count", "amount"]
BALANCE_COLUMNS = [
    "day",
    "currency",
    "alipay_holds",
    "vended",
    "difference",
    "unsettled",
    "unsettled_count",
    "resolved",
    "resolved_count",
    "status",
]


def run_report(
    state_dir: Path,
    since: date | None,
    until: date | None,
    fmt: str,
    balance: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Write the sales view (or with `balance`, the reconciliation) to `out`; 0. A row the
    journal cannot read is left out and named on `err`, whatever the format."""
    lines, unreadable = read(state_dir, since, until)
    for row in unreadable:
        err.write(f"kiosk: unreadable row {row.seq} ({row.ref or 'no ref'}) left out: {row.why}\n")
    if balance:
        records = [b.export() for b in reconcile(lines)]
        columns = BALANCE_COLUMNS
    else:
        records = [line.export() for line in lines]
        columns = SALES_COLUMNS
    if fmt != "table":
        out.write(render(records, columns, fmt))
        return 0
    span = _span(since, until)
    if not records:
        out.write(f"no transactions, {span}\n")
        return 0
    out.write(render(records, columns, "table"))
    if balance:
        differ = [r["day"] for r in records if r["status"] == "differs"]
        still = [r["day"] for r in records if r["status"] == "open"]
        out.write(
            f"\n{len(records)} day(s), {span}: "
            + (f"{len(differ)} differ ({', '.join(differ)})" if differ else "none differ")
            + (f", {len(still)} with outcomes still unknown" if still else "")
            + "\n"
        )
    else:
        out.write("\n" + _totals(lines) + f"\n{span}\n")
    return 0


def _span(since: date | None, until: date | None) -> str:
    if since and until:
        return f"{since} to {until} (UTC days)"
    if since or until:
        return f"{since} on (UTC days)" if since else f"up to {until} (UTC days)"
    return "all days"


def _totals(lines: list[SalesLine]) -> str:
    """One line per currency: count and amount by outcome."""
    by: dict[str, dict[str, tuple[int, Decimal]]] = {}
    for line in lines:
        outcomes = by.setdefault(line.currency, {})
        n, total = outcomes.get(line.outcome, (0, Decimal(0)))
        outcomes[line.outcome] = (n + line.count, total + line.amount)
    return "\n".join(
        f"total {currency}: "
        + ", ".join(
            f"{outcome} {n} ({format_amount(total, currency)})"
            for outcome, (n, total) in sorted(outcomes.items())
        )
        for currency, outcomes in sorted(by.items())
    )
