"""Retention on a compressed clock: final transactions past `journal.keep_days` fold into
per-day totals and leave the file, so it stays bounded; what a report adds up is the same before
and after; unfinished and attention rows never fold; the journal worker folds at its first pass
and then once a day on the monotonic clock."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.journal import JOURNAL_FILE, DailyTotal, Journal, Transaction, TxnState
from kiosk.worker import FOLD_EVERY_S, JournalWorker
from tests.test_worker import SETTINGS, Clock, FakeFlow

DAY = 86400.0
START = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()


class Wall:
    """The journal's wall clock, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def day(self, n: float) -> None:
        self.now = START + n * DAY


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def journal(tmp_path: Path, wall: Wall) -> Journal:
    return Journal(tmp_path, wall_clock=wall)


def sale(
    journal: Journal,
    ref: str,
    state: TxnState,
    amount: str = "1.50",
    item: str = "coffee",
) -> Transaction:
    txn = journal.open_transaction(
        ref=ref,
        amount=Decimal(amount),
        currency="USD",
        item=item,
        code_last4="0001",
        trans_create_time="20260101200000",
        first_request=("pay", {"partner_trans_id": ref}),
    )
    return journal.update(txn, state=state)


def summed(journal: Journal) -> dict[tuple[str, str, str, str], tuple[int, Decimal]]:
    """What a report adds up: live rows and folded totals, by day, item, outcome, currency."""
    rows, totals = journal.sales()
    out: dict[tuple[str, str, str, str], tuple[int, Decimal]] = {}
    for key, count, amount in [
        ((t.created_at[:10], t.item, t.state.value, t.currency), 1, t.amount) for t in rows
    ] + [((d.day, d.item, d.outcome, d.currency), d.count, d.amount) for d in totals]:
        n, total = out.get(key, (0, Decimal(0)))
        out[key] = (n + count, total + amount)
    return out


def refs(journal: Journal) -> set[str]:
    return {t.ref for t in journal.listing(include_all=True)}


def test_old_final_rows_fold_into_daily_totals_and_leave_the_file(
    journal: Journal, wall: Wall, tmp_path: Path
) -> None:
    sale(journal, "old-vended-1", TxnState.VENDED)
    sale(journal, "old-vended-2", TxnState.VENDED)
    sale(journal, "old-tea", TxnState.VENDED, "2.00", "tea")
    sale(journal, "old-declined", TxnState.DECLINED)
    sale(journal, "old-refunded", TxnState.REFUNDED)
    attention = sale(journal, "old-attention", TxnState.ATTENTION, "3.00")
    sale(journal, "old-settled", TxnState.ATTENTION, "3.00")
    journal.resolve_attention("old-settled", "alice", "refunded by hand in the portal")
    sale(journal, "old-cancelling", TxnState.CANCELLING)
    wall.day(95)
    sale(journal, "recent", TxnState.VENDED)
    wall.day(100)
    before = summed(journal)

    result = journal.fold_old(keep_days=90)

    assert (result.folded, result.skipped, result.more) == (6, 0, False)
    assert refs(journal) == {"old-attention", "old-cancelling", "recent"}
    assert summed(journal) == before  # a report adds up the same
    _, totals = journal.sales()
    assert totals == [
        DailyTotal("2026-01-01", "coffee", "declined", "USD", 1, Decimal("1.50")),
        DailyTotal("2026-01-01", "coffee", "refunded", "USD", 1, Decimal("1.50")),
        DailyTotal("2026-01-01", "coffee", "resolved", "USD", 1, Decimal("3.00")),
        DailyTotal("2026-01-01", "coffee", "vended", "USD", 2, Decimal("3.00")),
        DailyTotal("2026-01-01", "tea", "vended", "USD", 1, Decimal("2.00")),
    ]
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    assert {r for (r,) in conn.execute("SELECT DISTINCT ref FROM requests")} == {
        "old-attention",
        "old-cancelling",
        "recent",
    }
    assert conn.execute("SELECT COUNT(*) FROM operator_actions").fetchone() == (0,)
    conn.close()
    assert journal.get("old-attention") == attention
    assert journal.fold_old(keep_days=90).folded == 0  # nothing more until time passes


def test_a_row_folds_by_when_it_became_final_and_counts_on_the_day_it_was_made(
    journal: Journal, wall: Wall
) -> None:
    txn = sale(journal, "slow", TxnState.CANCELLING)
    wall.day(50)
    journal.update(txn, state=TxnState.CANCELLED)
    wall.day(100)
    assert journal.fold_old(keep_days=90).folded == 0  # final for 50 days only
    wall.day(141)
    sale(journal, "today", TxnState.VENDED)
    assert journal.fold_old(keep_days=90).folded == 1
    assert journal.sales()[1] == [
        DailyTotal("2026-01-01", "coffee", "cancelled", "USD", 1, Decimal("1.50"))
    ]


