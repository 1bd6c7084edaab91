"""The offline journal: every transaction and every money-moving request, durable before it
is sent (SQLite, WAL, synchronous=FULL), so a restart can resume what was in flight.

A journal file that is not sound stops the kiosk with a clear message; it is never
overwritten or recreated. The buyer's payment code never reaches it (SPEC rule 6): a
transaction keeps the code's last 4 digits only. A journal written by an older firmware that
kept whole codes is scrubbed when it is opened (`secure_delete` zeroes the freed bytes, and
the WAL is checkpointed and truncated at once).

A journal lives for years: its schema is `PRAGMA user_version`, and an older one is brought
forward when opened for writing, one step of `MIGRATIONS` at a time, each in one commit; a
newer one is refused and left untouched. Final transactions past `journal.keep_days` fold into
per-day totals (`fold_old`), so the file stays bounded. A person settles a transaction in
`attention` with `retry_attention` (back to the worker) or `resolve_attention` (final), each
recorded with who and when.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kiosk.boot_clock import BootClock, BootStamp, system_boot_clock
from kiosk.errors import ActionRefused, JournalCorrupt, JournalError, JournalTooNew
from kiosk.log import mask_codes
from kiosk.payment_code import CODE_REUSE_WINDOW_S, SeenCode, code_digest

JOURNAL_FILE = "journal.sqlite3"


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
    RESOLVED = "resolved"  # was in attention; a person settled it outside the kiosk


FINAL_STATES = frozenset(
    {TxnState.VENDED, TxnState.DECLINED, TxnState.CANCELLED, TxnState.REFUNDED, TxnState.RESOLVED}
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

    def export(self, actions: Sequence[OperatorAction] = ()) -> dict[str, Any]:
        """The SPEC section 5 view: the code masked while open, null once final; with `note`
        and the operator `actions` taken on it, oldest first."""
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
            "actions": [a.export() for a in actions],
        }


class Action(enum.StrEnum):
    """What a person did to a transaction in attention."""

    RETRY = "retry"  # back into the worker's hands
    RESOLVE = "resolve"  # settled outside the kiosk: final


@dataclass(frozen=True)
class OperatorAction:
    """One operator action, as recorded with its transaction's change (schema 3)."""

    ref: str
    action: Action
    by: str  # the Unix user, or the name given
    at: str  # ISO 8601, UTC
    from_state: str
    to_state: str
    note: str | None = None

    def export(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "by": self.by,
            "at": self.at,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "note": self.note,
        }


@dataclass(frozen=True)
class DailyTotal:
    """Final transactions of one day (UTC, by when they were made), item, outcome (their final
    state) and currency, folded into a count and a sum once past `keep_days` (schema 3)."""

    day: str  # YYYY-MM-DD
    item: str
    outcome: str
    currency: str
    count: int
    amount: Decimal


@dataclass(frozen=True)
class FoldResult:
    folded: int  # rows folded into the totals and deleted
    skipped: int  # final rows past keep_days that cannot be read, so are kept as they are
    more: bool  # the budget ran out with more to fold


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

# Hashes of codes older than rule 7's window: dropped with each new sale's commit, and by the
# journal worker when no sale follows, as `SeenCode.age` has it (schema 4). A hash stamped in
# this boot ages by the boot clock, which no step of the wall clock moves. One of another boot
# was stamped before this boot began: it is old once this boot's clock is past the window, or
# by the wall clock before that. One from an older firmware (no boot stamp) or with a boot
# stamp ahead of this boot's clock ages by the wall clock. Parameters: `_forget_args`.
_OLD_CODE = (
    "CASE WHEN boot_id = :boot AND boot_s <= :boot_now THEN boot_s < :boot_cutoff "
    "WHEN boot_id <> :boot THEN :boot_past_window OR seen_at < :wall_cutoff "
    "ELSE seen_at < :wall_cutoff END"
)
FORGET_OLD_CODES = f"DELETE FROM recent_codes WHERE {_OLD_CODE}"


