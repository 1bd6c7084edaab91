"""Sales through the whole daemon with `vend.driver = "mdb"`: the board emulator on the master
end of a pty, the real MDB driver on the slave end, the real daemon loop, flow, worker and
journal in-process, and the gateway simulator on loopback. One test per row of MDB.md's
"Money rules on MDB"; every wait is on a line, a log event or a condition, never a sleep.
The config is the demo's, in vmc mode, with an mdb vend section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from drivers.mdb_board import MdbBoard
from drivers.vend_fake import FakeVendOutput
from drivers.vend_mdb import MdbTimings, MdbVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.config import Config, VendSection
from kiosk.journal import Journal, TxnState
from kiosk.payment import PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.ports import KioskState, VendResult
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER, payment_code
from tests.loop_rig import Rig, rig_config, rig_factory

WAIT_S = 10.0  # upper bound for anything that should happen promptly
FAST = MdbTimings(
    confirm_s=0.5,
    reader_off_s=0.5,
    prompted_s=1.0,
    liveness_interval_s=600.0,
    liveness_timeout_s=0.3,
    reset_hold_s=0.01,
    reset_boot_s=0.01,
    retry_first_s=0.1,
    retry_max_s=0.5,
)
SETTINGS = ["mdb-addr", "mdb-currency-code", "mdb-always-idle"]


def mdb_config(state_dir: Path, gateway: str, port: str, **vend: Any) -> Config:
    config = rig_config(state_dir, gateway, sale={"mode": "vmc", "price": None})
    section = VendSection(driver="mdb", port=port, baud=115200, timeout_s=2.0, **vend)
    return replace(config, vend=section)


class MdbRig:
    """The board and the kiosk's driver on it, and the daemon started with them."""

    def __init__(self, tmp_path: Path, sim: GatewaySimulator, make: Callable[..., Rig]) -> None:
        self.tmp_path, self.sim, self._make = tmp_path, sim, make
        self.board = MdbBoard.on_pty().start()
        self.mdb: MdbVendOutput | None = None
        self.rig: Rig | None = None

    def start(self, *, approve_within_s: float = 60.0, **options: Any) -> Rig:
        assert self.board.device is not None
        config = options.pop("config", None) or mdb_config(
            self.tmp_path / "state",
            self.sim.url,
            self.board.device,
            approve_within_s=approve_within_s,
        )
        self.mdb = MdbVendOutput(
            self.board.device,
            "USD",
            approve_within_s=approve_within_s,
            timings=FAST,
        )
        self.rig = self._make(config, vend=self.mdb, **options)
        return self.rig

    def ready(self) -> Rig:
        """Started, the board configured and the reader enabled by the machine."""
        rig = self.start()
        assert self.board.wait_reader(True, WAIT_S), self.board.status()
        assert rig.lights.wait_for(KioskState.READY, WAIT_S)
        return rig

    def select(self, amount: str = "1.50", item: str = "12") -> None:
        """The customer picks; the kiosk accepts the request (nothing is sent for OK)."""
        assert self.rig is not None
        mark = self.rig.log.size
        assert self.board.select(amount, item), self.board.status()
        self.rig.log.wait_for("vend.selection", WAIT_S, after=mark - 1, item=item)

    def scan(self, suffix: str, n: int = 1) -> str:
        """Scan a code for the open selection; the ref of the payment it started."""
        assert self.rig is not None
        mark = self.rig.log.size
        self.rig.scanner.scan(payment_code(suffix, n))
        index = self.rig.log.wait_for("payment.start", WAIT_S, after=mark - 1)
        ref: str = self.rig.log.events[index]["ref"]
        return ref

    def result(self, ref: str, timeout: float = WAIT_S) -> dict[str, Any]:
        assert self.rig is not None
        index = self.rig.log.wait_for("payment.result", timeout, ref=ref)
        return self.rig.log.events[index]

    def settled(self, ref: str, timeout: float = WAIT_S) -> TxnState:
        """Wait until the journal holds the transaction final; its state."""
        assert self.rig is not None
        journal = self.rig.kiosk.journal

        def final() -> bool:
            txn = journal.get(ref)
            return txn is not None and txn.final

        assert self.rig.log.wait_until(final, timeout), journal.get(ref)
        txn = journal.get(ref)
        assert txn is not None
        return txn.state

    def approvals(self) -> list[str]:
        return [line for line in self.board.host_lines() if line.startswith("C,VEND")]

    def close(self) -> None:
        self.board.close()


