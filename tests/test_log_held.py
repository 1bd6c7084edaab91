"""The log thread's lines held while a sale is on its way to APPROVED: written after, in order
and with the times they were logged; never held past the hold's limit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from kiosk.log import event, lines_held, logging_in_background

WAIT_S = 5.0  # for what must happen; a held line is looked for far shorter
LOOK_S = 0.2


class Written(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.seen:
            self.records.append(record)
            self.seen.notify_all()

    def names(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: len(self.records) >= count, timeout)


@pytest.fixture
def written() -> Iterator[Written]:
    root = logging.getLogger()
    handler = Written()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        with logging_in_background():
            yield handler
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


log = logging.getLogger("kiosk.test")


def test_lines_logged_while_held_are_written_after_in_order_with_their_times(
    written: Written,
) -> None:
    with lines_held(60.0):
        event(log, "payment.start", ref="A")
        event(log, "alipay.call", ref="A")
        assert not written.wait_for(1, LOOK_S)  # held: nothing written yet
    event(log, "payment.result", ref="A")
    assert written.wait_for(3, WAIT_S)
    assert written.names() == ["payment.start", "alipay.call", "payment.result"]
    times = [r.created for r in written.records]
    assert times == sorted(times)


def test_a_hold_ends_by_itself_at_its_limit(written: Written) -> None:
    """A sale stuck on a slow gateway leaves the log behind by at most the limit."""
    with lines_held(0.05):
        event(log, "payment.start", ref="A")
        assert written.wait_for(1, WAIT_S)
    assert written.names() == ["payment.start"]


def test_release_lets_the_lines_out_before_the_block_ends(written: Written) -> None:
    with lines_held(60.0) as lines:
        event(log, "payment.start", ref="A")
        lines.release()
        assert written.wait_for(1, WAIT_S)
