"""Attack 2: the board reset / the request dropped and re-selected at the moment of the charge."""

from __future__ import annotations

import pytest

from kiosk.journal import TxnState
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER
from tests.test_mdb_sale import WAIT_S, MdbRig, charged, held, mdb_rig  # noqa: F401


@pytest.mark.parametrize("how", ["reset", "drop-reselect", "reselect-other", "success-early"])
def test_the_machine_moves_at_the_moment_of_the_charge(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    how: str,
) -> None:
    mdb_rig.ready()
    simulator.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=0.4))
    mdb_rig.select("1.50", "12")
    ref = mdb_rig.scan("0001")
    assert simulator.ledger.wait_for_status(PARTNER, ref, "TRADE_SUCCESS", WAIT_S)
    if how == "reset":
        mdb_rig.board.reset()
        assert mdb_rig.board.wait_reader(True, WAIT_S)
        assert mdb_rig.board.select("1.50", "12")
    elif how == "drop-reselect":
        mdb_rig.board.drop()
        assert mdb_rig.board.select("1.50", "12")
    elif how == "reselect-other":
        mdb_rig.board.send_line("c,STATUS,VEND,1.50,13")
    else:
        mdb_rig.board.send_line("c,VEND,SUCCESS")
        mdb_rig.board.send_line("c,VEND,SUCCESS")
    state = mdb_rig.settled(ref, 15)
    approvals = mdb_rig.approvals()
    assert approvals == [], (state, approvals)
    assert state is TxnState.CANCELLED
    assert charged(simulator, ref) and not held(simulator, ref)