def _forget_args(now_wall: float, boot: BootStamp | None) -> dict[str, Any]:
    """The clocks of FORGET_OLD_CODES now (without a boot clock, every hash ages by the wall)."""
    return {
        "boot": None if boot is None else boot.boot_id,
        "boot_now": None if boot is None else boot.seconds,
        "boot_cutoff": None if boot is None else boot.seconds - CODE_REUSE_WINDOW_S,
        "boot_past_window": boot is not None and boot.seconds > CODE_REUSE_WINDOW_S,
        "wall_cutoff": now_wall - CODE_REUSE_WINDOW_S,
    }


# Schema 1, as the first firmware made it: every journal starts here and takes the steps below.
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

# SQLite keeps up to this much of the journal's pages in memory per connection (its default is
# 2000 KiB). A sale touches a few pages at the journal's end; a year of sales would otherwise
# fill the whole default with pages that start-up's check and the reports read once.
PAGE_CACHE_KIB = 256
# While `quick_check` reads every page once: a small cache checks as fast, and a connection
# that goes on reading (the figures' own) keeps no cache full of pages read only once.
CHECK_CACHE_KIB = 64

# How long a statement waits for another connection's lock (a reader, `kiosk journal` in
# another process) before it fails busy.
BUSY_TIMEOUT_MS = 5000

FIGURES_LOOK_PAST = 50  # Journal.figures: rows from before today read before it stops


def _mask_request_details(conn: sqlite3.Connection) -> None:
    """Gateway text kept by a firmware that did not mask it yet (schema 1 before rule 6 was
    applied to error text): any code-like run of digits is cut to its last 4."""
    rows = conn.execute("SELECT id, detail FROM requests WHERE detail IS NOT NULL").fetchall()
    for row_id, detail in rows:
        masked = mask_codes(str(detail))
        if masked != detail:
            conn.execute("UPDATE requests SET detail=? WHERE id=?", (masked, row_id))


@dataclass(frozen=True)
class Migration:
    """One forward step: from schema `to - 1` to `to`, in one commit with its version."""

    to: int
    what: str
    sql: str
    also: Callable[[sqlite3.Connection], None] | None = None  # after the SQL, same commit

    def statements(self) -> list[str]:
        return [s.strip() for s in self.sql.split(";") if s.strip()]