@pytest.fixture
def mdb_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[MdbRig]:
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        rig = MdbRig(tmp_path, simulator, make)
        try:
            yield rig
        finally:
            if rig.rig is not None and rig.rig.thread.is_alive():
                rig.rig.stop()
            rig.close()


def held(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.holds_money


def charged(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.charged


# -- C,VEND only after Alipay confirmed the charge and the journal holds it as vending ---------


def test_paid_and_vended(mdb_rig: MdbRig, simulator: GatewaySimulator) -> None:
    rig = mdb_rig.ready()
    mdb_rig.select("1.5", "12")  # the board's "1.5" is the kiosk's 1.50
    ref = mdb_rig.scan("0001")
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    txn = rig.kiosk.journal.get(ref)
    assert txn is not None and txn.state is TxnState.VENDING  # journaled before C,VEND
    assert txn.amount == Decimal("1.50") and txn.item == "12"
    assert held(simulator, ref)  # Alipay confirmed before C,VEND
    assert mdb_rig.board.success()
    assert mdb_rig.result(ref)["outcome"] == "vended"
    assert mdb_rig.settled(ref) is TxnState.VENDED
    assert held(simulator, ref)
    assert mdb_rig.approvals() == ["C,VEND,1.50"]
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    rig.stop()
    assert mdb_rig.board.host_lines()[-1] == "C,0"  # the machine sells for cash meanwhile


def test_declined(mdb_rig: MdbRig, simulator: GatewaySimulator) -> None:
    rig = mdb_rig.ready()
    mdb_rig.select()
    mdb_rig.board.skip_to_end()
    ref = mdb_rig.scan("2022")  # BUYER_BALANCE_NOT_ENOUGH
    assert mdb_rig.result(ref)["outcome"] == "declined"
    assert mdb_rig.board.next_line(WAIT_S) == "C,STOP"
    assert mdb_rig.approvals() == []
    assert not charged(simulator, ref)
    assert rig.lights.wait_for(KioskState.DECLINED, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)


# -- c,ERR,VEND 3, a request dropped after approval, or silence: FAILURE, reversed -------------


@pytest.mark.parametrize("report", ["fail", "drop"])
def test_vend_failure_reversed(mdb_rig: MdbRig, simulator: GatewaySimulator, report: str) -> None:
    rig = mdb_rig.ready()
    mdb_rig.select()
    ref = mdb_rig.scan("0001")
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    getattr(mdb_rig.board, report)()  # c,ERR,VEND 3 / c,STATUS,IDLE before any SUCCESS
    result = mdb_rig.result(ref)
    assert (result["outcome"], result["reason"]) == ("reversed", "VEND_FAILED")
    assert mdb_rig.settled(ref) is TxnState.CANCELLED
    assert charged(simulator, ref) and not held(simulator, ref)
    assert rig.lights.wait_for(KioskState.DECLINED, WAIT_S)


def test_silence_reversed(mdb_rig: MdbRig, simulator: GatewaySimulator) -> None:
    rig = mdb_rig.ready()
    mdb_rig.select()
    ref = mdb_rig.scan("0001")
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    # No report within vend.timeout_s (2 s).
    result = mdb_rig.result(ref)
    assert (result["outcome"], result["reason"]) == ("reversed", "VEND_FAILED")
    assert mdb_rig.settled(ref) is TxnState.CANCELLED
    assert charged(simulator, ref) and not held(simulator, ref)
    mdb_rig.board.success()  # far too late: logged, the charge stays reversed
    rig.log.wait_for("vend.report_late")
    assert not held(simulator, ref)


# -- a request dropped before approval cancels the payment; nothing is approved late -----------


def test_customer_cancel_before_the_scan(mdb_rig: MdbRig, simulator: GatewaySimulator) -> None:
    rig = mdb_rig.ready()
    mdb_rig.select()
    mark = rig.log.size
    mdb_rig.board.drop()
    rig.log.wait_for("mdb.request_dropped", WAIT_S, after=mark - 1)
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", WAIT_S, after=mark - 1, reason="no selection on the machine")
    assert simulator.requests_seen == []
    assert mdb_rig.approvals() == []
    mdb_rig.select("2.00", "7")  # the next customer is served as usual
    ref = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "2.00"
    mdb_rig.board.success()
    assert mdb_rig.settled(ref) is TxnState.VENDED


def test_customer_cancel_while_the_pay_is_in_flight(
    mdb_rig: MdbRig, simulator: GatewaySimulator
) -> None:
    rig = mdb_rig.ready()
    # Alipay takes the money at once and answers SUCCESS only after a while.
    simulator.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=0.5))
    mdb_rig.select()
    ref = mdb_rig.scan("0001")
    assert simulator.ledger.wait_for_status(PARTNER, ref, "TRADE_SUCCESS", WAIT_S)
    mdb_rig.board.drop()  # the customer pressed cancel on the machine
    rig.log.wait_for("sale.abandoned", WAIT_S)
    result = mdb_rig.result(ref)
    assert result["reason"] == "CANCELLED"
    assert result["outcome"] in ("reversed", "declined")  # declined if the answer came too late
    assert mdb_rig.settled(ref) is TxnState.CANCELLED
    assert charged(simulator, ref) and not held(simulator, ref)  # reversed at Alipay's ledger
    assert mdb_rig.approvals() == []  # no late approval
    txn = rig.kiosk.journal.get(ref)
    assert txn is not None and txn.note in (
        "paid after the customer cancelled",
        "the customer cancelled before approval",
    )
    # The reader is still on and the next customer pays and gets the product.
    assert rig.log.wait_until(lambda: rig.kiosk.status.state is KioskState.READY, WAIT_S)
    mdb_rig.select()
    next_ref = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    mdb_rig.board.success()
    assert mdb_rig.settled(next_ref) is TxnState.VENDED


