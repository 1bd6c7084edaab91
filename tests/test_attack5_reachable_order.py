"""The kiosk's idea of the gateway follows the order in which the evidence came.

A pay answered, then a request of the journal worker that found no gateway: the gateway was
last seen unreachable, so the kiosk is offline (OFFLINE shown, an MDB reader off, the probe
scheduled) until something answers again. A failure the loop hears while the answer is being
journaled (a slow fsync) must not be overruled afterwards by the older news of that answer:
the flow tells the loop of an answer as soon as it has it, before journaling it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.indicator_fake import FakeIndicator
from drivers.scanner_fake import FakeScanner
from drivers.vend_fake import FakeVendOutput
from kiosk.daemon import Kiosk
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.ports import KioskState
from kiosk.systemd import Notifier
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config, with_a_reversal_due


class GatedJournal(Journal):
    """A journal whose commit of VENDING waits at a gate (a slow fsync, made long)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_gate = threading.Event()
        self.gate = threading.Event()

    def update(self, txn: Transaction, **changes: Any) -> Transaction:
        if changes.get("state") is TxnState.VENDING:
            self.at_gate.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return super().update(txn, **changes)


def test_a_failure_heard_during_the_vending_commit_leaves_the_kiosk_offline(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    journal = GatedJournal(tmp_path / "state")
    rig = make_rig(journal=journal)
    rig.scanner.scan(payment_code("0001"))
    # The pay was answered SUCCESS; its VENDING commit is under way.
    assert journal.at_gate.wait(10)
    # Meanwhile the gateway went away: the journal worker's request found no gateway (the
    # call its flow makes on the kiosk, its watch).
    mark = rig.log.size
    rig.kiosk.unreachable()
    rig.log.wait_for("gateway.offline", after=mark - 1)
    journal.gate.set()
    assert rig.vend.wait_for_approval(10)  # the paid sale vends
    rig.log.wait_for("payment.result", outcome="vended")
    assert rig.log.wait_until(lambda: rig.kiosk.status.sales_total == 1, 10)
    # Nothing answered since the worker's failure: the kiosk stays offline.
    assert rig.kiosk.status.offline, "the pay's older answer put the kiosk back online"
    assert rig.log.named("gateway.online") == []
    assert rig.lights.wait_for(KioskState.OFFLINE, 5)
    rig.stop()


class GatedAnswerJournal(Journal):
    """A journal whose note of a cancel's answer waits at a gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_gate = threading.Event()
        self.gate = threading.Event()

    def after_request(self, txn: Transaction, outcome: str, detail: str, **kw: Any) -> Transaction:
        if kw.get("sent", True) and not self.at_gate.is_set():
            self.at_gate.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return super().after_request(txn, outcome, detail, **kw)


def test_a_failure_heard_while_the_worker_journals_an_answer_leaves_the_kiosk_offline(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    journal = GatedAnswerJournal(tmp_path / "state")
    txn = with_a_reversal_due(journal)
    rig = make_rig(journal=journal)
    # The worker's cancel was answered; its note of the answer is being committed.
    assert journal.at_gate.wait(10)
    mark = rig.log.size
    rig.kiosk.unreachable()  # a request of the sale's flow found no gateway meanwhile
    rig.log.wait_for("gateway.offline", after=mark - 1)
    journal.gate.set()
    rig.log.wait_for("payment.cancel", outcome="success")
    assert rig.log.wait_until(lambda: journal.get(txn.ref).state is TxnState.CANCELLED, 10)
    # The stop is handled after everything the flows told the loop before it.
    rig.stop()
    assert rig.kiosk.status.offline, "the cancel's older answer put the kiosk back online"
    assert rig.log.named("gateway.online") == []


def test_an_answer_wakes_the_loop_only_when_the_news_can_change_something(
    tmp_path: Path,
) -> None:
    """Every answered request tells the loop the gateway answered, the pay's among them, on its
    way to the VENDING commit. Online, with no failure on its way to the loop, that news
    changes nothing and is not sent; after a failure not yet heard it is sent, behind it."""
    config = rig_config(tmp_path / "state", "http://127.0.0.1:9/gateway.do")
    kiosk = Kiosk(
        config,
        scanner=FakeScanner(),
        indicator=FakeIndicator(),
        vend=FakeVendOutput(),
        journal=Journal(config.kiosk.state_dir),
        notifier=Notifier({}),
    )

    def sent() -> list[tuple[str, Any]]:
        news: list[tuple[str, Any]] = []
        while True:
            try:
                news.append(kiosk.events.get_nowait())
            except queue.Empty:
                return news

    sent()
    kiosk.reachable()
    assert sent() == []
    kiosk.unreachable()
    kiosk.reachable()  # the failure is told, not yet heard: the answer follows it
    assert sent() == [("gateway", "unreachable"), ("gateway", "reachable")]
    kiosk._handle_gateway("unreachable")  # the loop hears the failure: offline
    kiosk.reachable()
    assert sent() == [("gateway", "reachable")]
    kiosk._handle_gateway("reachable")  # and the answer: online again
    assert not kiosk.status.offline
    kiosk.reachable()
    assert sent() == []
    kiosk.journal.close()
