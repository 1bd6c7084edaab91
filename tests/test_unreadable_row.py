"""One transaction row whose `state` (or `amount`) does not parse (a newer firmware's state, a
bit flip) is skipped when the journal is read, with one alarm per row: it never stops the
worker from settling every other unfinished charge (here a paid one waiting for its cancel),
and `kiosk journal` lists it as unreadable rather than failing (SPEC section 6)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.journal import Journal, TxnState
from kiosk.log import _FIELDS
from kiosk.payment import FlowSettings, PaymentFlow
from kiosk.payment_code import PaymentCode
from kiosk.ports import VendResult
from kiosk.simulator import GatewaySimulator
from kiosk.worker import JournalWorker
from tests.conftest import PARTNER, payment_code


def test_one_unreadable_row_is_skipped_with_an_alarm_and_the_others_are_settled(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
) -> None:
    journal = Journal(tmp_path / "state")
    vend = FakeVendOutput()
    vend.script(VendResult.FAILED)
    settings = FlowSettings(
        terminal_id="VM-X",
        currency="USD",
        trans_name="t",
        extend_info={"secondary_merchant_id": "M", "store_id": "S"},
        query_interval_s=0.1,
        query_deadline_s=1.0,
        cancel_tries_in_foreground=0,
    )
    flow = PaymentFlow(make_client(), journal, vend, settings)
    # A paid sale whose vend failed: CANCELLING, money held at Alipay, left to the worker.
    sale = flow.sell(PaymentCode(payment_code("0001", 9)), Decimal("1.50"), "coffee")
    assert journal.get(sale.ref).state is TxnState.CANCELLING  # type: ignore[union-attr]
    assert simulator.ledger.trade(PARTNER, sale.ref).holds_money  # type: ignore[union-attr]
    # Another, older row with a state a newer firmware (or a bit flip) wrote.
    bad = journal.open_transaction(
        ref="VM-X-old",
        amount=Decimal("2.00"),
        currency="USD",
        item="tea",
        code_last4="1234",
        trans_create_time="20260101120000",
    )
    with journal._lock:
        journal._conn.execute("UPDATE transactions SET state='paid_v2' WHERE ref=?", (bad.ref,))
    worker = JournalWorker(flow, journal, idle_s=0.2)
    errors: list[object] = []
    worker.on_journal_error = errors.append
    caplog.set_level(logging.INFO, logger="kiosk")
    for _ in range(3):
        try:
            worker.work_off_due()
        except Exception as exc:  # what the worker thread's loop catches
            errors.append(exc)
    trade = simulator.ledger.trade(PARTNER, sale.ref)
    journal.close()
    assert errors == []
    fields = [getattr(r, _FIELDS) for r in caplog.records if hasattr(r, _FIELDS)]
    alarms = [f for f in fields if f["event"] == "alarm" and f.get("kind") == "unreadable_row"]
    assert len(alarms) == 1, "one alarm per unreadable row, not one per pass"
    assert alarms[0]["ref"] == "VM-X-old" and "paid_v2" in alarms[0]["why"]
    # `kiosk journal` lists it as unreadable, and the others as usual.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiosk",
            "journal",
            "--json",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    listed = {r["ref"]: r for r in json.loads(done.stdout)}
    assert listed["VM-X-old"]["state"] == "unreadable" and not listed["VM-X-old"]["final"]
    assert "paid_v2" in listed["VM-X-old"]["note"]
    assert listed[sale.ref]["state"] == "cancelled"
    done = subprocess.run(
        [sys.executable, "-m", "kiosk", "journal", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0 and "unreadable row" in done.stdout, done.stderr
    assert trade is not None and not trade.holds_money, (
        f"a paid, failed vend ({sale.ref}) was never cancelled: one unreadable row of another "
        f"transaction stopped the worker ({errors[:1]})"
    )
