"""The journal worker truncates the WAL after a sale's commit dropped a code's hash (rule 6),
and tries again at every pass while a reader holds the WAL back (the operator's `kiosk
journal` or `sqlite3` in another process, a backup). The checkpoint runs under the journal's
lock, which every sale's commit takes: it must not wait for that reader there, or each scan
hangs behind the worker's housekeeping, pass after pass, for as long as the reader stays."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from kiosk.journal import Journal
from kiosk.payment_code import CODE_REUSE_WINDOW_S
from tests.conftest import KioskClocks, open_sale, payment_code

WAIT_S = 30.0  # a bound for the threads, below the minute the connection may wait below


def _sell(journal: Journal, n: int) -> None:
    open_sale(journal, f"r{n}", payment_code("0001", n))


def _held(state: Path, digest: bytes) -> list[str]:
    return sorted(f.name for f in state.iterdir() if f.is_file() and digest in f.read_bytes())


def test_a_sale_does_not_wait_for_the_workers_checkpoint_held_back_by_a_reader(
    tmp_path: Path,
) -> None:
    clock = KioskClocks()
    journal = Journal(tmp_path, wall_clock=clock, boot_clock=clock.boot)
    # Whatever a statement may wait for another connection, the checkpoint must not.
    journal._conn.execute("PRAGMA busy_timeout = 60000")
    _sell(journal, 1)
    first = journal.code_digest(payment_code("0001", 1))
    clock.advance(CODE_REUSE_WINDOW_S + 60)
    # A reader in another process keeps a snapshot open, until the next customer is served.
    reader = sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM transactions").fetchone()
    _sell(journal, 2)  # its commit drops the first code's hash: the worker checkpoints next

    checkpointing = threading.Event()
    journal._conn.set_trace_callback(
        lambda sql: checkpointing.set() if "wal_checkpoint" in sql else None
    )
    worker = threading.Thread(target=journal.forget_codes, daemon=True)
    worker.start()
    assert checkpointing.wait(WAIT_S)
    sold = threading.Event()
    customer = threading.Thread(target=lambda: (_sell(journal, 3), sold.set()), daemon=True)
    customer.start()
    served = sold.wait(WAIT_S)
    reader.execute("COMMIT")
    reader.close()
    worker.join(WAIT_S)
    customer.join(WAIT_S)
    journal._conn.set_trace_callback(None)
    assert served, (
        "a sale's commit waited for the journal worker's WAL checkpoint, which waited under "
        "the journal's lock for a reader: every scan would hang behind it, pass after pass"
    )
    # The reader gone, the next pass takes the old page images out of the WAL.
    journal.forget_codes()
    assert _held(tmp_path, first) == []
    journal.close()
