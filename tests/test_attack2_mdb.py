"""Attack 2: races on the MDB money rules (board emulator on a pty, real driver, real daemon
loop, gateway simulator on loopback). Each test states the rule it expects to hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.alipay.client import AlipayClient
from kiosk.config import Config
from kiosk.journal import Journal, TxnState
from kiosk.payment import PaymentFlow
from kiosk.payment_code import PaymentCode
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.test_mdb_sale import (  # noqa: F401 - the fixture
    WAIT_S,
    CutAtTheVend,
    MdbRig,
    PowerCut,
    charged,
    held,
    mdb_config,
    mdb_rig,
)


class Configs:
    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self) -> Config:
        return self.config


def test_a_reload_lowering_max_price_while_a_selection_is_open_still_charges_the_old_price(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    """sale.max_price is lowered by SIGHUP while the customer's 5.00 selection waits for a
    scan: the reload is applied at once (no sale is busy), but the selection accepted under
    the old cap stays, and the scan is charged 5.00 > the new max_price 2.00."""
    config = mdb_config(tmp_path / "state", simulator.url, str(mdb_rig.board.device))
    configs = Configs(config)
    rig = mdb_rig.start(config=config, reload_config=configs)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    mdb_rig.select("5.00", "12")
    configs.config = replace(config, sale=replace(config.sale, max_price=Decimal("2.00")))
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reloaded", WAIT_S, after=mark - 1)
    assert rig.kiosk.config.sale.max_price == Decimal("2.00")
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_until(
        lambda: bool(rig.log.named("payment.start")) or mdb_rig.board.wait_for_line("C,STOP", 0.05),
        WAIT_S,
    )
    started = rig.log.named("payment.start")
    # The cap in force at the scan must hold: no charge above max_price.
    assert started == [], f"charged above the reloaded max_price: {started}"


def test_a_late_report_of_a_new_sale_settles_the_vend_awaited_after_a_restart(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    tmp_path: Path,
) -> None:
    """A: the kiosk died with a vend approved (VENDING). After the restart the worker awaits
    A's report for vend.timeout_s (6 s). Meanwhile a SIGHUP sets vend.timeout_s = 0.5 and a
    new customer buys B: B's vend times out (reversed), then the machine reports B's product
    out. That c,VEND,SUCCESS is taken as A's report: A is marked VENDED and its money kept,
    though the machine never reported A (rule 2)."""
    state_dir = tmp_path / "state"
    config = mdb_config(state_dir, simulator.url, str(mdb_rig.board.device))
    config = replace(config, vend=replace(config.vend, timeout_s=6.0))
    from kiosk.daemon import flow_settings

    with Journal(state_dir) as journal:
        flow = PaymentFlow(make_client(), journal, CutAtTheVend(), flow_settings(config))
        with pytest.raises(PowerCut) as cut:
            flow.sell(PaymentCode.parse(payment_code("0001")), Decimal("1.50"), "12")
        ref_a = str(cut.value)
    configs = Configs(config)
    rig = mdb_rig.start(config=config, reload_config=configs)
    rig.log.wait_for("vend.awaiting_report", WAIT_S, ref=ref_a)
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    configs.config = replace(config, vend=replace(config.vend, timeout_s=0.5))
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reloaded", WAIT_S, after=mark - 1)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    mdb_rig.select("2.00", "7")
    ref_b = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "2.00"
    result = mdb_rig.result(ref_b)
    assert result["outcome"] == "reversed"
    assert mdb_rig.board.success()  # the machine vends B (its approval stood) and says so
    state_a = mdb_rig.settled(ref_a)
    # The machine's log: it dispensed B only. A was never reported: it must be reversed.
    assert state_a is TxnState.CANCELLED, (state_a, held(simulator, ref_a))


def _vending_row(state_dir: Path, simulator: GatewaySimulator, make_client, config) -> str:
    from kiosk.daemon import flow_settings

    with Journal(state_dir) as journal:
        flow = PaymentFlow(make_client(), journal, CutAtTheVend(), flow_settings(config))
        with pytest.raises(PowerCut) as cut:
            flow.sell(PaymentCode.parse(payment_code("0001")), Decimal("1.50"), "12")
    return str(cut.value)


def test_a_repeated_success_of_a_new_sale_settles_the_vend_awaited_after_a_restart(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    tmp_path: Path,
) -> None:
    """A: the kiosk died with a vend approved. After the restart the machine never reports A
    (it lost it), and the worker awaits A's report for vend.timeout_s. A new customer buys B
    meanwhile; the board repeats B's c,VEND,SUCCESS line. The repeat is taken as A's report:
    A is VENDED and its money kept, though the machine dispensed once, for B (rule 2)."""
    state_dir = tmp_path / "state"
    config = mdb_config(state_dir, simulator.url, str(mdb_rig.board.device))
    config = replace(config, vend=replace(config.vend, timeout_s=6.0))
    ref_a = _vending_row(state_dir, simulator, make_client, config)
    rig = mdb_rig.start(config=config)
    rig.log.wait_for("vend.awaiting_report", WAIT_S, ref=ref_a)
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    mdb_rig.select("2.00", "7")
    ref_b = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "2.00"
    assert mdb_rig.board.success()
    assert mdb_rig.settled(ref_b) is TxnState.VENDED
    mdb_rig.board.send_line("c,VEND,SUCCESS")  # the board repeats its last report
    state_a = mdb_rig.settled(ref_a)
    assert state_a is TxnState.CANCELLED, (state_a, held(simulator, ref_a))


def test_a_success_while_the_next_customer_pays_settles_the_vend_awaited_after_a_restart(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    tmp_path: Path,
) -> None:
    """A awaited after a restart; the machine already holds a new request (so A's vend is
    over for it). A c,VEND,SUCCESS while that request is open and unapproved ends the
    request for MDB.md ("a report about a request nobody approved: the machine ended it"),
    but the driver settles A with it first."""
    state_dir = tmp_path / "state"
    config = mdb_config(state_dir, simulator.url, str(mdb_rig.board.device))
    config = replace(config, vend=replace(config.vend, timeout_s=6.0))
    ref_a = _vending_row(state_dir, simulator, make_client, config)
    rig = mdb_rig.start(config=config)
    rig.log.wait_for("vend.awaiting_report", WAIT_S, ref=ref_a)
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    mdb_rig.select("2.00", "7")  # the machine has moved on: a new session
    mdb_rig.board.send_line("c,VEND,SUCCESS")
    state_a = mdb_rig.settled(ref_a)
    assert state_a is TxnState.CANCELLED, (state_a, held(simulator, ref_a))


def test_two_vends_cut_by_two_crashes_one_report_settles_the_wrong_one(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    tmp_path: Path,
) -> None:
    """A crash loop: A was cut at its vend; during the restart's wait for A's report a new
    sale B was approved and the kiosk died again. Now the journal holds A and B VENDING. The
    machine reports B's product out (the only vend it still knew). The worker awaits A first,
    and the one c,VEND,SUCCESS settles A: A kept, B (which was dispensed) reversed (rule 2:
    A's buyer paid for nothing)."""
    state_dir = tmp_path / "state"
    config = mdb_config(state_dir, simulator.url, str(mdb_rig.board.device))
    config = replace(config, vend=replace(config.vend, timeout_s=3.0))
    ref_a = _vending_row(state_dir, simulator, make_client, config)
    from kiosk.daemon import flow_settings

    with Journal(state_dir) as journal:
        flow = PaymentFlow(make_client(), journal, CutAtTheVend(), flow_settings(config))
        with pytest.raises(PowerCut) as cut:
            flow.sell(PaymentCode.parse(payment_code("0002")), Decimal("2.00"), "7")
        ref_b = str(cut.value)
    rig = mdb_rig.start(config=config)
    rig.log.wait_for("vend.awaiting_report", WAIT_S)
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    mdb_rig.board.success()  # the machine's one report: B's product is out
    state_a, state_b = mdb_rig.settled(ref_a), mdb_rig.settled(ref_b)
    # At most: B kept (its product came out) and A reversed; never A kept for B's product.
    assert state_a is not TxnState.VENDED, (state_a, state_b)