def test_a_scan_too_late_for_the_machine_s_patience_is_refused_not_charged(
    mdb_rig: MdbRig, simulator: GatewaySimulator
) -> None:
    # approve_within_s 3 s minus what a payment needs (1 s pay, 2 x 0.3 s query, 1 s): a scan
    # must come within 0.4 s of the request, else the request times out.
    rig = mdb_rig.start(approve_within_s=3.0)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    mark = rig.log.size
    mdb_rig.select()
    rig.log.wait_for("vend.scan_timeout", WAIT_S, after=mark - 1)
    assert mdb_rig.board.wait_for_line("C,STOP", WAIT_S)
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", WAIT_S, after=mark - 1, reason="no selection on the machine")
    assert simulator.requests_seen == []


# -- offline or out of service: the reader is off (C,0), and on again (C,1) on return ----------


def test_offline_disables_the_reader_and_enables_it_on_return(
    mdb_rig: MdbRig, simulator: GatewaySimulator
) -> None:
    rig = mdb_rig.ready()
    simulator.go_offline()
    mdb_rig.select()
    mdb_rig.board.skip_to_end()
    ref = mdb_rig.scan("0001")
    assert (mdb_rig.result(ref)["reason"]) == "OFFLINE"
    assert mdb_rig.board.wait_reader(False, WAIT_S)  # C,0: the machine sells for cash
    assert rig.lights.wait_for(KioskState.OFFLINE, WAIT_S)
    assert not mdb_rig.board.select("1.50", "12")  # no cashless selection while offline
    # The probe keeps asking while offline (no sale can prove the gateway is back).
    simulator.go_online()
    rig.log.wait_for("gateway.online", WAIT_S)
    assert mdb_rig.board.wait_reader(True, WAIT_S)  # C,1
    lines = mdb_rig.board.host_lines()
    assert "C,0" in lines and lines[-1] == "C,1"
    mdb_rig.select()
    next_ref = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    mdb_rig.board.success()
    assert mdb_rig.settled(next_ref) is TxnState.VENDED
    assert not charged(simulator, ref)


def test_out_of_service_disables_the_reader_from_the_start_and_enables_it_on_return(
    mdb_rig: MdbRig, simulator: GatewaySimulator, tmp_path: Path
) -> None:
    import threading

    synced = threading.Event()
    config = mdb_config(tmp_path / "state", simulator.url, str(mdb_rig.board.device))
    config = replace(config, kiosk=replace(config.kiosk, require_synced_clock=True))
    rig = mdb_rig.start(config=config, clock_synced=synced.is_set, clock_recheck_s=(0.05, 0.05))
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, WAIT_S)
    assert "C,1" not in mdb_rig.board.host_lines()  # never enabled while out of service
    synced.set()
    rig.log.wait_for("kiosk.back_in_service", WAIT_S, cleared="clock")
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    synced.clear()
    assert mdb_rig.board.wait_reader(False, WAIT_S)
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, WAIT_S)


