"""The offline journal: every transaction and every money-moving request, durable before it
is sent (SQLite, WAL, synchronous=FULL), so a restart can resume what was in flight.

A journal file that is not sound stops the kiosk with a clear message; it is never
overwritten or recreated. The buyer's payment code never reaches it (SPEC rule 6): a
transaction keeps the code's last 4 digits only. A journal written by an older firmware that
kept whole codes is scrubbed when it is opened (`secure_delete` zeroes the freed bytes, and
the WAL is checkpointed and truncated at once).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from kiosk.errors import JournalCorrupt, JournalError
from kiosk.log import mask_codes
from kiosk.payment_code import CODE_REUSE_WINDOW_S, code_digest

JOURNAL_FILE = "journal.sqlite3"
# 2: each transaction names its merchant (partner, gateway); keyed hashes of recent codes.
SCHEMA_VERSION = 2


class TxnState(enum.StrEnum):
    """A transaction's state as the journal export shows it (SPEC section 5)."""

    PAYING = "paying"  # pay journaled, maybe sent
    QUERYING = "querying"  # outcome unknown: asking Alipay
    PAID = "paid"  # Alipay confirmed the charge
    VENDING = "vending"  # APPROVED sent, waiting for the vending side
    VENDED = "vended"
    DECLINED = "declined"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    REFUNDING = "refunding"
    REFUNDED = "refunded"
    ATTENTION = "attention"  # needs a person; an alarm was raised


FINAL_STATES = frozenset(
    {TxnState.VENDED, TxnState.DECLINED, TxnState.CANCELLED, TxnState.REFUNDED}
)
# States a worker keeps driving; ATTENTION has left the active set on purpose.
OPEN_STATES = frozenset(set(TxnState) - FINAL_STATES - {TxnState.ATTENTION})


@dataclass(frozen=True)
class Transaction:
    """One scan's payment, as journaled."""

    ref: str  # the partner_trans_id
    amount: Decimal
    currency: str
    item: str
    state: TxnState
    code_last4: str
    trans_create_time: str  # yyyyMMddHHmmss, Beijing time, as sent with the pay
    created_at: str
    updated_at: str
    error_code: str | None = None  # the last Alipay error code (or a kiosk reason)
    alipay_trans_id: str | None = None
    attempts: int = 0  # requests sent to the gateway
    refund_id: str | None = None
    note: str | None = None
    # The merchant it was paid to: the partner and the primary gateway URL. None (a row of
    # schema 1) is "as configured": taken as the current merchant's.
    partner: str | None = None
    gateway: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def export(self) -> dict[str, Any]:
        """The SPEC section 5 view: the code masked while open, null once final."""
        return {
            "ref": self.ref,
            "amount": str(self.amount),
            "currency": self.currency,
            "item": self.item,
            "state": self.state.value,
            "final": self.final,
            "code": self.error_code,
            "alipay_trans_id": self.alipay_trans_id,
            "buyer_code": None if self.final else "*" * 12 + self.code_last4,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "attempts": self.attempts,
            "note": self.note,
        }


_COLUMNS = [f.name for f in fields(Transaction)]
_MERCHANT_COLUMNS = ("partner", "gateway")  # added by schema 2


@dataclass(frozen=True)
class UnreadableRow:
    """A transaction row this firmware cannot understand (a newer firmware's state, a bit
    flip): skipped when reading, so it never stops the others from being settled."""

    seq: int
    ref: str | None
    why: str


# Columns of schema 1 that this firmware no longer writes (left NULL or at their default):
# buyer_code (whole codes: never stored now), cancel_timestamp_ms (fresh on every send),
# retry_count and next_retry_at (the worker schedules retries in memory, on the monotonic clock).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL UNIQUE,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    item TEXT NOT NULL,
    state TEXT NOT NULL,
    final INTEGER NOT NULL DEFAULT 0,
    code_last4 TEXT NOT NULL,
    trans_create_time TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    buyer_code TEXT,
    error_code TEXT,
    alipay_trans_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_timestamp_ms INTEGER,
    refund_id TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    next_retry_at REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS transactions_open ON transactions (final, seq);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL,
    kind TEXT NOT NULL,
    journaled_at TEXT NOT NULL,
    params TEXT NOT NULL,
    outcome TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS requests_ref ON requests (ref);
