"""SPEC rule 7 (a code seen in the last 3 minutes is refused locally, without a request)
survives a restart: the keyed hash of every code sold is journaled with its sale (the key in
the journal too), and a restarted kiosk remembers the codes of the window. After
`systemctl restart`, a watchdog restart or a crash, a second scan of the same screen within
seconds is refused, not sent to Alipay a second time. The whole code never reaches the disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config


def test_a_code_sold_before_a_restart_is_refused_after_it_without_a_request(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    code = payment_code("0001", 5)
    first = make_rig(config)
    first.scanner.scan(code)
    first.log.wait_for("payment.result", 15)
    first.stop()
    first.kiosk.journal.close()
    mark = first.log.size
    second = make_rig(config)  # restarted a few seconds later (same state_dir)
    second.scanner.scan(code)  # the customer scans the same screen again
    second.log.wait_until(
        lambda: (
            second.log.index("payment.result", mark - 1) is not None
            or second.log.index("scan.refused", mark - 1) is not None
        ),
        15,
    )
    second.stop()
    pays = [r for r in simulator.requests_seen if r.service == "pay"]
    assert len(pays) == 1, (
        f"{len(pays)} pay requests carried the same code (last 4 {code[-4:]}) within seconds; "
        "rule 7 wants the second refused locally (DENIED CODE_REUSED) without a request"
    )
    assert second.log.index("scan.refused", mark - 1, reason="CODE_REUSED") is not None
    second.kiosk.journal.close()
    for f in (tmp_path / "state").iterdir():
        assert code.encode() not in f.read_bytes(), f"{f.name} holds a whole payment code"
