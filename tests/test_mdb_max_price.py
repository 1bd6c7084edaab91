"""MDB: a selection above `sale.max_price` is refused by the core with `deny()` as its answer
to the request. The driver stops that still-unanswered request with `C,STOP` (SPEC section 7:
refused -> `C,STOP`), so the machine is not left waiting for an approval that never comes."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from tests.test_mdb_sale import WAIT_S, MdbRig, mdb_config, mdb_rig  # noqa: F401


def test_mdb_request_over_max_price_is_stopped(mdb_rig: MdbRig) -> None:  # noqa: F811
    assert mdb_rig.board.device is not None
    config = mdb_config(mdb_rig.tmp_path / "state", mdb_rig.sim.url, mdb_rig.board.device)
    config = replace(config, sale=replace(config.sale, max_price=Decimal("1.00")))
    rig = mdb_rig.start(config=config)
    assert mdb_rig.board.wait_reader(True, WAIT_S)
    mdb_rig.board.skip_to_end()
    mark = rig.log.size
    assert mdb_rig.board.select("1.5", "12")
    rig.log.wait_for("vend.refused", WAIT_S, after=mark - 1, reason="MAX_PRICE")
    stopped = mdb_rig.board.wait_for_line("C,STOP", 3.0)
    open_ = mdb_rig.board.request_open()
    rig.stop()
    assert stopped, f"no C,STOP for a refused request; the machine's request still open: {open_}"
