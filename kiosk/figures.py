"""The journal's figures for the day (sales, totals, what needs a person), read beside the sale
path: the loop's alarms ask what needs a person, the telemetry sink (when there is one) all
of them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from kiosk.errors import JournalError
from kiosk.journal import Journal, JournalFigures
from kiosk.log import event

log = logging.getLogger("kiosk.figures")
T = TypeVar("T")


class FiguresReader:
    """The journal's figures through a read-only connection of its own, so neither the
    telemetry thread nor the loop ever waits on the sale path's write lock (WAL readers do
    not block the writer). Thread-safe; opened on first use."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._journal: Journal | None = None
        self._failing: str | None = None

    def read(self, wall: datetime) -> JournalFigures | None:
        """Figures for the local day of `wall`; None (logged once) while unreadable."""
        local = wall.astimezone()
        day_start = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
        start = day_start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return self._ask(lambda journal: journal.figures(start))

    def attention_refs(self) -> tuple[str, ...] | None:
        """The refs that need a person (what the loop's alarms ask, without reading the day's
        sales); None (logged once) while unreadable."""
        return self._ask(Journal.attention_refs)

    def _ask(self, question: Callable[[Journal], T]) -> T | None:
        with self._lock:
            try:
                if self._journal is None:
                    self._journal = Journal(self.state_dir, read_only=True)
                answer = question(self._journal)
            except JournalError as exc:
                if self._journal is not None:
                    self._journal.close()
                    self._journal = None
                if self._failing != str(exc):
                    self._failing = str(exc)
                    event(
                        log, "telemetry.figures_unreadable", level=logging.WARNING, error=str(exc)
                    )
                return None
            self._failing = None
            return answer

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
