"""Attack 2: gateway URLs that `kiosk check` passes (a 300-character label, an empty IDNA
label): a pay must end as a clean refusal or unknown, never an exception."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.alipay.client import PayOrder
from kiosk.errors import GatewayUnreachable


@pytest.mark.parametrize(
    "gateway",
    [
        "https://" + "a" * 300 + ".com/gateway.do",
        "https://xn--/gateway.do",
        "https://[fe80::1%25eth0]/gateway.do",
        "https://a:99999999999999999/gateway.do",
        "https://%zz.com/gateway.do",
        "https://u:p@[::1]:0/gateway.do",
    ],
)
def test_pay_to_a_checker_accepted_gateway(make_client, gateway: str) -> None:
    client = make_client(gateway=gateway)
    order = PayOrder(
        partner_trans_id="T-1",
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code="281234567890123456",
        trans_name="x",
        trans_create_time="20261129120000",
        extend_info={},
    )
    with contextlib.suppress(GatewayUnreachable):
        client.pay(order)
    for call in (
        lambda: client.query("T-1", None, amount=Decimal("1.50"), currency="USD"),
        lambda: client.cancel("T-1", 1764400000000),
    ):
        with contextlib.suppress(GatewayUnreachable):
            call()


def test_a_scan_with_a_checker_accepted_overlong_gateway_label(
    tmp_path: Path, simulator, make_client
) -> None:
    """The whole daemon: the pay must end as a clean refusal (OFFLINE: it never left) with
    the journal row final, not an exception in the sale thread and a row left PAYING."""
    from tests.conftest import payment_code
    from tests.loop_rig import rig_factory

    long_gw = "https://" + "a" * 300 + ".com/gateway.do"
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        rig = make(client_factory=lambda: make_client(gateway=long_gw, pay_timeout_s=1.0))
        rig.scanner.scan(payment_code("0001"))
        index = rig.log.wait_for("payment.start", 10)
        ref = rig.log.events[index]["ref"]
        rig.log.wait_until(
            lambda: (
                bool(rig.log.named("payment.result"))
                or bool([e for e in rig.log.events if "failed" in e.get("event", "")])
            ),
            10,
        )
        import time

        time.sleep(2.0)
        txn = rig.kiosk.journal.get(ref)
        events = sorted({e.get("event") for e in rig.log.events})
        assert rig.log.named("payment.result"), (txn and txn.state, events)
        assert txn is not None and txn.final, (txn.state, events)
