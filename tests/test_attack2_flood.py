"""Attack 2: odd line floods from the board while a sale is in flight (scratch probes that
must keep the money rules; failures are breaks)."""

from __future__ import annotations

from kiosk.journal import TxnState
from kiosk.ports import KioskState
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER
from tests.test_mdb_sale import WAIT_S, MdbRig, charged, held, mdb_rig  # noqa: F401


def test_a_flood_of_requests_while_the_pay_is_in_flight_approves_nothing_wrong(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
) -> None:
    rig = mdb_rig.ready()
    simulator.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=0.5))
    mdb_rig.select("1.50", "12")
    ref = mdb_rig.scan("0001")
    assert simulator.ledger.wait_for_status(PARTNER, ref, "TRADE_SUCCESS", WAIT_S)
    flood = b"".join(
        f"c,STATUS,VEND,{p},{i % 90 + 1}\n".encode() for i, p in enumerate(["1.50", "2.00"] * 200)
    )
    flood += b"\x00\xff garbage\n" + b"x" * 10000 + b"\nc,ERR,\nc,SET,\nc,STATUS,\nc,,,,\n"
    flood += b"c,STATUS,VEND,1.50,12\n"
    mdb_rig.board.send_bytes(flood)
    assert mdb_rig.settled(ref, 20) in (TxnState.CANCELLED, TxnState.VENDED)
    approvals = mdb_rig.approvals()
    if mdb_rig.settled(ref) is TxnState.VENDED:
        assert approvals == ["C,VEND,1.50"]
    else:
        assert charged(simulator, ref) and not held(simulator, ref)
    # the kiosk serves the next customer
    assert rig.log.wait_until(lambda: rig.kiosk.status.state is KioskState.READY, WAIT_S)
    mdb_rig.board.send_line("c,STATUS,IDLE")
    mdb_rig.board.send_line("c,STATUS,ENABLED")
    rig.log.wait_until(lambda: not rig.kiosk._sale_busy(), WAIT_S)
    mdb_rig.board.skip_to_end()
    mark = rig.log.size
    assert mdb_rig.board.select("1.50", "12"), mdb_rig.board.status()
    rig.log.wait_for("vend.selection", WAIT_S, after=mark - 1, item="12")
    next_ref = mdb_rig.scan("0001", 2)
    assert mdb_rig.board.wait_approved(WAIT_S) == "1.50", (
        mdb_rig.board.status(),
        mdb_rig.board.host_lines()[-10:],
    )
    mdb_rig.board.success()
    assert mdb_rig.settled(next_ref) is TxnState.VENDED
