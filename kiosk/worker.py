"""The journal worker: drives every unfinished transaction to a final state in the background,
across restarts and network outages, with backoff and jitter between tries.

One worker lives for the whole process. It owns the retry schedule (in memory, on the
monotonic clock: a wall-clock jump never stalls a reversal) and the flow it settles with; a
reloaded config reaches it through `use()`, which takes effect at the start of its next pass,
never in the middle of settling a transaction.

It also keeps the journal bounded: at its first pass and then once a day (monotonic), after
settling what was due, final transactions older than `keep_days` fold into daily totals — on
this thread, never on a sale's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kiosk.errors import JournalError
from kiosk.journal import FINAL_STATES, Journal, Transaction, TxnState, UnreadableRow
from kiosk.log import event
from kiosk.payment import PaymentFlow

log = logging.getLogger("kiosk.worker")

# Past either of these a transaction raises one alarm: a person should look at it. The worker
# keeps retrying it at the capped interval and never drops it.
ALARM_AFTER_TRIES = 50
ALARM_AFTER_AGE_S = 24 * 3600.0
MAX_DOUBLINGS = 30  # 2**30 times any base is far past any cap: the backoff cannot overflow
FOLD_EVERY_S = 24 * 3600.0  # retention: how often old final transactions are folded
FOLD_RETRY_S = 3600.0  # after a fold that failed
FOLD_ROWS_PER_PASS = 10_000  # more than that waits for the next pass: retries go first


@dataclass
class _Retry:
    due: float  # monotonic
    tries: int  # tries that left the transaction unfinished
    first_seen: float  # monotonic
    alarmed: bool = False


def backoff_s(tries: int, base_s: float, max_s: float) -> float:
    """How long to wait after `tries` unsuccessful tries (before jitter): doubling from
    `base_s`, never above `max_s`, and never an overflow however many tries."""
    doublings: int = min(max(tries - 1, 0), MAX_DOUBLINGS)
    return min(max_s, base_s * float(2**doublings))


class JournalWorker:
    """One thread. It wakes when told (new work, gateway back), when the next retry is due,
    or every `idle_s` to show it is alive — never a busy loop."""

    def __init__(
        self,
        flow: PaymentFlow | None,
        journal: Journal,
        *,
        on_backlog: Callable[[int], None] = lambda n: None,
        on_journal_error: Callable[[JournalError], None] = lambda e: None,
        on_retry_ceiling: Callable[[str, str | None], None] = lambda ref, message: None,
        idle_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0),
        alarm_after_tries: int = ALARM_AFTER_TRIES,
        alarm_after_age_s: float = ALARM_AFTER_AGE_S,
    ) -> None:
        """`flow` may be None until the keys are usable (`use()` hands one over later).
        `on_retry_ceiling(ref, message)` is told when a transaction passes the retry ceiling,
        and `(ref, None)` when such a one is finished."""
        self.flow = flow
        self.journal = journal
        self.on_backlog = on_backlog
        self.on_journal_error = on_journal_error
        self.on_retry_ceiling = on_retry_ceiling
        self.idle_s = idle_s
        self.alarm_after_tries = alarm_after_tries
        self.alarm_after_age_s = alarm_after_age_s
        self._clock = clock
        self._wall = wall_clock
        self._jitter = jitter
        self.last_beat = clock()
        self.backlog = 0
        self._schedule: dict[str, _Retry] = {}  # only the worker's thread touches it
        self._unreadable_alarmed: set[int] = set()  # seqs of rows already alarmed about
        self._next_flow: PaymentFlow | None = None
        self._lock = threading.Lock()  # guards _next_flow
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resume_all = True  # on start every unfinished transaction is due at once
        self._next_fold: float | None = None  # monotonic; None: at the first pass
        self._told_wal_held = False

    # -- control, from any thread -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-worker", daemon=True)
        self._thread.start()

    def use(self, flow: PaymentFlow) -> None:
        """Settle with this flow from the start of the next pass on. The worker owns it from
        now on, and closes its client when it is replaced or the worker stops."""
        with self._lock:
            unused, self._next_flow = self._next_flow, flow
        if unused is not None:
            unused.client.close()  # handed over but never used by any thread
        self._wake.set()

    def wake(self, resume_all: bool = False) -> None:
        """Look at the journal now; with `resume_all`, everything unfinished is due at once."""
        if resume_all:
            self._resume_all = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.alive():
            self._close_flows()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def retry_schedule(self) -> dict[str, tuple[float, int]]:
        """ref -> (due on the monotonic clock, tries so far); a copy, for tests and status."""
        return {ref: (r.due, r.tries) for ref, r in dict(self._schedule).items()}

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_beat = self._clock()
            try:
                wait_s = self.work_off_due()
            except JournalError as exc:
                event(log, "journal.error", level=logging.ERROR, error=str(exc))
                self.on_journal_error(exc)
                wait_s = self.idle_s
            except Exception:  # a bug must not kill the worker silently
                log.exception("journal worker pass failed")
                wait_s = self.idle_s
            self._wake.wait(max(wait_s, 0.01))
            self._wake.clear()

    def _take_new_flow(self) -> None:
        with self._lock:
            new, self._next_flow = self._next_flow, None
        if new is None:
            return
        old, self.flow = self.flow, new
        if old is not None and old is not new:
            old.client.close()
        event(log, "worker.flow_replaced")

    def _close_flows(self) -> None:
        with self._lock:
            pending, self._next_flow = self._next_flow, None
        for flow in (self.flow, pending):
            if flow is not None:
                flow.client.close()

    def work_off_due(self) -> float:
        """One pass: settle every transaction that is due, oldest first; return how long until
        the next one is. A failure settling one transaction never stops the others."""
        self._take_new_flow()
        flow = self.flow
        resume_all, self._resume_all = self._resume_all, False
        unreadable: list[UnreadableRow] = []
        pending = self.journal.unfinished(unreadable)
        self._alarm_unreadable(unreadable)
        if flow is None:  # no usable keys yet: nothing can be settled, only counted
            self._report_backlog(len(pending))
            return self.idle_s
        now = self._clock()
        for ref in set(self._schedule) - {t.ref for t in pending}:
            self._forget(ref)  # finished elsewhere (the foreground, or a person)
        journal_failed: JournalError | None = None
        left: list[Transaction] = []  # what is still unfinished after this pass
        for txn in pending:
            left.append(txn)
            if self._stop.is_set() or flow.stopping.is_set():
                continue  # winding down: counted, not settled
            if flow.owns(txn.ref):
                continue  # the foreground has it in hand
            retry = self._schedule.get(txn.ref)
            if retry is not None and not resume_all and retry.due > now:
                continue
            try:
                settled = flow.settle(txn)
            except JournalError as exc:
                journal_failed = journal_failed or exc
                event(log, "worker.settle_failed", level=logging.ERROR, ref=txn.ref, error=str(exc))
                settled = None
            except Exception as exc:  # a bug, or an answer nobody foresaw: this one only
                event(
                    log,
                    "worker.settle_failed",
                    level=logging.ERROR,
                    ref=txn.ref,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)).rstrip(),
                )
                settled = None
            self.last_beat = now = self._clock()
            if settled is not None and (
                settled.state in FINAL_STATES or settled.state is TxnState.ATTENTION
            ):
                self._forget(txn.ref)
                left.pop()
            else:
                self._back_off(txn, flow, now)
        if journal_failed is not None:
            self.on_journal_error(journal_failed)
        if not (self._stop.is_set() or flow.stopping.is_set()):
            self._fold_if_due(flow.settings.keep_days)
            self._forget_codes()
        # No second read of the journal: a sale that ends unfinished wakes the worker, and its
        # row is in the next pass.
        self._report_backlog(len(left))
        if flow.stopping.is_set():
            return self.idle_s  # the kiosk is winding down: nothing new is started
        due: list[float] = []
        for txn in left:
            if flow.owns(txn.ref):
                continue
            retry = self._schedule.get(txn.ref)
            if retry is None:
                return 0.0  # it appeared during the pass: due at once
            due.append(retry.due)
        if not due:
            return self.idle_s
        return min(self.idle_s, max(0.0, min(due) - self._clock()))

    def _forget_codes(self) -> None:
        """The hashes of codes past rule 7's window leave the journal (rule 6). A failure is
        logged and tried at the next pass; the sales' own writes tell a journal fault."""
        try:
            gone = self.journal.forget_codes()  # from the WAL's old pages too
        except Exception as exc:
            event(
                log,
                "journal.forget_codes_failed",
                level=logging.ERROR,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        if gone:
            event(log, "journal.codes_forgotten", level=logging.DEBUG, count=gone)
        if self.journal.wal_held_back != self._told_wal_held:
            # Said once each way: a reader (a `kiosk journal` command, a backup) that keeps
            # the WAL's old pages, hashes of codes past the window in them, is not silent.
            self._told_wal_held = self.journal.wal_held_back
            if self._told_wal_held:
                event(
                    log,
                    "journal.wal_held",
                    level=logging.WARNING,
                    effect="hashes of codes past rule 7's window stay in the WAL until the "
                    "reader lets go; tried at each pass",
                )
            else:
                event(log, "journal.wal_released")

    def _fold_if_due(self, keep_days: int) -> None:
        """Retention, at the first pass and then once a day. A fold that fails is logged and
        tried again in an hour; it never stops the pass, nor the sales (their own writes tell
        a journal fault)."""
        now = self._clock()
        if self._next_fold is not None and now < self._next_fold:
            return
        try:
            result = self.journal.fold_old(
                keep_days, max_rows=FOLD_ROWS_PER_PASS, stop=self._stop.is_set
            )
        except Exception as exc:
            self._next_fold = now + FOLD_RETRY_S
            event(
                log,
                "journal.fold_failed",
                level=logging.ERROR,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_s=FOLD_RETRY_S,
            )
            return
        self._next_fold = now if result.more else now + FOLD_EVERY_S
        if result.folded or result.skipped:
            event(
                log,
                "journal.folded",
                rows=result.folded,
                kept_unreadable=result.skipped,
                keep_days=keep_days,
                more=result.more,
            )

    def _alarm_unreadable(self, rows: list[UnreadableRow]) -> None:
        """A row this firmware cannot read is skipped (the others are settled all the same);
        a person must look at it: one alarm per row."""
        for row in rows:
            if row.seq in self._unreadable_alarmed:
                continue
            self._unreadable_alarmed.add(row.seq)
            event(
                log,
                "alarm",
                level=logging.ERROR,
                kind="unreadable_row",
                ref=row.ref,
                seq=row.seq,
                why=f"{row.why}; skipped, the others are settled; a person must look at it",
            )

    def _report_backlog(self, count: int) -> None:
        self.backlog = count
        self.on_backlog(count)

    def _forget(self, ref: str) -> None:
        retry = self._schedule.pop(ref, None)
        if retry is not None and retry.alarmed:
            self.on_retry_ceiling(ref, None)

    def _back_off(self, txn: Transaction, flow: PaymentFlow, now: float) -> None:
        retry = self._schedule.get(txn.ref)
        if retry is None:
            retry = self._schedule[txn.ref] = _Retry(due=now, tries=0, first_seen=now)
        retry.tries += 1
        settings = flow.settings
        delay = backoff_s(retry.tries, settings.retry_base_s, settings.retry_max_s)
        retry.due = now + delay * self._jitter()
        if not retry.alarmed:
            age_s = max(now - retry.first_seen, self._age_s(txn))
            if retry.tries >= self.alarm_after_tries or age_s >= self.alarm_after_age_s:
                retry.alarmed = True
                event(
                    log,
                    "alarm",
                    level=logging.ERROR,
                    kind="retry_ceiling",
                    ref=txn.ref,
                    state=txn.state.value,
                    tries=retry.tries,
                    age_s=round(age_s),
                    why="still unfinished after many tries; retried every "
                    f"{settings.retry_max_s:g} s at most, never dropped",
                )
                self.on_retry_ceiling(
                    txn.ref,
                    f"still {txn.state.value} after {retry.tries} tries and {round(age_s)} s",
                )

    def _age_s(self, txn: Transaction) -> float:
        """Seconds since the transaction was journaled (wall clock; 0 if unreadable)."""
        try:
            created = datetime.fromisoformat(txn.created_at.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        return max((self._wall() - created).total_seconds(), 0.0)
