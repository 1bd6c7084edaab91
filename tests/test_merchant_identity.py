"""A transaction is settled only with the merchant (partner and gateway) it was paid through.
Alipay (and the simulator) answer a cancel of a trade that never existed with SUCCESS, so a
reversal sent under a partner changed by a reload or a restart would journal the sale CANCELLED
while the first partner still holds the buyer's money (SPEC rule 2). Instead it stays open,
with one alarm, until the old configuration is back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kiosk.alipay.client import AlipayClient, GatewaySettings
from kiosk.alipay.signing import SignType
from kiosk.config import Config
from kiosk.journal import TxnState
from kiosk.ports import VendResult
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator, MerchantAccount
from tests.conftest import MD5_KEY, PARTNER, named_key, payment_code, signature_for
from tests.loop_rig import Rig, rig_config, rig_factory

PARTNER2 = "2088999988887777"


@pytest.fixture
def sim2() -> Iterator[GatewaySimulator]:
    key = named_key("merchant").public_key()
    sim = GatewaySimulator(
        [
            MerchantAccount(PARTNER, md5_key=MD5_KEY, merchant_public_key=key),
            MerchantAccount(PARTNER2, md5_key=MD5_KEY, merchant_public_key=key),
        ],
        alipay_private_key=named_key("alipay"),
    )
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def _partner_client(sim: GatewaySimulator, partner: list[str]) -> Callable[[], AlipayClient]:
    def make() -> AlipayClient:
        return AlipayClient(
            GatewaySettings(
                gateway=sim.url,
                partner=partner[0],
                seller_id=partner[0],
                signature=signature_for(SignType.RSA2, sim),
                connect_timeout_s=1.0,
                pay_timeout_s=1.0,
                read_timeout_s=1.0,
            )
        )

    return make


def test_a_transaction_is_settled_only_under_the_partner_it_was_paid_to(
    tmp_path: Path, sim2: GatewaySimulator
) -> None:
    partner = [PARTNER]
    config = rig_config(tmp_path / "state", sim2.url)
    configs = {
        PARTNER: config,
        PARTNER2: replace(config, alipay=replace(config.alipay, partner=PARTNER2)),
    }

    def reload_config() -> Config:
        return configs[partner[0]]  # the technician's file names partner[0]

    with rig_factory(tmp_path, sim2.url, lambda **kw: None) as make:  # type: ignore[arg-type,return-value]
        # Every cancel fails (unknown outcome) until the reload: the reversal stays open.
        sim2.inject(FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="cancel", times=0))
        rig: Rig = make(
            config, client_factory=_partner_client(sim2, partner), reload_config=reload_config
        )
        rig.vend.script(VendResult.FAILED)  # the product did not come out
        rig.scanner.scan(payment_code("0001", 7))
        rig.log.wait_for("payment.result", 15)
        ref = rig.vend.approvals[0][0]
        txn = rig.kiosk.journal.get(ref)
        assert txn is not None and txn.state is TxnState.CANCELLING
        assert (txn.partner, txn.gateway) == (PARTNER, sim2.url)
        # A reload names another merchant: the old trade is not touched under the new one.
        partner[0] = PARTNER2
        mark = rig.log.size
        rig.kiosk.reload()
        rig.log.wait_for("config.reloaded", 10, after=mark - 1)
        rig.kiosk.worker.wake()
        rig.log.wait_for("worker.flow_replaced", 10, after=mark - 1)
        sim2.clear_faults()  # cancels would succeed now, under either partner
        rig.kiosk.worker.wake(resume_all=True)
        rig.log.wait_for("alarm", 10, after=mark - 1, kind="other_merchant", ref=ref)
        rig.kiosk.worker.wake(resume_all=True)  # a second pass: no second alarm, no request
        assert rig.log.wait_until(
            lambda: rig.kiosk.worker.retry_schedule().get(ref, (0, 0))[1] >= 2, 10
        )
        alarms = [r for r in rig.log.named("alarm") if r.get("kind") == "other_merchant"]
        assert len(alarms) == 1 and alarms[0]["partner"] == PARTNER
        assert not [r for r in sim2.requests_seen if r.params.get("partner") == PARTNER2]
        assert rig.kiosk.journal.get(ref).state is TxnState.CANCELLING  # type: ignore[union-attr]
        assert sim2.ledger.trade(PARTNER, ref).holds_money  # type: ignore[union-attr]
        # The old merchant's config is back: the reversal goes on under it.
        partner[0] = PARTNER
        mark = rig.log.size
        rig.kiosk.reload()
        rig.log.wait_for("config.reloaded", 10, after=mark - 1)
        rig.kiosk.worker.wake(resume_all=True)
        assert rig.log.wait_until(
            lambda: rig.kiosk.journal.get(ref).state is TxnState.CANCELLED,  # type: ignore[union-attr]
            20,
        )
        trade = sim2.ledger.trade(PARTNER, ref)
        rig.stop()
    assert trade is not None and not trade.holds_money
    assert not [r for r in sim2.requests_seen if r.params.get("partner") == PARTNER2]
