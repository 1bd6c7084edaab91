"""The offline journal: durable records, resumable state, no payment codes, corrupt files
refused."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.errors import JournalCorrupt, JournalError, JournalTooNew
from kiosk.journal import (
    CHECK_CACHE_KIB,
    JOURNAL_FILE,
    PAGE_CACHE_KIB,
    SCHEMA_VERSION,
    Journal,
    TxnState,
)
from tests.conftest import FakeBootClock

CODE = "286512345678901234"


def _open(journal: Journal, ref: str = "VM-1-20261126000000-aa") -> object:
    return journal.open_transaction(
        ref=ref,
        amount=Decimal("1.50"),
        currency="USD",
        item="coffee",
        code_last4=CODE[-4:],
        trans_create_time="20261126000000",
    )


def test_journal_uses_wal_with_full_sync_and_secure_delete(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        conn = journal._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_open_transaction_is_readable_by_a_second_connection_at_once(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        txn = _open(journal)
        other = sqlite3.connect(tmp_path / JOURNAL_FILE)
        state = other.execute("SELECT state FROM transactions WHERE ref=?", (txn.ref,)).fetchone()
        other.close()
        assert state == ("paying",)


def test_request_is_journaled_with_its_params_before_it_is_sent(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        txn = _open(journal)
        txn = journal.before_request(txn, "pay", {"partner_trans_id": txn.ref})
        assert txn.attempts == 1
        reopened = Journal(tmp_path, read_only=True)
        try:
            requests = reopened.requests_for(txn.ref)
        finally:
            reopened.close()
        assert [r["kind"] for r in requests] == ["pay"]
        assert requests[0]["params"] == {"partner_trans_id": txn.ref}


def test_unfinished_transactions_survive_a_reopen(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        txn = _open(journal)
        journal.update(txn, state=TxnState.VENDING, alipay_trans_id="2026112600001")
    with Journal(tmp_path) as journal:
        [resumed] = journal.unfinished()
        assert resumed.state is TxnState.VENDING
        assert resumed.code_last4 == CODE[-4:]
        assert resumed.amount == Decimal("1.50")


def test_an_open_transaction_keeps_only_the_last_four_digits(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        _open(journal)
        # while open, WAL and all: no whole code anywhere (SPEC rule 6)
        assert [p.name for p in tmp_path.iterdir() if CODE[-8:].encode() in p.read_bytes()] == []
        assert any(CODE[-4:].encode() in p.read_bytes() for p in tmp_path.iterdir())


def test_whole_codes_an_older_journal_kept_are_scrubbed_on_open(tmp_path: Path) -> None:
    path = _schema_1_journal(tmp_path)
    # as the first firmware wrote it: the whole code beside an open transaction
    conn = sqlite3.connect(path)
    conn.execute("UPDATE transactions SET buyer_code=?, code_last4=?", (CODE, CODE[-4:]))
    conn.commit()
    conn.close()
    assert any(CODE.encode() in p.read_bytes() for p in tmp_path.iterdir())
    with Journal(tmp_path) as journal:
        assert [p.name for p in tmp_path.iterdir() if CODE.encode() in p.read_bytes()] == []
        assert journal.unfinished()[0].code_last4 == CODE[-4:]


def test_export_masks_the_code_while_open_and_drops_it_when_final(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        txn = _open(journal)
        row = txn.export()
        assert row["buyer_code"].endswith(CODE[-4:]) and CODE not in row["buyer_code"]
        assert row["final"] is False
        row = journal.update(txn, state=TxnState.DECLINED, error_code="PAYMENT_FAIL").export()
        assert row["buyer_code"] is None and row["final"] is True
        assert row["code"] == "PAYMENT_FAIL"


def test_attention_leaves_the_active_set_but_is_listed(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        txn = _open(journal)
        journal.update(txn, state=TxnState.ATTENTION, note="refund refused")
        assert journal.unfinished() == []
        assert [t.state for t in journal.listing()] == [TxnState.ATTENTION]


def test_attention_refs_are_the_open_transactions_in_attention_only(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        for ref in ("VM-1-20261126000002-bb", "VM-1-20261126000001-aa"):
            journal.update(_open(journal, ref), state=TxnState.ATTENTION, note="refund refused")
        _open(journal, "VM-1-20261126000003-cc")  # open, not in attention
        settled = journal.update(_open(journal, "VM-1-20261126000004-dd"), state=TxnState.ATTENTION)
        journal.resolve_attention(settled.ref, by="tech", note="refunded by hand")
        assert journal.attention_refs() == ("VM-1-20261126000001-aa", "VM-1-20261126000002-bb")


def test_figures_count_the_days_vended_sales_and_sum_the_readable_amounts(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path) as journal:
        for i in range(4):
            txn = _open(journal, f"VM-1-2026112600000{i}-aa")
            if i < 3:
                journal.update(txn, state=TxnState.VENDED)
        with journal._lock:  # one amount this firmware cannot read
            journal._conn.execute(
                "UPDATE transactions SET amount='n/a' WHERE ref='VM-1-20261126000002-aa'"
            )
        figures = journal.figures("2000-01-01T00:00:00.000Z")
        assert figures.sales_today == 3
        assert figures.amount_today == Decimal("3.00")
        assert figures.unfinished == 1
        assert journal.figures("2999-01-01T00:00:00.000Z").sales_today == 0


def test_listing_shows_unfinished_plus_the_last_finished(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        for i in range(25):
            txn = _open(journal, f"VM-1-2026112600{i:04d}-aa")
            if i:
                journal.update(txn, state=TxnState.VENDED)
        listed = journal.listing()
        assert len(listed) == 21
        assert sum(1 for t in listed if not t.final) == 1
        assert len(journal.listing(include_all=True)) == 25


def test_the_check_reads_through_a_small_cache_and_the_reader_keeps_the_usual_one(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path) as journal:
        _open(journal)
    checked: list[int] = []
    reader = Journal.__new__(Journal)
    reader.path = tmp_path / JOURNAL_FILE
    conn = sqlite3.connect(reader.path)
    conn.set_trace_callback(
        lambda sql: (
            checked.append(conn.execute("PRAGMA cache_size").fetchone()[0])
            if sql == "PRAGMA quick_check"
            else None
        )
    )
    reader._check_sound(conn)
    assert checked == [-CHECK_CACHE_KIB]
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -PAGE_CACHE_KIB
    conn.close()


def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_FILE
    path.write_bytes(b"this is not a journal" * 100)
    before = path.read_bytes()
    with pytest.raises(JournalCorrupt, match="not an SQLite database"):
        Journal(tmp_path)
    assert path.read_bytes() == before


def test_a_corrupted_page_is_refused_and_left_untouched(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        for i in range(200):
            txn = _open(journal, f"VM-1-2026112600{i:04d}-aa")
            journal.update(txn, state=TxnState.VENDED, note="x" * 200)
    path = tmp_path / JOURNAL_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 2 * page + 400] = b"\xa5" * 400  # header and cell pointers of page 3
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as caught:
        Journal(tmp_path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == bytes(data)


def test_a_truncated_journal_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        for i in range(100):
            _open(journal, f"VM-1-2026112600{i:04d}-aa")
    path = tmp_path / JOURNAL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)


def test_read_only_open_of_a_missing_journal_says_so(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        Journal(tmp_path / "nowhere", read_only=True)


def test_a_state_dir_that_cannot_be_created_is_a_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError, match="cannot create state directory"):
        Journal(blocker / "state")


# -- schema 2: the merchant of each transaction, the recent codes ---------------------------


def _schema_1_journal(state_dir: Path) -> Path:
    """A journal as the schema-1 firmware left it, with one open transaction."""
    from kiosk.journal import _SCHEMA

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / JOURNAL_FILE
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
    conn.execute(
        "INSERT INTO transactions (ref, amount, currency, item, state, code_last4, "
        "trans_create_time, created_at, updated_at) VALUES "
        "('VM-1-old', '1.50', 'USD', 'tea', 'cancelling', '1234', '20260101120000', "
        "'2026-01-01T04:00:00.000Z', '2026-01-01T04:00:00.000Z')"
    )
    conn.commit()
    conn.close()
    return path


def test_a_schema_1_journal_is_read_and_migrated_forward_never_called_corrupt(
    tmp_path: Path,
) -> None:
    _schema_1_journal(tmp_path)
    with Journal(tmp_path, read_only=True) as ro:  # `kiosk journal` beside an old daemon
        old = ro.get("VM-1-old")
        assert old is not None and (old.partner, old.gateway) == (None, None)
    with Journal(tmp_path) as journal:
        old = journal.get("VM-1-old")
        assert old is not None and old.state is TxnState.CANCELLING and old.partner is None
        assert [t.ref for t in journal.unfinished()] == ["VM-1-old"]
        new = journal.open_transaction(
            ref="VM-1-new",
            amount=Decimal("2.00"),
            currency="USD",
            item="tea",
            code_last4="9999",
            trans_create_time="20260101120000",
            partner="2088101122334455",
            gateway="https://gw.example/gateway.do",
        )
        assert journal.get(new.ref) == new
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    conn.close()
    with Journal(tmp_path) as again:  # opening a migrated journal changes nothing
        assert again.get("VM-1-new").partner == "2088101122334455"  # type: ignore[union-attr]


def test_a_journal_of_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    Journal(tmp_path).close()
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = (tmp_path / JOURNAL_FILE).read_bytes()
    with pytest.raises(JournalTooNew, match=f"schema {SCHEMA_VERSION + 1}, newer than"):
        Journal(tmp_path)
    with pytest.raises(JournalTooNew):
        Journal(tmp_path, read_only=True)
    assert (tmp_path / JOURNAL_FILE).read_bytes() == before


def test_recent_codes_are_kept_as_keyed_hashes_for_the_window_and_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time as time_module

    from kiosk.payment_code import CODE_REUSE_WINDOW_S

    boot = FakeBootClock()
    journal = Journal(tmp_path, boot_clock=boot)
    key = journal.code_key
    assert len(key) == 32
    now = [1_800_000_000.0]
    monkeypatch.setattr(time_module, "time", lambda: now[0])
    for n, digits in enumerate(("281234567890120001", "281234567890120002")):
        journal.open_transaction(
            ref=f"VM-1-{n}",
            amount=Decimal("1"),
            currency="USD",
            item="tea",
            code_last4=digits,
            trans_create_time="20260101120000",
            code_digest=journal.code_digest(digits),
        )
        now[0] += CODE_REUSE_WINDOW_S + 1  # the second sale prunes the first one's hash
        boot.advance(CODE_REUSE_WINDOW_S + 1)
    assert journal.recent_codes(since=0) == [
        (
            journal.code_digest("281234567890120002"),
            1_800_000_000.0 + CODE_REUSE_WINDOW_S + 1,
            boot.boot_id,
            1000.0 + CODE_REUSE_WINDOW_S + 1,
        )
    ]
    journal.close()
    with Journal(tmp_path) as again:
        assert again.code_key == key  # made once, kept
    data = b"".join(f.read_bytes() for f in tmp_path.iterdir())
    assert b"281234567890120002" not in data