def test_a_later_fold_adds_to_the_day_already_folded(journal: Journal, wall: Wall) -> None:
    sale(journal, "first", TxnState.VENDED)
    late = sale(journal, "second", TxnState.VENDING)
    wall.day(100)
    journal.update(late, state=TxnState.VENDED)  # its vend confirmed only now
    assert journal.fold_old(keep_days=90).folded == 1
    wall.day(191)
    sale(journal, "new", TxnState.VENDED)
    assert journal.fold_old(keep_days=90).folded == 1
    assert journal.sales()[1] == [
        DailyTotal("2026-01-01", "coffee", "vended", "USD", 2, Decimal("3.00"))
    ]
    assert refs(journal) == {"new"}


def test_a_wall_clock_years_ahead_does_not_fold_recent_sales(journal: Journal, wall: Wall) -> None:
    sale(journal, "yesterday", TxnState.VENDED)
    wall.day(1)
    sale(journal, "today", TxnState.VENDED)
    wall.day(3650)  # the clock is wrong, and nothing was sold since
    assert journal.fold_old(keep_days=90).folded == 0
    assert refs(journal) == {"yesterday", "today"}


def test_folding_goes_a_batch_at_a_time_within_its_budget(journal: Journal, wall: Wall) -> None:
    for n in range(5):
        sale(journal, f"old-{n}", TxnState.VENDED)
    wall.day(100)
    sale(journal, "new", TxnState.VENDED)
    first = journal.fold_old(keep_days=90, max_rows=3, batch=2)
    assert (first.folded, first.more) == (3, True)
    second = journal.fold_old(keep_days=90, max_rows=3, batch=2)
    assert (second.folded, second.more) == (2, False)
    assert journal.sales()[1] == [
        DailyTotal("2026-01-01", "coffee", "vended", "USD", 5, Decimal("7.50"))
    ]


def test_a_final_row_that_cannot_be_read_is_kept_and_the_others_fold(
    journal: Journal, wall: Wall, tmp_path: Path
) -> None:
    sale(journal, "good", TxnState.VENDED)
    sale(journal, "flipped", TxnState.VENDED)
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    conn.execute("UPDATE transactions SET amount='1.5O' WHERE ref='flipped'")
    conn.commit()
    conn.close()
    wall.day(100)
    sale(journal, "new", TxnState.VENDED)
    result = journal.fold_old(keep_days=90)
    assert (result.folded, result.skipped, result.more) == (1, 1, False)
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    kept = conn.execute("SELECT ref FROM transactions ORDER BY seq").fetchall()
    conn.close()
    assert kept == [("flipped",), ("new",)]


def test_the_worker_folds_at_its_first_pass_and_then_once_a_day(
    journal: Journal, wall: Wall
) -> None:
    clock = Clock()
    flow = FakeFlow(replace(SETTINGS, keep_days=30))
    worker = JournalWorker(flow, journal, clock=clock)  # type: ignore[arg-type]
    sale(journal, "a", TxnState.VENDED)
    wall.day(31)
    sale(journal, "b", TxnState.VENDED)
    worker.work_off_due()  # the first pass, at start
    assert refs(journal) == {"b"}

    wall.day(62)
    sale(journal, "c", TxnState.VENDED)
    clock.now += FOLD_EVERY_S - 1
    worker.work_off_due()
    assert refs(journal) == {"b", "c"}  # not a day yet on the monotonic clock
    clock.now += 1
    worker.work_off_due()
    assert refs(journal) == {"c"}
    assert journal.sales()[1] == [
        DailyTotal("2026-01-01", "coffee", "vended", "USD", 1, Decimal("1.50")),
        DailyTotal("2026-02-01", "coffee", "vended", "USD", 1, Decimal("1.50")),
    ]


def test_the_worker_leaves_the_rest_for_its_next_pass_when_there_is_much_to_fold(
    journal: Journal, wall: Wall, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiosk.worker

    monkeypatch.setattr(kiosk.worker, "FOLD_ROWS_PER_PASS", 2)
    for n in range(3):
        sale(journal, f"old-{n}", TxnState.VENDED)
    wall.day(100)
    sale(journal, "new", TxnState.VENDED)
    worker = JournalWorker(FakeFlow(), journal, clock=Clock())  # type: ignore[arg-type]
    worker.work_off_due()
    assert len(refs(journal)) == 2
    worker.work_off_due()  # at once, not a day later
    assert refs(journal) == {"new"}


def test_the_worker_does_not_fold_while_the_kiosk_winds_down(journal: Journal, wall: Wall) -> None:
    sale(journal, "old", TxnState.VENDED)
    wall.day(100)
    sale(journal, "new", TxnState.VENDED)
    flow = FakeFlow()
    flow.stopping.set()
    JournalWorker(flow, journal, clock=Clock()).work_off_due()  # type: ignore[arg-type]
    assert refs(journal) == {"old", "new"}
