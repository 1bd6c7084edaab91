"""A journal that lives for years: every earlier schema, kept as a fixture written by the
firmware of its time, is read as it is and migrated to the newest with its rows intact; a new
journal takes the same steps; a step is one commit; a newer schema or a foreign database is
refused and left untouched, an older one never taken for corrupt."""

from __future__ import annotations

import dataclasses
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiosk import journal as journal_module
from kiosk.errors import JournalCorrupt, JournalError, JournalTooNew
from kiosk.journal import JOURNAL_FILE, MIGRATIONS, SCHEMA_VERSION, Journal, TxnState
from kiosk.payment_code import CODE_REUSE_WINDOW_S, PaymentCode, RecentCodes
from tests.conftest import FakeBootClock
from tests.fixtures import load_journal, schema_fixtures
from tests.fixtures.make_schema_fixtures import OPEN_CODES

FIXTURES = schema_fixtures()
ROW = (
    "ref, amount, currency, item, state, final, code_last4, trans_create_time, created_at, "
    "updated_at, error_code, alipay_trans_id, attempts, refund_id, note"
)


def rows_of(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of `table`, none if the schema has no such table."""
    if not raw(path, f"SELECT name FROM sqlite_master WHERE type='table' AND name='{table}'"):
        return []
    return raw(path, f"SELECT * FROM {table} ORDER BY rowid")


def raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def layout(path: Path) -> dict[str, Any]:
    """Tables with their columns, and indexes with theirs: what a schema is."""
    conn = sqlite3.connect(path)
    try:
        names = conn.execute(
            "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
        shape: dict[str, Any] = {}
        for kind, name, table in names:
            if kind == "table":
                shape[name] = [row[1:] for row in conn.execute(f"PRAGMA table_info({name})")]
            elif kind == "index":
                columns = [row[2] for row in conn.execute(f"PRAGMA index_info({name})")]
                shape[f"index {name}"] = (table, columns)
        return shape
    finally:
        conn.close()


def test_every_earlier_schema_has_its_fixture() -> None:
    # A new schema step leaves the one before it behind: keep that one as a fixture too
    # (tests/fixtures/make_schema_fixtures.py, FIRMWARE).
    assert set(FIXTURES) == set(range(1, SCHEMA_VERSION))
    assert [m.to for m in MIGRATIONS] == list(range(2, SCHEMA_VERSION + 1))


@pytest.mark.parametrize("schema", sorted(FIXTURES))
def test_an_older_journal_is_read_as_it_is_never_called_corrupt(
    schema: int, tmp_path: Path
) -> None:
    path = load_journal(FIXTURES[schema], tmp_path)
    before = path.read_bytes()
    with Journal(tmp_path, read_only=True) as old:  # `kiosk journal` beside an older daemon
        assert old.schema == schema
        listed = {t.ref: t for t in old.listing(include_all=True)}
        actions = old.operator_actions()
        rows, totals = old.sales()
    assert len(listed) == len(raw(path, "SELECT ref FROM transactions")) > 0
    assert {t.ref for t in rows} == set(listed)
    assert sum(len(a) for a in actions.values()) == len(rows_of(path, "operator_actions"))
    assert len(totals) == len(rows_of(path, "daily_totals"))
    assert path.read_bytes() == before


@pytest.mark.parametrize("schema", sorted(FIXTURES))
def test_an_older_journal_is_migrated_to_the_newest_with_every_row_intact(
    schema: int, tmp_path: Path
) -> None:
    path = load_journal(FIXTURES[schema], tmp_path)
    rows_before = raw(path, f"SELECT {ROW} FROM transactions ORDER BY seq")
    requests_before = raw(path, "SELECT ref, kind, params, outcome FROM requests ORDER BY id")
    open_before = [r[0] for r in rows_before if not r[5] and r[4] != "attention"]
    kept_before = {t: rows_of(path, t) for t in ("operator_actions", "daily_totals")}

    with Journal(tmp_path) as journal:
        assert journal.schema == SCHEMA_VERSION
        assert [t.ref for t in journal.unfinished()] == open_before
        attention = [t for t in journal.listing(include_all=True) if t.state is TxnState.ATTENTION]
        assert [t.refund_id for t in attention] == [f"{attention[0].ref}-R"]
        for txn in journal.listing(include_all=True):
            assert isinstance(txn.amount, Decimal) and txn.currency == "USD"

    assert raw(path, f"SELECT {ROW} FROM transactions ORDER BY seq") == rows_before
    assert raw(path, "SELECT ref, kind, params, outcome FROM requests ORDER BY id") == (
        requests_before
    )
    for table, rows in kept_before.items():
        if rows:
            assert rows_of(path, table) == rows
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # An older firmware reads only `meta`: it must see the newer schema, and refuse it.
    assert raw(path, "SELECT value FROM meta WHERE key='schema'") == [(str(SCHEMA_VERSION),)]
    assert raw(path, "SELECT buyer_code FROM transactions WHERE buyer_code IS NOT NULL") == []
    with Journal(tmp_path) as again:  # opening a migrated journal changes nothing
        assert again.schema == SCHEMA_VERSION
    assert raw(path, f"SELECT {ROW} FROM transactions ORDER BY seq") == rows_before


def test_schema_1_whole_codes_are_gone_from_every_file_after_the_migration(
    tmp_path: Path,
) -> None:
    path = load_journal(FIXTURES[1], tmp_path)
    assert all(code.encode() in path.read_bytes() for code in OPEN_CODES)  # the fixture has them
    Journal(tmp_path).close()
    for file in tmp_path.iterdir():
        data = file.read_bytes()
        assert not any(code.encode() in data for code in OPEN_CODES), file.name


def test_schema_2_keeps_its_code_key_and_recent_codes(tmp_path: Path) -> None:
    path = load_journal(FIXTURES[2], tmp_path)
    (key,) = raw(path, "SELECT value FROM meta WHERE key='code_key'")[0]
    seen = raw(path, "SELECT digest, seen_at FROM recent_codes")
    with Journal(tmp_path) as journal:
        assert journal.code_key == bytes.fromhex(key)
        assert journal.recent_codes(since=0) == [(bytes(d), t, None, None) for d, t in seen]


def test_schema_3_code_hashes_keep_no_boot_stamp_and_age_by_the_wall_clock(
    tmp_path: Path,
) -> None:
    path = load_journal(FIXTURES[3], tmp_path)
    seen = raw(path, "SELECT digest, seen_at FROM recent_codes ORDER BY seen_at")
    assert len(seen) == 3  # three sales within a minute, the last one's at seen[-1]
    wall = [seen[-1][1] + 60]
    boot = FakeBootClock(seconds=5_000.0)  # this boot's clock, started long before
    with Journal(tmp_path, wall_clock=lambda: wall[0], boot_clock=boot) as journal:
        rows = journal.recent_codes(since=wall[0] - CODE_REUSE_WINDOW_S, boot_id=boot.boot_id)
        assert rows == [(bytes(d), t, None, None) for d, t in seen]
        codes = RecentCodes(key=journal.code_key)
        assert codes.seed(rows, wall[0], boot()) == 3
        assert codes.seen_recently(PaymentCode.parse("286301234567893009"))  # the last sold
        assert journal.forget_codes() == 0
        # By the wall clock, not the boot clock (which stands still): the first two go once
        # the wall clock has them past the window.
        wall[0] = seen[1][1] + CODE_REUSE_WINDOW_S + 1
        assert journal.forget_codes() == 2
        assert [r.digest for r in journal.recent_codes(since=0)] == [bytes(seen[2][0])]


def test_a_new_journal_and_a_migrated_one_have_the_same_schema(tmp_path: Path) -> None:
    Journal(tmp_path / "new").close()
    for schema, sql in FIXTURES.items():
        load_journal(sql, tmp_path / f"from-{schema}")
        Journal(tmp_path / f"from-{schema}").close()
        assert layout(tmp_path / f"from-{schema}" / JOURNAL_FILE) == layout(
            tmp_path / "new" / JOURNAL_FILE
        )


def test_a_step_that_fails_leaves_the_journal_at_the_schema_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = load_journal(FIXTURES[SCHEMA_VERSION - 1], tmp_path)
    rows_before = raw(path, f"SELECT {ROW} FROM transactions ORDER BY seq")
    layout_before = layout(path)

    def power_cut(conn: sqlite3.Connection) -> None:
        raise OSError("power cut")

    last = dataclasses.replace(MIGRATIONS[-1], also=power_cut)
    monkeypatch.setattr(journal_module, "MIGRATIONS", (*MIGRATIONS[:-1], last))
    with pytest.raises(OSError, match="power cut"):
        Journal(tmp_path)
    assert raw(path, "PRAGMA user_version") == [(0,)]
    assert raw(path, "SELECT value FROM meta WHERE key='schema'") == [(str(SCHEMA_VERSION - 1),)]
    assert layout(path) == layout_before  # none of the step's SQL either

    monkeypatch.undo()  # the next start takes the step whole
    with Journal(tmp_path) as journal:
        assert journal.schema == SCHEMA_VERSION
    assert raw(path, f"SELECT {ROW} FROM transactions ORDER BY seq") == rows_before


def test_a_newer_schema_is_refused_with_both_versions_named_and_left_untouched(
    tmp_path: Path,
) -> None:
    Journal(tmp_path).close()
    path = tmp_path / JOURNAL_FILE
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 4}")
    conn.execute("CREATE TABLE from_the_future (x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(JournalTooNew) as caught:
        Journal(tmp_path)
    assert str(caught.value) == (
        f"journal {path} has schema {SCHEMA_VERSION + 4}, newer than this firmware's "
        f"{SCHEMA_VERSION} (a later firmware wrote it); it was left untouched — run the "
        "firmware that wrote it, or move it aside to start a new journal"
    )
    assert not isinstance(caught.value, JournalCorrupt)
    assert path.read_bytes() == before
    wal = tmp_path / f"{JOURNAL_FILE}-wal"  # a reader's (empty) WAL at most: nothing written
    assert not wal.exists() or wal.stat().st_size == 0


def test_an_sqlite_file_that_is_not_a_journal_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_FILE
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(JournalCorrupt, match="not a kiosk journal \\(tables: photos\\)"):
        Journal(tmp_path)
    assert path.read_bytes() == before


def test_a_command_beside_the_daemon_never_migrates(tmp_path: Path) -> None:
    path = load_journal(FIXTURES[SCHEMA_VERSION - 1], tmp_path)
    before = path.read_bytes()
    with pytest.raises(JournalError, match=f"at schema {SCHEMA_VERSION - 1}; .*start it once"):
        Journal(tmp_path, migrate=False)
    assert path.read_bytes() == before
