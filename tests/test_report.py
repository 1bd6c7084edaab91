"""`kiosk report` and the operator actions on a journal a fault campaign left (see
tests/fixtures/README.md): the sales add up to the journal's rows, day by day; the
reconciliation matches the simulator's ledger of the same run and flags the days where money is
held without a vend; retry and resolve change exactly what they should; folding old rows into
daily totals changes no figure; table, CSV and JSON say the same; an older journal is reported
as it is."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiosk.journal import JOURNAL_FILE, Journal
from tests.fixtures import HERE, load_journal, schema_fixtures

ROOT = Path(__file__).resolve().parents[1]
LEDGER = {t["partner_trans_id"]: t for t in json.loads((HERE / "campaign-ledger.json").read_text())}


def kiosk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SUDO_USER": ""},
    )


def report(state: Path, *args: str) -> list[dict[str, Any]]:
    done = kiosk("report", "--format", "json", "--state-dir", str(state), *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def rows(state: Path) -> list[tuple[str, str, str, str, Decimal]]:
    """(ref, day, item, state, amount) of every transaction, straight from SQLite."""
    conn = sqlite3.connect(state / JOURNAL_FILE)
    try:
        found = conn.execute(
            "SELECT ref, substr(created_at, 1, 10), item, state, amount FROM transactions"
        ).fetchall()
    finally:
        conn.close()
    return [(ref, day, item, st, Decimal(amount)) for ref, day, item, st, amount in found]


@pytest.fixture
def campaign(tmp_path: Path) -> Path:
    """The campaign's journal, brought to this firmware's schema as `kiosk run` does when it
    starts (it was written at schema 3; `kiosk journal retry` and `resolve` never migrate)."""
    state = tmp_path / "state"
    load_journal(HERE / "campaign-journal.sql", state)
    Journal(state).close()
    return state


def test_the_sales_add_up_to_the_journal_rows_by_day_item_and_outcome(campaign: Path) -> None:
    expected: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for _, day, item, state, amount in rows(campaign):
        expected[(day, item, state)][0] += 1
        expected[(day, item, state)][1] += amount
    lines = report(campaign)
    assert {
        (r["day"], r["item"], r["outcome"]): [r["count"], Decimal(r["amount"])] for r in lines
    } == (dict(expected))
    assert all(r["currency"] == "USD" and r["amount"].count(".") == 1 for r in lines)
    assert len({r["day"] for r in lines}) == 3  # the campaign's restarts 30 h later
    assert sum(r["count"] for r in lines) == len(rows(campaign)) == 36


def test_the_reconciliation_matches_the_simulator_ledger_day_by_day(campaign: Path) -> None:
    held: dict[str, Decimal] = defaultdict(Decimal)
    vended: dict[str, Decimal] = defaultdict(Decimal)
    attention_days = set()
    for ref, day, _, state, amount in rows(campaign):
        trade = LEDGER.get(ref)
        if trade is not None and trade["holds_money"]:
            held[day] += Decimal(trade["amount"])
        if state == "vended":
            vended[day] += amount
        if state == "attention":
            attention_days.add(day)
    balance = report(campaign, "--reconcile")
    assert [b["day"] for b in balance] == sorted({day for _, day, *_ in rows(campaign)})
    for b in balance:
        assert Decimal(b["alipay_holds"]) == held[b["day"]], b  # what Alipay really holds
        assert Decimal(b["vended"]) == vended[b["day"]], b
        assert Decimal(b["difference"]) == held[b["day"]] - vended[b["day"]]
        assert (b["unsettled_count"], b["resolved_count"]) == (0, 0)  # worked off
        assert b["status"] == ("differs" if b["day"] in attention_days else "ok"), b
    assert attention_days and Decimal(
        next(b for b in balance if b["status"] == "differs")["difference"]
    ) == Decimal("4.50")  # the three in attention: paid, not vended, not given back


def test_table_csv_and_json_say_the_same(campaign: Path) -> None:
    for extra in ([], ["--reconcile"]):
        as_json = report(campaign, *extra)
        done = kiosk("report", "--format", "csv", "--state-dir", str(campaign), *extra)
        as_csv = list(csv.DictReader(io.StringIO(done.stdout)))
        assert as_csv == [{k: str(v) for k, v in r.items()} for r in as_json]
        table = kiosk("report", "--state-dir", str(campaign), *extra).stdout
        for r in as_json:
            assert any(
                line.split() == [str(v) for v in r.values()] for line in table.splitlines()
            ), r


def test_since_and_until_pick_whole_utc_days(campaign: Path) -> None:
    days = sorted({r["day"] for r in report(campaign)})
    middle = report(campaign, "--since", days[1], "--until", days[1])
    assert {r["day"] for r in middle} == {days[1]}
    assert middle == [r for r in report(campaign) if r["day"] == days[1]]
    assert {r["day"] for r in report(campaign, "--since", days[1])} == set(days[1:])
    assert {r["day"] for r in report(campaign, "--until", days[1])} == set(days[:2])


def test_retry_and_resolve_on_the_campaign_journal_move_the_figures_as_they_should(
    campaign: Path,
) -> None:
    attention = sorted(ref for ref, _, _, state, _ in rows(campaign) if state == "attention")
    day = next(d for ref, d, *_ in rows(campaign) if ref == attention[0])
    before = {b["day"]: b for b in report(campaign, "--reconcile")}[day]

    done = kiosk("journal", "retry", attention[0], "--state-dir", str(campaign))
    assert done.returncode == 0, done.stderr
    done = kiosk(
        "journal",
        "resolve",
        attention[1],
        "--by",
        "ops desk",
        "--note",
        "refunded from the merchant portal, ticket 4411",
        "--state-dir",
        str(campaign),
    )
    assert done.returncode == 0, done.stderr
    vended = next(ref for ref, _, _, state, _ in rows(campaign) if state == "vended")
    refused = kiosk("journal", "resolve", vended, "--note", "x", "--state-dir", str(campaign))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"kiosk: {vended} is vended, not in attention: it is final; only a transaction in "
        "attention can be resolved\n"
    )

    outcomes = {(r["day"], r["outcome"]): r["count"] for r in report(campaign)}
    assert (outcomes[(day, "attention")], outcomes[(day, "refunding")]) == (1, 1)
    assert outcomes[(day, "resolved")] == 1
    after = {b["day"]: b for b in report(campaign, "--reconcile")}[day]
    # The retried one is still held (a refund is under way); the resolved one left the
    # kiosk's hands: a person says where its money went.
    assert Decimal(after["alipay_holds"]) == Decimal(before["alipay_holds"]) - Decimal("1.50")
    assert (after["resolved"], after["resolved_count"], after["status"]) == ("1.50", 1, "differs")

    listed = {
        r["ref"]: r
        for r in json.loads(
            kiosk("journal", "--json", "--all", "--state-dir", str(campaign)).stdout
        )
    }
    assert [(a["action"], a["to_state"]) for a in listed[attention[0]]["actions"]] == [
        ("retry", "refunding")
    ]
    (resolved,) = listed[attention[1]]["actions"]
    assert (resolved["by"], resolved["note"]) == (
        "ops desk",
        "refunded from the merchant portal, ticket 4411",
    )
    assert listed[attention[2]]["actions"] == [] and listed[attention[2]]["state"] == "attention"
    assert all(row["actions"] == [] for ref, row in listed.items() if ref not in attention)


def test_folding_old_rows_into_daily_totals_changes_no_figure(campaign: Path) -> None:
    sales, balance = report(campaign), report(campaign, "--reconcile")
    # A day after the newest change: every final row of the first two days folds.
    with Journal(campaign, wall_clock=lambda: 4_000_000_000.0) as journal:
        result = journal.fold_old(keep_days=1)
    left = rows(campaign)
    assert result.folded > 0 and result.skipped == 0
    assert len(left) == 36 - result.folded
    assert {state for _, _, _, state, _ in left} >= {"attention"}
    assert report(campaign) == sales
    assert report(campaign, "--reconcile") == balance


# Each earlier schema's fixture, day by day: (day, status), and day two's (Alipay holds,
# vended, unsettled). Day one: schema 1's left a sale cancelling (open), schema 2's is settled,
# schema 3's was folded into daily totals. Day two: schemas 1 and 2 have a sale in attention
# (3.00 held, not vended) and one paying or querying (1.50 unknown); schema 3 two sales vended
# (3.50), two refused refunds still held (one in attention, one retried), one querying.
REPORTED = {
    1: ([("01-10", "open"), ("01-11", "differs")], ("3.00", "0.00", "1.50")),
    2: ([("06-01", "ok"), ("06-02", "differs")], ("3.00", "0.00", "1.50")),
    3: ([("09-01", "ok"), ("10-11", "differs")], ("8.50", "3.50", "1.50")),
}


@pytest.mark.parametrize("schema", sorted(schema_fixtures()))
def test_an_older_journal_is_reported_as_it_is(schema: int, tmp_path: Path) -> None:
    path = load_journal(schema_fixtures()[schema], tmp_path)
    before = path.read_bytes()
    balance = report(tmp_path, "--reconcile")
    days, second = REPORTED[schema]
    assert [(b["day"][5:], b["status"]) for b in balance] == days
    assert (balance[1]["alipay_holds"], balance[1]["vended"], balance[1]["unsettled"]) == second
    assert path.read_bytes() == before  # read, never migrated


def test_no_journal_yet_is_an_empty_report(tmp_path: Path) -> None:
    assert report(tmp_path / "none") == []
    done = kiosk("report", "--state-dir", str(tmp_path / "none"))
    assert (done.returncode, done.stdout) == (0, "no transactions, all days\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-02-30"], "'2026-02-30' is not a day (YYYY-MM-DD)"),
        (["--until", "20260101"], "'20260101' is not a day (YYYY-MM-DD)"),
        (["--since", "2026-02-02", "--until", "2026-02-01"], "--since 2026-02-02 is after"),
        (["--format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_bad_report_usage_is_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = kiosk("report", "--state-dir", str(tmp_path), *args)
    assert done.returncode == 2
    assert message in done.stderr
