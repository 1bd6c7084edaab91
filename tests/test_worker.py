"""The journal worker: one transaction's trouble never holds up the others, retries follow the
monotonic clock with a backoff that cannot overflow, a transaction that will not finish raises
one alarm and is still retried, and a new flow takes effect only between passes."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.errors import GatewayUnreachable
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.payment import FlowSettings, PaymentFlow
from kiosk.worker import JournalWorker

SETTINGS = FlowSettings(
    terminal_id="VM-W",
    currency="USD",
    trans_name="test",
    extend_info={},
    retry_base_s=2.0,
    retry_max_s=300.0,
)


class FakeClient:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeFlow:
    """What the worker needs of a PaymentFlow; `outcomes` maps a ref to what settle does:
    a final state, a state to stay in, or an exception to raise."""

    def __init__(self, settings: FlowSettings = SETTINGS, name: str = "flow") -> None:
        self.settings = settings
        self.name = name
        self.stopping = threading.Event()
        self.client = FakeClient()
        self.outcomes: dict[str, TxnState | BaseException] = {}
        self.settled: list[str] = []
        self.in_hand: set[str] = set()
        self.hold: dict[str, threading.Event] = {}  # settle of this ref waits for the event
        self.entered = threading.Event()

    def owns(self, ref: str) -> bool:
        return ref in self.in_hand

    def settle(self, txn: Transaction) -> Transaction:
        self.settled.append(txn.ref)
        self.entered.set()
        if txn.ref in self.hold:
            assert self.hold[txn.ref].wait(10)
        outcome = self.outcomes.get(txn.ref, TxnState.CANCELLING)
        if isinstance(outcome, BaseException):
            raise outcome
        return replace(txn, state=outcome)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_txn(journal: Journal, ref: str, state: TxnState = TxnState.CANCELLING) -> Transaction:
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    txn = journal.open_transaction(
        ref=ref,
        amount=Decimal("1.50"),
        currency="USD",
        item="coffee",
        code_last4="0001",
        trans_create_time=stamp,
    )
    return journal.update(txn, state=state)


def alarms(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    found = [getattr(r, "kiosk_fields", {}) for r in caplog.records]
    return [f for f in found if f.get("event") == "alarm"]


def test_an_exception_settling_one_transaction_does_not_stop_the_younger_ones(
    journal: Journal,
) -> None:
    open_txn(journal, "VM-W-old")
    open_txn(journal, "VM-W-young")
    flow = FakeFlow()
    # What 2 ** retry_count did to the float backoff after ~1,024 tries:
    flow.outcomes = {"VM-W-old": OverflowError("int too large to convert to float")}
    flow.outcomes["VM-W-young"] = TxnState.CANCELLED
    worker = JournalWorker(flow, journal)  # type: ignore[arg-type]
    worker.work_off_due()
    assert flow.settled == ["VM-W-old", "VM-W-young"]  # oldest first, and on past the failure


def test_a_failed_transaction_is_backed_off_and_the_pass_goes_on(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    open_txn(journal, "VM-W-bad")
    open_txn(journal, "VM-W-good")
    flow = FakeFlow()
    flow.outcomes = {"VM-W-bad": ValueError("odd answer"), "VM-W-good": TxnState.CANCELLED}
    clock = Clock()
    worker = JournalWorker(flow, journal, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        worker.work_off_due()
    failed = [
        f
        for r in caplog.records
        if (f := getattr(r, "kiosk_fields", {})).get("event") == "worker.settle_failed"
    ]
    assert failed[0]["ref"] == "VM-W-bad" and "odd answer" in failed[0]["error"]
    assert worker.retry_schedule() == {"VM-W-bad": (clock.now + 2.0, 1)}
    assert "VM-W-bad" in {t.ref for t in journal.unfinished()}  # never dropped


def test_backoff_doubles_to_the_cap_and_cannot_overflow() -> None:
    from kiosk.worker import backoff_s

    assert [backoff_s(n, 2.0, 300.0) for n in range(1, 10)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0,
    ]  # fmt: skip
    assert backoff_s(100_000, 2.0, 300.0) == 300.0
    assert backoff_s(10**9, 1e-300, 1e308) == 1e-300 * 2**30


def test_thousands_of_tries_keep_the_worker_retrying_at_the_cap(journal: Journal) -> None:
    open_txn(journal, "VM-W-stuck")
    flow = FakeFlow()
    clock = Clock()
    worker = JournalWorker(flow, journal, clock=clock, jitter=lambda: 1.0)  # type: ignore[arg-type]
    for _ in range(1100):
        wait = worker.work_off_due()
        clock.now += max(wait, 300.0)
    assert len(flow.settled) == 1100
    assert worker.retry_schedule()["VM-W-stuck"][1] == 1100
    assert worker.work_off_due() == worker.idle_s  # the next is due at the cap, past idle_s


def test_retries_are_due_on_the_monotonic_clock(journal: Journal) -> None:
    open_txn(journal, "VM-W-1")
    flow = FakeFlow()
    clock = Clock()
    worker = JournalWorker(
        flow,  # type: ignore[arg-type]
        journal,
        clock=clock,
        jitter=lambda: 1.0,
        idle_s=100.0,
    )
    assert worker.work_off_due() == 2.0  # first try on start, then 2 s
    clock.now += 1.9
    worker.work_off_due()
    assert flow.settled == ["VM-W-1"]  # not due yet
    clock.now += 0.1
    assert worker.work_off_due() == 4.0
    assert flow.settled == ["VM-W-1", "VM-W-1"]


def test_everything_unfinished_is_due_at_once_when_the_gateway_is_back(journal: Journal) -> None:
    open_txn(journal, "VM-W-1")
    open_txn(journal, "VM-W-2")
    flow = FakeFlow()
    clock = Clock()
    worker = JournalWorker(flow, journal, clock=clock)  # type: ignore[arg-type]
    worker.work_off_due()
    worker.work_off_due()
    assert flow.settled == ["VM-W-1", "VM-W-2"]  # backed off
    worker.wake(resume_all=True)
    worker.work_off_due()
    assert flow.settled == ["VM-W-1", "VM-W-2", "VM-W-1", "VM-W-2"]


def test_a_ref_in_the_foregrounds_hand_is_left_alone(journal: Journal) -> None:
    open_txn(journal, "VM-W-sale")
    flow = FakeFlow()
    flow.in_hand.add("VM-W-sale")
    worker = JournalWorker(flow, journal)  # type: ignore[arg-type]
    worker.work_off_due()
    assert flow.settled == [] and worker.retry_schedule() == {}


def test_a_transaction_past_the_try_ceiling_raises_one_alarm_and_is_still_retried(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    open_txn(journal, "VM-W-stuck")
    flow = FakeFlow()
    clock = Clock()
    worker = JournalWorker(
        flow,  # type: ignore[arg-type]
        journal,
        clock=clock,
        alarm_after_tries=5,
    )
    with caplog.at_level(logging.ERROR):
        for _ in range(12):
            worker.work_off_due()
            clock.now += 301
    [alarm] = alarms(caplog)
    assert (alarm["kind"], alarm["ref"], alarm["tries"]) == ("retry_ceiling", "VM-W-stuck", 5)
    assert len(flow.settled) == 12
    assert [t.ref for t in journal.unfinished()] == ["VM-W-stuck"]


def test_a_transaction_older_than_a_day_raises_the_alarm_at_its_next_failure(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    open_txn(journal, "VM-W-old")
    flow = FakeFlow()
    tomorrow = datetime.now(UTC) + timedelta(hours=25)
    worker = JournalWorker(flow, journal, wall_clock=lambda: tomorrow)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        worker.work_off_due()
    [alarm] = alarms(caplog)
    assert alarm["kind"] == "retry_ceiling" and alarm["age_s"] >= 25 * 3600


def test_a_new_flow_takes_effect_at_the_next_pass_never_mid_settle(journal: Journal) -> None:
    open_txn(journal, "VM-W-1")
    open_txn(journal, "VM-W-2")
    old, new = FakeFlow(name="old"), FakeFlow(name="new")
    release = threading.Event()
    old.hold["VM-W-1"] = release
    worker = JournalWorker(old, journal)  # type: ignore[arg-type]
    worker.start()
    try:
        assert old.entered.wait(5)
        worker.use(new)  # type: ignore[arg-type]
        release.set()
        assert new.entered.wait(5)
        assert old.settled == ["VM-W-1", "VM-W-2"]  # the pass in progress finished with it
        assert worker.flow is new and old.client.closed and not new.client.closed
    finally:
        worker.stop(5)
    assert new.client.closed  # the worker closes what it owns when it stops


# -- with the real flow: the wall clock jumps back --------------------------------------------


class OfflineClient:
    """A gateway that never answers: every cancel fails to connect. Counts the tries."""

    # The merchant it speaks for (the rows here name none: "as configured").
    settings = SimpleNamespace(partner="2088101122334455", gateway="http://127.0.0.1:9/gateway.do")

    def __init__(self) -> None:
        self.cancels = 0
        self._changed = threading.Condition()

    def cancel(self, *args: Any, **kwargs: Any) -> Any:
        with self._changed:
            self.cancels += 1
            self._changed.notify_all()
        raise GatewayUnreachable("connection refused")

    def query(self, *args: Any, **kwargs: Any) -> Any:
        raise GatewayUnreachable("connection refused")

    def close(self) -> None:
        pass

    def wait_for_cancels(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.cancels >= count, timeout)


def test_a_backward_jump_of_the_wall_clock_does_not_stall_a_reversal(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_txn(journal, "VM-W-rev")
    client = OfflineClient()
    settings = replace(SETTINGS, retry_base_s=0.05, retry_max_s=0.2)
    flow = PaymentFlow(client, journal, FakeVendOutput(), settings)  # type: ignore[arg-type]
    first_pass = threading.Event()
    worker = JournalWorker(flow, journal, idle_s=10.0, on_backlog=lambda n: first_pass.set())
    worker.start()
    try:
        assert first_pass.wait(5) and client.cancels == 1  # tried once, the next try scheduled
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # NTP steps the clock back 1 h
        # Backoff is at most 0.2 s here: the cancel keeps being retried.
        assert client.wait_for_cancels(4, 5), f"only {client.cancels} cancels"
    finally:
        worker.stop(10)
