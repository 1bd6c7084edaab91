"""A kiosk payment flow in a child process that kills itself (SIGKILL) at a chosen journal
step, and the recovery run that follows it. Driven by tests/test_crash_recovery.py.

usage: crash_child.py sell STATE_DIR GATEWAY ALIPAY_PUB MERCHANT_KEY POINT CODE VEND_RESULT
       crash_child.py recover STATE_DIR GATEWAY ALIPAY_PUB MERCHANT_KEY VEND_REPORT
"""

from __future__ import annotations

import os
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient, GatewaySettings
from kiosk.alipay.signing import RsaSignature, SignType, load_public_key
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.payment import FlowSettings, PaymentFlow
from kiosk.payment_code import PaymentCode
from kiosk.ports import VendResult

PARTNER = "2088101122334455"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingJournal(Journal):
    """Dies right after the named step is durably written."""

    def __init__(self, state_dir: Path, point: str) -> None:
        super().__init__(state_dir)
        self.point = point

    def open_transaction(self, **kwargs: Any) -> Transaction:
        txn = super().open_transaction(**kwargs)
        if self.point == "after_open":
            die()
        return txn

    def before_request(
        self, txn: Transaction, kind: str, params: dict[str, str], **changes: Any
    ) -> Transaction:
        updated = super().before_request(txn, kind, params, **changes)
        if self.point == f"after_{kind}_journaled":
            die()
        return updated

    def update(self, txn: Transaction, **changes: Any) -> Transaction:
        updated = super().update(txn, **changes)
        if self.point == f"after_{updated.state.value}" and txn.state is not updated.state:
            die()
        return updated


def flow(
    state_dir: Path,
    gateway: str,
    alipay_pub: Path,
    merchant_key: Path,
    journal: Journal,
    vend: FakeVendOutput,
) -> PaymentFlow:
    private = serialization.load_pem_private_key(merchant_key.read_bytes(), password=None)
    signature = RsaSignature(
        SignType.RSA2,
        private_key=private,  # type: ignore[arg-type]
        public_key=load_public_key(alipay_pub.read_bytes()),
    )
    client = AlipayClient(
        GatewaySettings(
            gateway=gateway,
            partner=PARTNER,
            seller_id=PARTNER,
            signature=signature,
            connect_timeout_s=1.0,
            pay_timeout_s=1.0,
            read_timeout_s=1.0,
        )
    )
    settings = FlowSettings(
        terminal_id="VM-CRASH",
        currency="USD",
        trans_name="Vending purchase",
        extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1"},
        query_interval_s=0.05,
        query_deadline_s=1.0,
        vend_timeout_s=0.3,
        cancel_tries_in_foreground=2,
        retry_base_s=0.01,
        retry_max_s=0.05,
    )
    return PaymentFlow(client, journal, vend, settings)


def main(argv: list[str]) -> int:
    mode, state_dir, gateway, alipay_pub, merchant_key = argv[:5]
    vend = FakeVendOutput()
    if mode == "sell":
        point, code, vend_result = argv[5:8]
        journal: Journal = CrashingJournal(Path(state_dir), point)
        vend.script(VendResult(vend_result))
        the_flow = flow(
            Path(state_dir), gateway, Path(alipay_pub), Path(merchant_key), journal, vend
        )
        for kind in ("pay", "cancel", "refund"):
            real = getattr(the_flow.client, kind)
            if point == f"after_{kind}_sent":

                def sent_then_die(*a: Any, _real: Any = real, **k: Any) -> Any:
                    _real(*a, **k)
                    die()

                setattr(the_flow.client, kind, sent_then_die)
        if point == "after_dispense":
            real_dispense = vend.dispense

            def dispensed_then_die(*a: Any, **k: Any) -> VendResult:
                real_dispense(*a, **k)
                die()
                raise AssertionError("unreachable")

            vend.dispense = dispensed_then_die  # type: ignore[method-assign]
        the_flow.sell(PaymentCode.parse(code), Decimal("1.50"), "coffee")
        journal.close()
        return 0
    # recover: what `kiosk run` does on start, until every transaction is final.
    (vend_report,) = argv[5:6]
    vend.script_report(VendResult(vend_report))
    journal = Journal(Path(state_dir))
    the_flow = flow(Path(state_dir), gateway, Path(alipay_pub), Path(merchant_key), journal, vend)
    deadline = time.monotonic() + 30
    while journal.unfinished():
        if time.monotonic() > deadline:
            print("unfinished:", [t.state for t in journal.unfinished()], file=sys.stderr)
            return 1
        for txn in journal.unfinished():
            the_flow.settle(txn)
    states = {t.state for t in journal.listing(include_all=True)}
    journal.close()
    print(",".join(sorted(s.value for s in states)))
    return (
        0
        if states <= {TxnState.VENDED, TxnState.DECLINED, TxnState.CANCELLED, TxnState.REFUNDED}
        else 1
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