"""

FIGURES_LOOK_PAST = 50  # Journal.figures: rows from before today read before it stops

# Forward-only migrations: from schema N to N+1, each in one transaction with its version.
_MIGRATIONS: dict[int, str] = {
    # Schema 1 kept the whole code of an open transaction: erased (secure_delete is on).
    1: """
UPDATE transactions SET buyer_code=NULL WHERE buyer_code IS NOT NULL;
ALTER TABLE transactions ADD COLUMN partner TEXT;
ALTER TABLE transactions ADD COLUMN gateway TEXT;
CREATE TABLE IF NOT EXISTS recent_codes (digest BLOB PRIMARY KEY, seen_at REAL NOT NULL);
""",
}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _now_iso() -> str:
    return _iso(time.time())


class Journal:
    """The durable record of every transaction. Thread-safe (one connection, one lock)."""

    def __init__(self, state_dir: Path, *, read_only: bool = False) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        self._lock = threading.RLock()
        self._closed = False
        self._schema = SCHEMA_VERSION
        self._code_key = b""  # made (or read) when opened for writing
        # Told of every committed change of a transaction's state (before: None for a new one).
        self._watchers: list[Callable[[Transaction | None, Transaction], None]] = []
        self._conn = self._open(read_only)

    # -- opening ---------------------------------------------------------------------------

    def _open(self, read_only: bool) -> sqlite3.Connection:
        exists = self.path.exists()
        if read_only and not exists:
            raise JournalError(f"no journal at {self.path}")
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JournalError(
                    f"cannot create state directory {self.path.parent}: {exc}"
                ) from None
        elif not self.path.is_file():
            raise JournalCorrupt(f"journal {self.path} is not a regular file")
        uri = f"file:{self.path}?mode={'ro' if read_only else 'rwc'}"
        try:
            conn = sqlite3.connect(
                uri, uri=True, check_same_thread=False, isolation_level=None, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None
        try:
            if exists:
                self._check_sound(conn)
            if not read_only:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA secure_delete=ON")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.executescript(_SCHEMA)
                # A new file starts at schema 1 and is migrated like any older journal.
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1')")
                if self._migrate(conn):
                    # Old page images (schema 1 kept whole codes) leave the WAL at once.
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._schema = self._check_schema(conn)
            if not read_only:
                self._code_key = self._make_code_key(conn)
        except JournalError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._classify(exc) from None
        return conn

    def _check_sound(self, conn: sqlite3.Connection) -> None:
        with open(self.path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise JournalCorrupt(
                f"journal {self.path} is not an SQLite database (bad header); "
                "it was left untouched — move it aside to start a new journal"
            )
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._classify(exc) from None
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise JournalCorrupt(
                f"journal {self.path} failed its integrity check ({problems[0]}"
                f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                "it was left untouched — copy it off for recovery, then move it aside"
            )

    def _schema_of(self, conn: sqlite3.Connection) -> int | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(f"journal {self.path} has no kiosk schema: {exc}") from None
        try:
            return int(row[0]) if row is not None else None
        except (TypeError, ValueError):
            return None

    def _migrate(self, conn: sqlite3.Connection) -> bool:
        """Bring an older journal forward, one schema at a time, each step in one commit;
        True if it took a step. Never backwards: a newer journal is refused by
        `_check_schema`, untouched."""
        stepped = False
        while True:
            version = self._schema_of(conn)
            if version is None or version >= SCHEMA_VERSION or version not in _MIGRATIONS:
                return stepped
            stepped = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(None, (s.strip() for s in _MIGRATIONS[version].split(";"))):
                    conn.execute(statement)
                conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version + 1),))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _check_schema(self, conn: sqlite3.Connection) -> int:
        """The journal's schema: this firmware's, or (read-only) an older one it can read."""
        version = self._schema_of(conn)
        if version is None or not 1 <= version <= SCHEMA_VERSION:
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            raise JournalCorrupt(
                f"journal {self.path} has schema {row[0] if row else 'none'}, "
                f"this firmware reads {SCHEMA_VERSION}"
            )
        return version

    def _make_code_key(self, conn: sqlite3.Connection) -> bytes:
        """The key of the recent codes' hashes: random, made once, kept in the journal (so
        a restart still knows a code it saw); without it a hash tells nothing of a code."""
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('code_key', ?)",
            (os.urandom(32).hex(),),
        )
        row = conn.execute("SELECT value FROM meta WHERE key='code_key'").fetchone()
        return bytes.fromhex(row[0])

    @property
    def code_key(self) -> bytes:
        """The HMAC key of `recent_codes` (a journal opened for writing only)."""
        return self._code_key

    def code_digest(self, digits: str) -> bytes:
        return code_digest(self._code_key, digits)

    def recent_codes(self, since: float) -> list[tuple[bytes, float]]:
        """(keyed hash, wall-clock time seen) of every code journaled with a sale since
        `since` (epoch seconds)."""
        if self._schema < 2:
            return []
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT digest, seen_at FROM recent_codes WHERE seen_at >= ?", (since,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        return [(bytes(d), float(t)) for d, t in rows]

    def _classify(self, exc: sqlite3.Error) -> JournalError:
        text = str(exc)
        if "disk is full" in text or "disk I/O" in text or "readonly" in text:
            return JournalError(f"journal {self.path}: {text}")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return JournalCorrupt(f"journal {self.path} is unreadable: {text}; left untouched")
        if "malformed" in text or "not a database" in text:
            return JournalCorrupt(f"journal {self.path} is unreadable: {text}; left untouched")
        return JournalError(f"journal {self.path}: {text}")

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write: BEGIN IMMEDIATE ... COMMIT (fsync'd by synchronous=FULL)."""
        with self._lock:
            if self._closed:
                raise JournalError("journal is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._classify(exc) from None

    def open_transaction(
        self,
        *,
        ref: str,
        amount: Decimal,
        currency: str,
        item: str,
        code_last4: str,
        trans_create_time: str,
        first_request: tuple[str, dict[str, str]] | None = None,
        partner: str | None = None,
        gateway: str | None = None,
        code_digest: bytes | None = None,
    ) -> Transaction:
        """Record a new scan's payment in state `paying`, and with it (one commit, one fsync)
        the first request about to be sent, if given, and the keyed hash of its code (for
        rule 7 across a restart; hashes older than the reuse window are pruned then too)."""
        seen_at = time.time()
        now = _iso(seen_at)
        txn = Transaction(
            ref=ref,
            amount=amount,
            currency=currency,
            item=item,
            state=TxnState.PAYING,
            code_last4=code_last4[-4:],
            trans_create_time=trans_create_time,
            created_at=now,
            updated_at=now,
            attempts=1 if first_request else 0,
            partner=partner,
            gateway=gateway,
        )
        row = self._row(txn)
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO transactions ({', '.join(row)}) "
                f"VALUES ({', '.join('?' for _ in row)})",
                list(row.values()),
            )
            if first_request is not None:
                self._insert_request(conn, txn, *first_request)
            if code_digest is not None:
                conn.execute(
                    "DELETE FROM recent_codes WHERE seen_at < ?",
                    (seen_at - CODE_REUSE_WINDOW_S,),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO recent_codes (digest, seen_at) VALUES (?, ?)",
                    (code_digest, seen_at),
                )
        self._changed(None, txn)
        return txn

    @staticmethod
    def _insert_request(
        conn: sqlite3.Connection, txn: Transaction, kind: str, params: dict[str, str]
    ) -> None:
        conn.execute(
            "INSERT INTO requests (ref, kind, journaled_at, params) VALUES (?, ?, ?, ?)",
            (txn.ref, kind, txn.updated_at, json.dumps(params, sort_keys=True)),
        )

    @staticmethod
    def _record_outcome(conn: sqlite3.Connection, ref: str, outcome: str, detail: str) -> None:
        conn.execute(
            "UPDATE requests SET outcome=?, detail=? WHERE id = "
            "(SELECT MAX(id) FROM requests WHERE ref=?)",
            (outcome, mask_codes(detail)[:200], ref),
        )

    def before_request(
        self, txn: Transaction, kind: str, params: dict[str, str], **changes: Any
    ) -> Transaction:
        """Journal a request that is about to be sent (and any state change with it), durably,
        before it leaves the kiosk. Counts it in `attempts`."""
        updated = replace(txn, attempts=txn.attempts + 1, updated_at=_now_iso(), **changes)
        with self._write() as conn:
            self._update(conn, updated)
            self._insert_request(conn, updated, kind, params)
        self._changed(txn, updated)
        return updated

    def after_request(
        self, txn: Transaction, outcome: str, detail: str, *, sent: bool = True
    ) -> Transaction:
        """Note how the latest request of this transaction ended. One that never left the
        kiosk (no connection) is taken back out of `attempts`, in the same commit."""
        updated = txn if sent else replace(txn, attempts=txn.attempts - 1, updated_at=_now_iso())
        with self._write() as conn:
            self._record_outcome(conn, txn.ref, outcome, detail)
            if not sent:
                self._update(conn, updated)
        return updated

    def update(
        self,
        txn: Transaction,
        *,
        request_outcome: tuple[str, str] | None = None,
        **changes: Any,
    ) -> Transaction:
        """Move a transaction on. `request_outcome` (outcome, detail) notes how the latest
        request ended, in the same commit."""
        updated = replace(txn, updated_at=_now_iso(), **changes)
        with self._write() as conn:
            self._update(conn, updated)
            if request_outcome is not None:
                self._record_outcome(conn, txn.ref, *request_outcome)
        self._changed(txn, updated)
        return updated

    def watch(self, watcher: Callable[[Transaction | None, Transaction], None]) -> None:
        """Call `watcher(before, after)` after every committed change of a transaction's state
        (`before` is None for a new one), on the committing thread. It must return at once
        (telemetry only queues); an exception in it is logged, never the writer's problem."""
        self._watchers.append(watcher)

    def _changed(self, before: Transaction | None, after: Transaction) -> None:
        if before is not None and before.state is after.state:
            return
        for watcher in list(self._watchers):
            try:
                watcher(before, after)
            except Exception:  # committed already: the sale goes on whatever a reader does
                logging.getLogger("kiosk.journal").exception("journal watcher failed")

    def _update(self, conn: sqlite3.Connection, txn: Transaction) -> None:
        row = self._row(txn)
        ref = row.pop("ref")
        conn.execute(
            f"UPDATE transactions SET {', '.join(f'{k}=?' for k in row)} WHERE ref=?",
            [*row.values(), ref],
        )

    @staticmethod
    def _row(txn: Transaction) -> dict[str, Any]:
        row: dict[str, Any] = {name: getattr(txn, name) for name in _COLUMNS}
        row["amount"] = str(txn.amount)
        row["state"] = txn.state.value
        row["final"] = int(txn.final)
        return row

    # -- reading ---------------------------------------------------------------------------

    def _select(
        self,
        where: str,
        args: tuple[Any, ...] = (),
        limit: int | None = None,
        unreadable: list[UnreadableRow] | None = None,
    ) -> list[Transaction]:
        """The readable rows; a row this firmware cannot understand is skipped (and noted in
        `unreadable`), never the reason the others cannot be read."""
        columns = [
            f"NULL AS {c}" if c in _MERCHANT_COLUMNS and self._schema < 2 else c for c in _COLUMNS
        ]
        sql = f"SELECT seq, {', '.join(columns)} FROM transactions {where} ORDER BY seq DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            try:
                rows = self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        found: list[Transaction] = []
        for seq, *values in rows:
            try:
                found.append(self._from_row(tuple(values)))
            except JournalCorrupt as exc:
                if unreadable is not None:
                    ref = values[0] if isinstance(values[0], str) else None
                    unreadable.append(UnreadableRow(seq, ref, str(exc)))
        return found

    def _from_row(self, values: tuple[Any, ...]) -> Transaction:
        data = dict(zip(_COLUMNS, values, strict=True))
        try:
            data["amount"] = Decimal(data["amount"])
            data["state"] = TxnState(data["state"])
            txn = Transaction(**data)
        except (ValueError, ArithmeticError, TypeError) as exc:
            raise JournalCorrupt(
                f"journal {self.path}: transaction {data.get('ref')!r} is unreadable ({exc})"
            ) from None
        return txn

    def get(self, ref: str) -> Transaction | None:
        """The transaction, or None if there is none (or its row is unreadable)."""
        found = self._select("WHERE ref=?", (ref,))
        return found[0] if found else None

    def unfinished(self, unreadable: list[UnreadableRow] | None = None) -> list[Transaction]:
        """Every transaction a worker must still drive, oldest first. Rows that cannot be
        read are left out (and listed in `unreadable`, if given)."""
        skipped: list[UnreadableRow] = []
        found = self._select("WHERE final=0 AND state != 'attention'", unreadable=skipped)
        if unreadable is not None:
            unreadable.extend(reversed(skipped))
        return list(reversed(found))

    def listing(
        self,
        include_all: bool = False,
        recent: int = 20,
        unreadable: list[UnreadableRow] | None = None,
    ) -> list[Transaction]:
        """Newest first: all, or every unfinished one plus the last `recent` finished. Rows
        that cannot be read are listed in `unreadable`, if given."""
        if include_all:
            return self._select("", unreadable=unreadable)
        open_ = self._select("WHERE final=0", unreadable=unreadable)
        done = self._select("WHERE final=1", limit=recent, unreadable=unreadable)
        return sorted(open_ + done, key=lambda t: (t.created_at, t.ref), reverse=True)

    def requests_for(self, ref: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, journaled_at, params, outcome, detail FROM requests "
                "WHERE ref=? ORDER BY id",
                (ref,),
            ).fetchall()
        return [
            {"kind": k, "journaled_at": at, "params": json.loads(p), "outcome": o, "detail": d}
            for k, at, p, o, d in rows
        ]

    # -- closing ---------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Fold the WAL into the main file and truncate it (old page images gone)."""
        with self._lock:
            if not self._closed:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    raise self._classify(exc) from None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            # Read-only or busy: closing still releases the file.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._closed = True

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self, min_free_bytes: int = 1 << 20) -> None:
        """A real durable write (and room for more), to tell when a write fault is over:
        raises JournalError while the journal still cannot take a transaction."""
        try:
            free = os.statvfs(self.path.parent)
        except OSError as exc:
            raise JournalError(f"journal {self.path}: {exc.strerror or exc}") from None
        if free.f_bavail * free.f_frsize < min_free_bytes:
            raise JournalError(
                f"journal {self.path}: only {free.f_bavail * free.f_frsize} bytes free"
            )
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('writable_check', ?)",
                (_now_iso(),),
            )

    def figures(self, day_start: str) -> JournalFigures:
        """What telemetry reports (SPEC section 8): the refs that need a person, how many
        transactions are unfinished, sales vended since `day_start` (ISO UTC, as created_at
        is written) and when the last one was. Read through the open-transactions index and
        from the newest row back, so a journal of years stays quick to ask."""
        with self._lock:
            try:
                open_rows = self._conn.execute(
                    "SELECT ref, state FROM transactions WHERE final=0"
                ).fetchall()
                today: list[str] = []
                older_in_a_row = 0
                # Newest first; rows are written in time order, so stop a little past the
                # first ones from before today (a few more allow for a clock set back).
                for amount_text, created_at, state in self._conn.execute(
                    "SELECT amount, created_at, state FROM transactions ORDER BY seq DESC"
                ):
                    if created_at < day_start:
                        older_in_a_row += 1
                        if older_in_a_row >= FIGURES_LOOK_PAST:
                            break
                        continue
                    older_in_a_row = 0
                    if state == "vended":
                        today.append(amount_text)
                last = self._conn.execute(
                    "SELECT updated_at FROM transactions WHERE state='vended' "
                    "ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        attention = sorted(str(ref) for ref, state in open_rows if state == "attention")
        amount = Decimal(0)
        for text in today:
            try:
                amount += Decimal(text)
            except ArithmeticError:
                continue  # an unreadable amount is the reader's problem, not telemetry's
        return JournalFigures(
            unfinished=len(open_rows) - len(attention),
            attention_refs=tuple(attention),
            sales_today=len(today),
            amount_today=amount,
            last_sale_at=last[0] if last else None,
        )


@dataclass(frozen=True)
class JournalFigures:
    """The journal's side of the telemetry state payload (see `Journal.figures`)."""

    unfinished: int  # open and not in attention: the worker still drives them
    attention_refs: tuple[str, ...]
    sales_today: int  # vended since the start of the day
    amount_today: Decimal
    last_sale_at: str | None  # updated_at of the newest vended one
