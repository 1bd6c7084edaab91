"""Attack: SPEC rule 6 says the whole payment code never reaches a log line or the disk. The
client copies up to 40 characters of a gateway's unrecognised `<error>` text into `detail`,
which is logged (`alipay.call`) and journaled (`requests.detail`). A gateway (or anything on
the path that answers in its place) whose error text echoes the request's
`buyer_identity_code` puts the whole code into the log and into the journal file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiosk.alipay.client import AlipayClient
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config, rig_factory


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        yield make


def _leaks(text: str, code: str) -> bool:
    return code in text or code in re.sub(r"\D", "", text)


@pytest.mark.parametrize(
    "plan",
    [
        # is_success=F (unsigned, as a gateway rejection is)
        lambda code: FaultPlan(Fault.UNSIGNED_REJECT, service="pay", charge=False,
                               error=f"code {code} bad"),
        # a signed FAILED whose error text is not an upper-case code
        lambda code: FaultPlan(Fault.DECLINE, service="pay", error=f"bad code {code}"),
    ],
    ids=["unsigned_reject", "signed_decline"],
)
def test_attack_gateway_error_text_echoing_the_code_reaches_log_and_journal(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator, plan: Callable
) -> None:
    code = payment_code("0001", 42)
    simulator.inject(plan(code))
    rig = make_rig(rig_config(tmp_path / "state", simulator.url))
    rig.scanner.scan(code)
    rig.log.wait_for("payment.result", 15)
    rig.stop()
    logged = [e for e in rig.log.events if not str(e.get("event", "")).startswith("simulator") and _leaks(json.dumps(e, default=str), code)]
    on_disk = [
        p.name for p in (tmp_path / "state").iterdir() if p.is_file() and code.encode() in p.read_bytes()
    ]
    assert not logged and not on_disk, (
        f"whole code {code} in {len(logged)} log events "
        f"({sorted({e.get('event') for e in logged})}) and in files {on_disk}"
    )
