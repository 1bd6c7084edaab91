"""The journal worker: drives every unfinished transaction to a final state in the background,
across restarts and network outages, with the flow's backoff between tries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kiosk.errors import JournalError
from kiosk.journal import Journal
from kiosk.log import event
from kiosk.payment import PaymentFlow

log = logging.getLogger("kiosk.worker")


class JournalWorker:
    """One thread. It wakes when told (new work, gateway back), when the next retry is due,
    or every `idle_s` to show it is alive — never a busy loop."""

    def __init__(
        self,
        flow: PaymentFlow,
        journal: Journal,
        *,
        on_backlog: Callable[[int], None] = lambda n: None,
        on_journal_error: Callable[[JournalError], None] = lambda e: None,
        idle_s: float = 10.0,
    ) -> None:
        self.flow = flow
        self.journal = journal
        self.on_backlog = on_backlog
        self.on_journal_error = on_journal_error
        self.idle_s = idle_s
        self.last_beat = time.monotonic()
        self.backlog = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resume_all = True  # on start every unfinished transaction is due at once

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-worker", daemon=True)
        self._thread.start()

    def wake(self, resume_all: bool = False) -> None:
        if resume_all:
            self._resume_all = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            try:
                wait_s = self.work_off_due()
            except JournalError as exc:
                event(log, "journal.error", level=logging.ERROR, error=str(exc))
                self.on_journal_error(exc)
                wait_s = self.idle_s
            except Exception:  # a bug must not kill the worker silently
                log.exception("journal worker step failed")
                wait_s = self.idle_s
            self._wake.wait(max(wait_s, 0.01))
            self._wake.clear()

    def work_off_due(self) -> float:
        """Settle every transaction that is due; return how long until the next one is."""
        resume_all, self._resume_all = self._resume_all, False
        now = time.time()
        for txn in self.journal.unfinished():
            if self._stop.is_set() or self.flow.stopping.is_set():
                break
            if resume_all or txn.next_retry_at is None or txn.next_retry_at <= now:
                self.flow.settle(txn)
                self.last_beat = time.monotonic()
        pending = self.journal.unfinished()
        self.backlog = len(pending)
        self.on_backlog(self.backlog)
        due = [t.next_retry_at or 0.0 for t in pending if not self.flow.owns(t.ref)]
        if not due:
            return self.idle_s
        return min(self.idle_s, max(0.0, min(due) - time.time()))