# Forward-only, in order: each journal, new or years old, takes every step past its version.
# Never edit a step once released; a change of schema is a new step at the end.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "each transaction names its merchant (partner, gateway); keyed hashes of recent codes; "
        "the whole codes schema 1 kept for open transactions erased (secure_delete is on)",
        """
UPDATE transactions SET buyer_code=NULL WHERE buyer_code IS NOT NULL;
ALTER TABLE transactions ADD COLUMN partner TEXT;
ALTER TABLE transactions ADD COLUMN gateway TEXT;
CREATE TABLE IF NOT EXISTS recent_codes (digest BLOB PRIMARY KEY, seen_at REAL NOT NULL);
""",
    ),
    Migration(
        3,
        "operator actions on attention; per-day totals of folded transactions; the version "
        "kept in PRAGMA user_version too; request details masked again",
        """
CREATE TABLE operator_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    at TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    note TEXT
);
CREATE INDEX operator_actions_ref ON operator_actions (ref);
CREATE TABLE daily_totals (
    day TEXT NOT NULL,
    item TEXT NOT NULL,
    outcome TEXT NOT NULL,
    currency TEXT NOT NULL,
    count INTEGER NOT NULL,
    amount TEXT NOT NULL,
    PRIMARY KEY (day, item, outcome, currency)
);
CREATE INDEX transactions_age ON transactions (final, updated_at);
CREATE INDEX transactions_created ON transactions (created_at);
""",
        also=_mask_request_details,
    ),
    Migration(
        4,
        "each recent code's hash stamped with the boot clock too (boot id, CLOCK_BOOTTIME "
        "seconds), so its age survives a restart whatever the wall clock did; NULL in the rows "
        "of schema 3, which age by the wall clock",
        """
ALTER TABLE recent_codes ADD COLUMN boot_id TEXT;
ALTER TABLE recent_codes ADD COLUMN boot_s REAL;
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].to
assert [m.to for m in MIGRATIONS] == list(range(2, SCHEMA_VERSION + 1)), "steps out of order"

# Totals are folded a batch at a time, each batch one commit: a sale waits for one batch at most.
FOLD_BATCH = 200


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _wall_now() -> float:
    return time.time()  # looked up at each call: a test may stand in for the clock


class Journal:
    """The durable record of every transaction. Thread-safe (one connection, one lock).

    `read_only` reads this firmware's schema or an older one, as it is. Opened for writing, an
    older journal is migrated forward first; with `migrate=False` (a command beside a running
    `kiosk run`) one that is not at this firmware's schema is refused instead. `wall_clock`
    (epoch seconds) stamps the records; `boot_clock` (the kernel's, by default) stamps the
    hashes of codes sold beside it, and ages them (rule 7)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        read_only: bool = False,
        migrate: bool = True,
        wall_clock: Callable[[], float] | None = None,
        boot_clock: BootClock | None = None,
    ) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        self._lock = threading.RLock()
        self._closed = False
        self._time = wall_clock or _wall_now
        self._boot_clock = boot_clock or system_boot_clock()
        self._schema = SCHEMA_VERSION
        self._code_key = b""  # made (or read) when opened for writing
        self._forgotten_in_wal = 0  # hashes dropped whose old page images the WAL still holds
        # Set when forget_codes could not truncate the WAL: a reader holds it back.
        self.wal_held_back = False
        # Told of every committed change of a transaction's state (before: None for a new one).
        self._watchers: list[Callable[[Transaction | None, Transaction], None]] = []
        self._conn = self._open(read_only, migrate)

    def _now_iso(self) -> str:
        return _iso(self._time())

    @property
    def schema(self) -> int:
        """The schema of the journal as opened (older than SCHEMA_VERSION only read-only)."""
        return self._schema

    # -- opening ---------------------------------------------------------------------------

    def _connect(self, mode: str) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                f"file:{self.path}?mode={mode}",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None

    def _open(self, read_only: bool, migrate: bool) -> sqlite3.Connection:
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
        version = 0  # a new file
        probe: sqlite3.Connection | None = None
        if exists:
            # Looked at read-only first: a journal that is refused is left as it was (a
            # connection that could write would checkpoint its WAL on close).
            probe = self._connect("ro")
            try:
                self._check_sound(probe)
                version = self._version_of(probe)
                if version > SCHEMA_VERSION:
                    raise JournalTooNew(
                        f"journal {self.path} has schema {version}, newer than this firmware's "
                        f"{SCHEMA_VERSION} (a later firmware wrote it); it was left untouched — "
                        "run the firmware that wrote it, or move it aside to start a new journal"
                    )
                if read_only and version == 0:
                    raise JournalCorrupt(f"journal {self.path} has no kiosk schema (empty)")
            except JournalError:
                probe.close()
                raise
            except sqlite3.DatabaseError as exc:
                probe.close()
                raise self._classify(exc) from None
            if read_only:
                self._schema = version
                return probe
            probe.close()
        if not migrate and version != SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} is at schema {version or 'none'}; this firmware's "
                f"`kiosk run` brings it to schema {SCHEMA_VERSION} when it starts — start it "
                "once, then try again"
            )
        conn = self._connect("rwc")
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            if version <= 1:
                self._begin_at_schema_1(conn)
            if version < SCHEMA_VERSION and self._migrate(conn):
                # Old page images (schema 1 kept whole codes) leave the WAL at once.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._schema = self._version_of(conn)
            if self._schema != SCHEMA_VERSION:  # another process moved it on meanwhile
                raise JournalTooNew(
                    f"journal {self.path} has schema {self._schema}, this firmware writes "
                    f"{SCHEMA_VERSION}; it was left as it is"
                )
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
            conn.execute(f"PRAGMA cache_size = -{CHECK_CACHE_KIB}")
            rows = conn.execute("PRAGMA quick_check").fetchall()
            conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        except sqlite3.DatabaseError as exc:
            raise self._classify(exc) from None
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise JournalCorrupt(
                f"journal {self.path} failed its integrity check ({problems[0]}"
                f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                "it was left untouched — copy it off for recovery, then move it aside"
            )

    def _version_of(self, conn: sqlite3.Connection) -> int:
        """The journal's schema; 0 for an empty database. From schema 3 on it is kept in
        `PRAGMA user_version`; schemas 1 and 2 kept it in `meta` only (user_version 0)."""
        (user_version,) = conn.execute("PRAGMA user_version").fetchone()
        if user_version:
            return int(user_version)
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables:
            return 0
        if not tables & {"meta", "transactions"}:
            raise JournalCorrupt(
                f"journal {self.path} is an SQLite database but not a kiosk journal (tables: "
                f"{', '.join(sorted(tables)[:5])}); it was left untouched — move it aside"
            )
        row = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            return 1  # a schema-1 firmware stopped between making its tables and naming them
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            version = 0
        if version < 1:
            raise JournalCorrupt(
                f"journal {self.path} names its schema {row[0]!r}, not a schema number; "
                "it was left untouched"
            )
        return version

    def _begin_at_schema_1(self, conn: sqlite3.Connection) -> None:
        """A new file gets schema 1 (and is then migrated like any older journal). Also
        completes a schema-1 journal whose first firmware stopped while making it."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (s.strip() for s in _SCHEMA.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1')")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> bool:
        """Bring an older journal forward, one step of MIGRATIONS at a time, each in one
        commit with its version (in user_version, and in `meta` for a firmware of schema 1 or
        2, which reads only that and so refuses a journal it cannot write). True if it took a
        step. Never backwards: a newer journal was refused before this, untouched."""
        stepped = False
        for step in MIGRATIONS:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._version_of(conn) >= step.to:  # read under the write lock
                    conn.execute("ROLLBACK")
                    continue
                for statement in step.statements():
                    conn.execute(statement)
                if step.also is not None:
                    step.also(conn)
                conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(step.to),))
                conn.execute(f"PRAGMA user_version = {int(step.to)}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            stepped = True
        return stepped

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

    def boot_stamp(self) -> BootStamp | None:
        """The boot clock now, as the journal stamps and ages the codes' hashes by it; None
        where there is none (the wall clock alone then)."""
        return self._boot_clock()

    @property
    def boot_clock_unavailable(self) -> str | None:
        """Why there is no boot clock to stamp the codes' hashes with, or None if there is."""
        if self._boot_clock() is not None:
            return None
        return getattr(self._boot_clock, "unavailable", None) or "the boot clock gives no time"

    def recent_codes(self, since: float, boot_id: str | None = None) -> list[SeenCode]:
        """Every code journaled with a sale since `since` (wall clock, epoch seconds), and
        every one stamped in boot `boot_id` whatever its wall stamp says: its keyed hash, when
        it was seen by the wall clock, and by the boot clock (None in a row of schema 3)."""
        if self._schema < 2:
            return []
        if self._schema < 4:
            sql = "SELECT digest, seen_at, NULL, NULL FROM recent_codes WHERE seen_at >= ?"
            args: tuple[Any, ...] = (since,)
        else:
            sql = (
                "SELECT digest, seen_at, boot_id, boot_s FROM recent_codes "
                "WHERE seen_at >= ? OR boot_id = ?"
            )
            args = (since, boot_id)
        with self._lock:
            try:
                rows = self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        return [
            SeenCode(
                bytes(d),
                float(t),
                None if b is None else str(b),
                None if s is None else float(s),
            )
            for d, t, b, s in rows
        ]

    def forget_codes(self) -> int:
        """Drop the hashes of codes seen longer ago than the reuse window (by the boot clock
        if seen in this boot, else by the wall clock); how many went. A hash, its key and the
        code's last 4 digits are enough to find the code again by trying the codes that end so
        (rule 6): they are kept for rule 7's window only, whether or not another sale follows.
        The old page images that hold them leave too: the WAL is truncated after this call or
        a sale's commit dropped any (one that readers hold back is tried at the next call). A
        look only, without a write, when none is that old and none is left in the WAL."""
        if self._schema < 4:  # a journal opened for writing is at this firmware's schema
            return 0
        args = _forget_args(self._time(), self._boot_clock())
        with self._lock:
            try:
                old = self._conn.execute(
                    f"SELECT 1 FROM recent_codes WHERE {_OLD_CODE} LIMIT 1", args
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
            if old is None and not self._forgotten_in_wal:
                return 0
        gone = 0
        if old is not None:
            with self._write() as conn:
                gone = conn.execute(FORGET_OLD_CODES, args).rowcount
        with self._lock:
            self._forgotten_in_wal += gone
            # Under the lock every sale's commit waits for: never wait for a reader here (a
            # `kiosk journal` listing, a backup); one that holds the WAL back is outwaited
            # pass by pass instead.
            self.wal_held_back = not self._truncate_wal(wait_for_readers=False)
            if not self.wal_held_back:
                self._forgotten_in_wal = 0
        return int(gone)

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
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    # A commit that failed (busy, I/O) may leave its transaction open; the
                    # next write must not find itself inside it.
                    if self._conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
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
        meanwhile: Callable[[], None] | None = None,
    ) -> Transaction:
        """Record a new scan's payment in state `paying`, and with it (one commit, one fsync)
        the first request about to be sent, if given, and the keyed hash of its code (for
        rule 7 across a restart, stamped by the wall and the boot clock; hashes older than the
        reuse window are pruned then too). `meanwhile` is called as the commit is about to be
        made durable, to start work on another thread that may run beside the fsync."""
        seen_at = self._time()
        boot = self._boot_clock() if code_digest is not None else None
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
                # What this drops stays in the WAL's old page images until forget_codes.
                self._forgotten_in_wal += conn.execute(
                    FORGET_OLD_CODES, _forget_args(seen_at, boot)
                ).rowcount
                conn.execute(
                    "INSERT OR REPLACE INTO recent_codes (digest, seen_at, boot_id, boot_s) "
                    "VALUES (?, ?, ?, ?)",
                    (
                        code_digest,
                        seen_at,
                        None if boot is None else boot.boot_id,
                        None if boot is None else boot.seconds,
                    ),
                )
            if meanwhile is not None:
                meanwhile()  # in the block: should it fail, nothing is committed
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
        updated = replace(txn, attempts=txn.attempts + 1, updated_at=self._now_iso(), **changes)
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
        updated = (
            txn if sent else replace(txn, attempts=txn.attempts - 1, updated_at=self._now_iso())
        )
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
        updated = replace(txn, updated_at=self._now_iso(), **changes)
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

    # -- a person's actions on a transaction in attention ------------------------------------

    def retry_attention(self, ref: str, by: str) -> Transaction:
        """Hand a transaction in attention back to the journal worker: to `refunding` (the
        same refund id, so Alipay cannot refund twice) when a refund was asked, else to
        `cancelling`, where every reversal starts. The worker reads the journal on each pass,
        so a running `kiosk run` takes it up on its next pass."""
        return self._act(ref, Action.RETRY, by, None)

    def resolve_attention(self, ref: str, by: str, note: str) -> Transaction:
        """A person settled a transaction in attention outside the kiosk: `resolved`, final,
        never touched by the worker again."""
        return self._act(ref, Action.RESOLVE, by, note)

    def _act(self, ref: str, action: Action, by: str, note: str | None) -> Transaction:
        if self._schema < 3:
            raise JournalError(f"journal {self.path} is at schema {self._schema}: no actions")
        select = f"SELECT {', '.join(_COLUMNS)} FROM transactions WHERE ref=?"
        with self._write() as conn:  # the state is read and changed under one write lock
            row = conn.execute(select, (ref,)).fetchone()
            if row is None:
                raise ActionRefused(f"no transaction {ref} in the journal {self.path}")
            try:
                txn = self._from_row(tuple(row))
            except JournalCorrupt as exc:
                raise ActionRefused(f"{exc}: a person must look at the journal itself") from None
            if txn.state is not TxnState.ATTENTION:
                verb = "retried" if action is Action.RETRY else "resolved"
                why = (
                    "it is final"
                    if txn.final
                    else "the kiosk is still working on it (see `kiosk journal`)"
                )
                raise ActionRefused(
                    f"{ref} is {txn.state.value}, not in attention: {why}; only a transaction "
                    f"in attention can be {verb}"
                )
            if action is Action.RESOLVE:
                to = TxnState.RESOLVED
            else:
                to = TxnState.REFUNDING if txn.refund_id else TxnState.CANCELLING
            updated = replace(txn, state=to, updated_at=self._now_iso())
            self._update(conn, updated)
            conn.execute(
                "INSERT INTO operator_actions "
                "(ref, action, actor, at, from_state, to_state, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ref, action.value, by, updated.updated_at, txn.state.value, to.value, note),
            )
        return updated

    # -- retention: old final transactions fold into daily totals ---------------------------

    def fold_old(
        self,
        keep_days: int,
        *,
        max_rows: int = 10_000,
        batch: int = FOLD_BATCH,
        stop: Callable[[], bool] = lambda: False,
    ) -> FoldResult:
        """Fold final transactions that last changed more than `keep_days` ago into the daily
        totals and delete them (with their requests and actions): a batch at a time, each
        batch one commit, so a total never counts a row that is still there or misses one that
        is gone. At most `max_rows` per call (`more` says if some are left). Unfinished rows
        and rows in attention are never folded; a final row that cannot be read is kept.

        "Now" is the wall clock, but never later than the newest change in the journal: a
        clock set years ahead does not fold yesterday's sales."""
        folded = skipped = 0
        after_seq = 0
        final = tuple(s.value for s in FINAL_STATES)
        while folded + skipped < max_rows and not stop():
            with self._write() as conn:
                cutoff = self._fold_cutoff(conn, keep_days)
                rows = conn.execute(
                    "SELECT seq, ref, created_at, item, state, currency, amount FROM transactions "
                    f"WHERE final=1 AND state IN ({', '.join('?' for _ in final)}) "
                    "AND updated_at < ? AND seq > ? ORDER BY seq LIMIT ?",
                    (*final, cutoff, after_seq, min(batch, max_rows - folded - skipped)),
                ).fetchall()
                if not rows:
                    return FoldResult(folded, skipped, more=False)
                after_seq = rows[-1][0]
                totals: dict[tuple[str, str, str, str], tuple[int, Decimal]] = {}
                gone: list[tuple[int, str]] = []
                for seq, ref, created_at, item, state, currency, amount in rows:
                    try:
                        day = date.fromisoformat(str(created_at)[:10]).isoformat()
                        value = Decimal(str(amount))
                        if not value.is_finite():
                            raise InvalidOperation(amount)
                    except (ValueError, InvalidOperation):
                        skipped += 1
                        continue
                    key = (day, str(item), str(state), str(currency))
                    count, total = totals.get(key, (0, Decimal(0)))
                    totals[key] = (count + 1, total + value)
                    gone.append((seq, ref))
                for key, (count, total) in totals.items():
                    old = conn.execute(
                        "SELECT count, amount FROM daily_totals "
                        "WHERE day=? AND item=? AND outcome=? AND currency=?",
                        key,
                    ).fetchone()
                    if old is not None:
                        count, total = count + int(old[0]), total + Decimal(old[1])
                    conn.execute(
                        "INSERT OR REPLACE INTO daily_totals "
                        "(day, item, outcome, currency, count, amount) VALUES (?, ?, ?, ?, ?, ?)",
                        (*key, count, str(total)),
                    )
                if gone:
                    marks = ", ".join("?" for _ in gone)
                    refs = [ref for _, ref in gone]
                    conn.execute(f"DELETE FROM requests WHERE ref IN ({marks})", refs)
                    conn.execute(f"DELETE FROM operator_actions WHERE ref IN ({marks})", refs)
                    conn.execute(
                        f"DELETE FROM transactions WHERE seq IN ({marks})", [s for s, _ in gone]
                    )
                folded += len(gone)
        return FoldResult(folded, skipped, more=True)

    def _fold_cutoff(self, conn: sqlite3.Connection, keep_days: int) -> str:
        now = self._now_iso()
        (newest,) = conn.execute("SELECT MAX(updated_at) FROM transactions").fetchone()
        if isinstance(newest, str) and newest < now:
            try:
                stamp = datetime.fromisoformat(newest.replace("Z", "+00:00")).timestamp()
                now = _iso(stamp)
            except ValueError:
                pass  # an unreadable stamp: the wall clock it is
        moment = datetime.fromisoformat(now.replace("Z", "+00:00")) - timedelta(days=keep_days)
        return _iso(moment.timestamp())

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

    def operator_actions(
        self, refs: Iterable[str] | None = None
    ) -> dict[str, list[OperatorAction]]:
        """The operator actions by ref, oldest first: of `refs`, or all (none before schema
        3). A person's actions are few, and leave with their transactions: read them all."""
        if self._schema < 3:
            return {}
        wanted = None if refs is None else set(refs)
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT ref, action, actor, at, from_state, to_state, note "
                    "FROM operator_actions ORDER BY id"
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        found: dict[str, list[OperatorAction]] = {}
        for ref, action, actor, at, from_state, to_state, note in rows:
            if wanted is not None and ref not in wanted:
                continue
            try:
                kind = Action(action)
            except ValueError:
                continue  # a later firmware's action: not this one's to show
            found.setdefault(ref, []).append(
                OperatorAction(ref, kind, actor, at, from_state, to_state, note)
            )
        return found

    def sales(
        self,
        since: date | None = None,
        until: date | None = None,
        unreadable: list[UnreadableRow] | None = None,
    ) -> tuple[list[Transaction], list[DailyTotal]]:
        """The transactions made from day `since` to day `until` (UTC, both included) and the
        daily totals of those days, read in one snapshot: a fold between the two reads can
        neither count a transaction twice nor lose it."""
        where, args = [], []
        if since is not None:
            where.append("created_at >= ?")
            args.append(since.isoformat())
        if until is not None:
            where.append("created_at < ?")
            args.append((until + timedelta(days=1)).isoformat())
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    rows = list(reversed(self._select(clause, tuple(args), unreadable=unreadable)))
                    totals = self._daily_totals(since, until)
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        return rows, totals

    def _daily_totals(self, since: date | None, until: date | None) -> list[DailyTotal]:
        if self._schema < 3:
            return []
        rows = self._conn.execute(
            "SELECT day, item, outcome, currency, count, amount FROM daily_totals "
            "WHERE day >= ? AND day <= ? ORDER BY day, item, outcome, currency",
            ((since or date.min).isoformat(), (until or date.max).isoformat()),
        ).fetchall()
        found = []
        for day, item, outcome, currency, count, amount in rows:
            try:
                found.append(DailyTotal(day, item, outcome, currency, int(count), Decimal(amount)))
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise JournalCorrupt(
                    f"journal {self.path}: the total of {day} {item} {outcome} is unreadable "
                    f"({exc})"
                ) from None
        return found

    # -- closing ---------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Fold the WAL into the main file and truncate it (old page images gone)."""
        with self._lock:
            if not self._closed:
                self._truncate_wal(wait_for_readers=True)

    def _truncate_wal(self, wait_for_readers: bool) -> bool:
        """Fold the WAL into the main file and truncate it; False if a reader held it back
        (without `wait_for_readers`, at once; with it, after the busy timeout). Under the lock."""
        if not wait_for_readers:
            self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            raise self._classify(exc) from None
        finally:
            if not wait_for_readers:
                self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return not busy

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
                (self._now_iso(),),
            )

    def attention_refs(self) -> tuple[str, ...]:
        """The refs of the transactions that need a person, sorted (through the
        open-transactions index: no day's sales are read)."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT ref FROM transactions WHERE final=0 AND state='attention'"
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        return tuple(sorted(str(ref) for (ref,) in rows))

    def figures(self, day_start: str) -> JournalFigures:
        """What telemetry reports (SPEC section 8): the refs that need a person, how many
        transactions are unfinished, sales vended since `day_start` (ISO UTC, as created_at
        is written) and when the last one was. Read through the open-transactions index and
        from the newest row back, so a journal of years stays quick to ask."""
        with self._lock:
            attention = self.attention_refs()
            try:
                (open_count,) = self._conn.execute(
                    "SELECT COUNT(*) FROM transactions WHERE final=0"
                ).fetchone()
                sales_today = 0
                amount = Decimal(0)
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
                    if state == "vended":  # summed as read: a busy day is not held in a list
                        sales_today += 1
                        # An unreadable amount is the reader's problem, not telemetry's.
                        with contextlib.suppress(ArithmeticError):
                            amount += Decimal(amount_text)
                last = self._conn.execute(
                    "SELECT updated_at FROM transactions WHERE state='vended' "
                    "ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._classify(exc) from None
        return JournalFigures(
            unfinished=int(open_count) - len(attention),
            attention_refs=attention,
            sales_today=sales_today,
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
