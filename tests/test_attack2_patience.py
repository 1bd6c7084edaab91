"""Attack 2: approve_within_s running out while the query loop finds the trade paid."""

from __future__ import annotations

import time

import pytest

from kiosk.journal import TxnState
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.test_mdb_sale import WAIT_S, MdbRig, charged, held, mdb_rig  # noqa: F401

PATIENCE_S = 4.0


@pytest.mark.parametrize("paid_after_s", [2.6, 3.0, 3.3, 3.5, 3.7, 3.9, 4.1])
def test_no_approval_after_the_machine_s_patience(
    mdb_rig: MdbRig,
    simulator: GatewaySimulator,
    paid_after_s: float,
) -> None:
    rig = mdb_rig.start(approve_within_s=PATIENCE_S)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    simulator.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=paid_after_s))
    mark = rig.log.size
    t0 = time.monotonic()
    assert mdb_rig.board.select("1.50", "12")
    rig.log.wait_for("vend.selection", WAIT_S, after=mark - 1)
    ref = mdb_rig.scan("0001")
    approved = mdb_rig.board.wait_approved(8.0)
    t_approved = time.monotonic() - t0
    if approved is not None:
        assert t_approved <= PATIENCE_S + 0.05, t_approved
        mdb_rig.board.success()
        assert mdb_rig.settled(ref, 15) is TxnState.VENDED
        assert held(simulator, ref)
    else:
        state = mdb_rig.settled(ref, 15)
        assert state in (TxnState.CANCELLED, TxnState.DECLINED), state
        assert not held(simulator, ref)
