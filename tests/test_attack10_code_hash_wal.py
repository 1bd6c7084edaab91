"""SPEC rule 6: a code's keyed hash, with its key and the code's last 4 digits, finds the whole
code again, so it is kept for rule 7's window only, on every file of the state directory. The
next sale's commit drops the hashes past the window, but the old page images that hold them
stay in the WAL: the journal worker checkpoints only when it forgot a hash itself, and after
such a sale it finds none to forget. A kiosk selling a coffee every few minutes keeps each
sold code's hash in its WAL for as long as it keeps selling so (until SQLite's own checkpoint
after a thousand pages and the overwriting of those frames)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from kiosk.journal import Journal
from kiosk.payment_code import CODE_REUSE_WINDOW_S, code_digest
from tests.conftest import KioskClocks, payment_code
from tests.loop_rig import Rig


def _held(state: Path, digest: bytes) -> list[str]:
    return sorted(f.name for f in state.iterdir() if f.is_file() and digest in f.read_bytes())


def _sold_once(
    make_rig: Callable[..., Rig], state: Path, n: int
) -> tuple[Rig, Journal, KioskClocks, bytes]:
    """A kiosk on a journal with test-moved clocks, after one paid sale: its code's hash."""
    clock = KioskClocks()
    journal = Journal(state, wall_clock=clock, boot_clock=clock.boot)
    rig = make_rig(journal=journal)
    code = payment_code("0001", n)
    rig.scanner.scan(code)
    rig.log.wait_for("payment.result", 15)
    return rig, journal, clock, code_digest(journal.code_key, code)


def _next_customer_later(rig: Rig, clock: KioskClocks, n: int) -> int:
    """Four minutes on, another sale: its commit drops the first hash. Where its log began."""
    clock.advance(CODE_REUSE_WINDOW_S + 60)
    mark = rig.log.size
    rig.scanner.scan(payment_code("0001", n))
    rig.log.wait_for("payment.result", 15, after=mark - 1)
    return mark


def test_a_hash_the_next_sale_forgot_leaves_the_wal_too(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    rig, journal, clock, digest = _sold_once(make_rig, state, 91)
    _next_customer_later(rig, clock, 92)
    assert digest not in {seen.digest for seen in journal.recent_codes(since=0)}

    def gone() -> bool:
        rig.kiosk.worker.wake()  # its passes: nothing is left in the table to forget
        return _held(state, digest) == []

    rig.log.wait_until(gone, 10)
    held = _held(state, digest)
    rig.stop()
    journal.close()
    assert held == [], (
        f"{held} still hold the keyed hash of a code sold {CODE_REUSE_WINDOW_S + 60:.0f} s "
        "before, after the next sale dropped it from the table and the journal worker made its "
        "passes: with its key and last 4 digits it finds the whole code again (rule 6)"
    )


def test_a_reader_holding_the_wal_back_is_said_once_and_so_is_its_release(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    rig, journal, clock, digest = _sold_once(make_rig, state, 93)
    # An operator's `sqlite3` on the journal keeps a snapshot open across the next sale.
    reader = sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM transactions").fetchone()
    mark = _next_customer_later(rig, clock, 94)

    def said(name: str, after: int) -> Callable[[], bool]:
        def check() -> bool:
            rig.kiosk.worker.wake()  # pass after pass
            return rig.log.index(name, after=after - 1) is not None

        return check

    assert rig.log.wait_until(said("journal.wal_held", mark), 10)
    assert "journal.sqlite3-wal" in _held(state, digest)  # held back with the reader
    reader.execute("COMMIT")
    reader.close()
    released = rig.log.size
    assert rig.log.wait_until(said("journal.wal_released", released), 10)
    held = _held(state, digest)
    told = [e for e in rig.log.events[mark:] if e.get("event") == "journal.wal_held"]
    rig.stop()
    journal.close()
    assert held == []
    assert len(told) == 1, told
