"""The kiosk's idea of the gateway follows the order in which the evidence came.

A pay answered, then a request of the journal worker that found no gateway: the gateway was
last seen unreachable, so the kiosk is offline (OFFLINE shown, an MDB reader off, the probe
scheduled) until something answers again. A failure the loop hears while the answer is being
journaled (a slow fsync) must not be overruled afterwards by the older news of that answer:
the flow tells the loop of an answer as soon as it has it, before journaling it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from kiosk.demo import PARTNER
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.ports import KioskState
from tests.conftest import payment_code
from tests.loop_rig import Rig


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
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    txn = journal.open_transaction(
        ref="VM-DEMO-20260101000000-aa",
        amount=Decimal("1.50"),
        currency="USD",
        item="coffee",
        code_last4="0001",
        trans_create_time=stamp,
        partner=PARTNER,
    )
    journal.update(txn, state=TxnState.CANCELLING, note="vend failed")
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
