"""Attack: the journal does not record which merchant (partner) or gateway a transaction was
made with. A reload (SIGHUP) or a restart that changes `alipay.partner` while a reversal is still
open makes the worker cancel the OLD trade under the NEW partner. Alipay (and the simulator)
answer a cancel of a trade that never existed with SUCCESS, so the kiosk journals the sale
CANCELLED while the first partner still holds the buyer's money (SPEC rule 2)."""

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


def test_attack_reload_to_another_partner_cancels_the_old_trade_under_the_new_one(
    tmp_path: Path, sim2: GatewaySimulator
) -> None:
    partner = [PARTNER]
    config = rig_config(tmp_path / "state", sim2.url)
    new_config = replace(config, alipay=replace(config.alipay, partner=PARTNER2))

    def reload_config() -> Config:
        partner[0] = PARTNER2  # the technician's new file names another merchant
        return new_config

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
        assert rig.kiosk.journal.get(ref).state is TxnState.CANCELLING  # type: ignore[union-attr]
        mark = rig.log.size
        rig.kiosk.reload()
        rig.log.wait_for("config.reloaded", 10, after=mark - 1)
        rig.kiosk.worker.wake()
        rig.log.wait_for("worker.flow_replaced", 10, after=mark - 1)
        sim2.clear_faults()
        rig.kiosk.worker.wake(resume_all=True)
        assert rig.log.wait_until(
            lambda: rig.kiosk.journal.get(ref).state  # type: ignore[union-attr]
            in (TxnState.CANCELLED, TxnState.REFUNDED, TxnState.ATTENTION),
            20,
        )
        state = rig.kiosk.journal.get(ref).state  # type: ignore[union-attr]
        trade = sim2.ledger.trade(PARTNER, ref)
        rig.stop()
    # The journal says the money went back; partner 1 still holds it.
    print("STATE", state, [(r.service, r.params.get("partner")) for r in sim2.requests_seen])
    assert trade is not None
    assert not trade.holds_money, (
        f"journal says {state.value}, but Alipay (partner {PARTNER}) still holds "
        f"{trade.amount if hasattr(trade, 'amount') else '?'} for {ref}: money without goods"
    )
