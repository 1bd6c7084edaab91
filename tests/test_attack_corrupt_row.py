"""Attack: one transaction row whose `state` (or `amount`) does not parse makes
`Journal.unfinished()` raise JournalCorrupt for the whole table. The worker then settles
nothing at all: every other unfinished charge (here a paid one waiting for its cancel) is
never reversed, although SPEC section 6 says the worker keeps resolving old transactions
while the kiosk is out of service for an unreadable journal."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from kiosk.alipay.client import AlipayClient
from kiosk.journal import Journal, TxnState
from kiosk.payment import FlowSettings, PaymentFlow, trans_create_time
from kiosk.simulator import GatewaySimulator
from kiosk.payment_code import PaymentCode
from kiosk.worker import JournalWorker
from drivers.vend_fake import FakeVendOutput
from kiosk.ports import VendResult
from tests.conftest import PARTNER, payment_code


def test_attack_one_corrupt_row_stops_every_reversal(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    journal = Journal(tmp_path / "state")
    vend = FakeVendOutput()
    vend.script(VendResult.FAILED)
    settings = FlowSettings(
        terminal_id="VM-X", currency="USD", trans_name="t",
        extend_info={"secondary_merchant_id": "M", "store_id": "S"},
        query_interval_s=0.1, query_deadline_s=1.0, cancel_tries_in_foreground=0,
    )
    flow = PaymentFlow(make_client(), journal, vend, settings)
    # A paid sale whose vend failed: CANCELLING, money held at Alipay, left to the worker.
    sale = flow.sell(PaymentCode(payment_code("0001", 9)), Decimal("1.50"), "coffee")
    assert journal.get(sale.ref).state is TxnState.CANCELLING  # type: ignore[union-attr]
    assert simulator.ledger.trade(PARTNER, sale.ref).holds_money  # type: ignore[union-attr]
    # Another, older row with a state a newer firmware (or a bit flip) wrote.
    bad = journal.open_transaction(
        ref="VM-X-old", amount=Decimal("2.00"), currency="USD", item="tea",
        code_last4="1234", trans_create_time="20260101120000",
    )
    with journal._lock:
        journal._conn.execute("UPDATE transactions SET state='paid_v2' WHERE ref=?", (bad.ref,))
    worker = JournalWorker(flow, journal, idle_s=0.2)
    errors: list[object] = []
    worker.on_journal_error = errors.append
    for _ in range(3):
        try:
            worker.work_off_due()
        except Exception as exc:  # what the worker thread's loop catches
            errors.append(exc)
    trade = simulator.ledger.trade(PARTNER, sale.ref)
    journal.close()
    assert trade is not None and not trade.holds_money, (
        f"a paid, failed vend ({sale.ref}) was never cancelled: one unreadable row of another "
        f"transaction stopped the worker ({errors[:1]})"
    )
