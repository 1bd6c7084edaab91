"""Attack: SPEC rule 7 (a code seen in the last 3 minutes is refused locally, without a
request) does not survive a restart. `RecentCodes` lives in memory under a per-process random
key, so after `systemctl restart`, a watchdog restart or a crash, a second scan of the same
screen within seconds sends a second pay with the same code to Alipay."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiosk.alipay.client import AlipayClient
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config, rig_factory


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        yield make


def test_attack_same_code_after_a_restart_is_sent_again(
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
        lambda: second.log.index("payment.result", mark - 1) is not None
        or second.log.index("scan.refused", mark - 1) is not None,
        15,
    )
    second.stop()
    pays = [r for r in simulator.requests_seen if r.service == "pay"]
    assert len(pays) == 1, (
        f"{len(pays)} pay requests carried the same code (last 4 {code[-4:]}) within seconds; "
        "rule 7 wants the second refused locally (DENIED CODE_REUSED) without a request"
    )