def test_a_board_that_refuses_its_configuration_is_out_of_service_until_it_accepts(
    mdb_rig: MdbRig, simulator: GatewaySimulator
) -> None:
    mdb_rig.board.refuse("mdb-currency-code")
    rig = mdb_rig.start()
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, WAIT_S)
    problem = rig.kiosk.status.vend_problem
    assert problem is not None and "mdb-currency-code" in problem
    assert rig.kiosk.status.out_of_service is None  # its own field: the driver clears it
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", WAIT_S, reason="out of service")
    assert not mdb_rig.board.reader_on()
    mdb_rig.board.accept_all()  # the board takes it at the next try
    rig.log.wait_for("kiosk.back_in_service", WAIT_S, cleared="vend")
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    assert rig.kiosk.status.vend_problem is None
    assert simulator.requests_seen == []


# -- a board reset while idle: configured again ----------------------------------------------


def test_a_board_reset_mid_idle_reconfigures(mdb_rig: MdbRig) -> None:
    mdb_rig.ready()
    assert mdb_rig.mdb is not None
    configured = mdb_rig.board.config()
    assert sorted(configured) == sorted(SETTINGS)
    mdb_rig.board.reset()  # configuration forgotten, reader off, c,STATUS,INACTIVE unasked
    assert mdb_rig.mdb.wait_configured(WAIT_S, times=2)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    assert mdb_rig.board.config() == configured
    mdb_rig.select()
    ref = mdb_rig.scan("0001")
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50"
    mdb_rig.board.success()
    assert mdb_rig.settled(ref) is TxnState.VENDED


# -- a restart with a vend in flight: reversed unless the machine reports SUCCESS in time -----


class PowerCut(Exception):
    pass


class CutAtTheVend(FakeVendOutput):
    """The kiosk dies between journaling `vending` and the machine's report."""

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        raise PowerCut(ref)


@pytest.mark.parametrize("report", [True, False], ids=["success-in-time", "silence"])
def test_restart_with_a_vend_in_flight(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    tmp_path: Path,
    report: bool,
) -> None:
    state_dir = tmp_path / "state"
    config = mdb_config(state_dir, simulator.url, str(mdb_rig.board.device))
    from kiosk.daemon import flow_settings

    with Journal(state_dir) as journal:
        flow = PaymentFlow(make_client(), journal, CutAtTheVend(), flow_settings(config))
        with pytest.raises(PowerCut) as cut:
            flow.sell(PaymentCode.parse(payment_code("0001")), Decimal("1.50"), "12")
        ref = str(cut.value)
        txn = journal.get(ref)
        assert txn is not None and txn.state is TxnState.VENDING
    assert held(simulator, ref)
    rig = mdb_rig.start(config=config)
    rig.log.wait_for("vend.awaiting_report", WAIT_S, ref=ref)
    # Lines the board sends before the driver has opened the port are lost (pyserial flushes
    # its input on open), as a report during a real restart may be: wait for the link.
    assert mdb_rig.mdb is not None and mdb_rig.mdb.wait_configured(WAIT_S)
    if report:
        mdb_rig.board.success()  # the machine reports the product out within vend.timeout_s
        assert mdb_rig.settled(ref) is TxnState.VENDED
        assert held(simulator, ref)
    else:
        assert mdb_rig.settled(ref) is TxnState.CANCELLED
        assert charged(simulator, ref) and not held(simulator, ref)
    assert mdb_rig.approvals() == []  # nothing approved again after the restart


# -- the serial link keeps SPEC section 4's answer ------------------------------------------


def test_the_serial_link_still_answers_busy_to_a_cancel_while_the_pay_is_in_flight(
    mdb_rig: MdbRig, simulator: GatewaySimulator, tmp_path: Path
) -> None:
    config = rig_config(tmp_path / "serial", simulator.url, sale={"mode": "vmc", "price": None})
    vend = FakeVendOutput()
    simulator.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=0.5))
    rig = mdb_rig._make(config, vend=vend)
    vend.request_vend("tea", "1.50")
    assert vend.wait_for_answer("OK", WAIT_S)
    rig.scanner.scan(payment_code("0001"))
    index = rig.log.wait_for("payment.start", WAIT_S)
    ref = rig.log.events[index]["ref"]
    vend.cancel()
    assert vend.wait_for_answer("BUSY", WAIT_S)
    index = rig.log.wait_for("payment.result", WAIT_S, ref=ref)
    assert rig.log.events[index]["outcome"] == SaleResult.VENDED.value
    assert rig.log.named("sale.abandoned") == []
    assert held(simulator, ref)
