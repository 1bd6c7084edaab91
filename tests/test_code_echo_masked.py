"""SPEC rule 6: the whole payment code never reaches a log line or the disk, not even when a
gateway (or anything on the path that answers in its place) echoes the request's
`buyer_identity_code` in its `<error>` text. The client masks such text where it enters
(`detail`, and an "error code" made of the code's digits); `event()` and the journal's request
detail mask it again as a backstop. Alipay trade ids (20...) stay readable."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kiosk.alipay.client import UNRECOGNISED_ERROR, normalise_error
from kiosk.log import mask_codes
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config


def _leaks(text: str, code: str) -> bool:
    return code in text or code in re.sub(r"\D", "", text)


@pytest.mark.parametrize(
    "plan",
    [
        # is_success=F (unsigned, as a gateway rejection is)
        lambda code: FaultPlan(
            Fault.UNSIGNED_REJECT, service="pay", charge=False, error=f"code {code} bad"
        ),
        # a signed FAILED whose error text is not an upper-case code
        lambda code: FaultPlan(Fault.DECLINE, service="pay", error=f"bad code {code}"),
    ],
    ids=["unsigned_reject", "signed_decline"],
)
def test_gateway_error_text_echoing_the_code_is_masked_in_log_and_journal(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator, plan: Callable
) -> None:
    code = payment_code("0001", 42)
    simulator.inject(plan(code))
    rig = make_rig(rig_config(tmp_path / "state", simulator.url))
    rig.scanner.scan(code)
    rig.log.wait_for("payment.result", 15)
    rig.stop()
    logged = [
        e
        for e in rig.log.events
        if not str(e.get("event", "")).startswith("simulator")
        and _leaks(json.dumps(e, default=str), code)
    ]
    on_disk = [
        p.name
        for p in (tmp_path / "state").iterdir()
        if p.is_file() and code.encode() in p.read_bytes()
    ]
    assert not logged and not on_disk, (
        f"whole code {code} in {len(logged)} log events "
        f"({sorted({e.get('event') for e in logged})}) and in files {on_disk}"
    )


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("code 281234567890123456 bad", "code **************3456 bad"),
        ("x2512345678901234y", "x************1234y"),  # inside other text, 16 digits
        ("300012345678901234567890", "********************7890"),  # 24 digits
        ("9912345678901234567890123456", "************************3456"),  # may hold one
        ("trade 2013112011001004330000121536", "trade 2013112011001004330000121536"),
        ("partner 2088123456789012", "partner 2088123456789012"),  # starts 20
        ("241234567890123456", "241234567890123456"),  # starts 24: not a code
        ("28123456789012", "28123456789012"),  # 14 digits: too short
    ],
)
def test_mask_codes(text: str, masked: str) -> None:
    assert mask_codes(text) == masked


def test_an_error_code_made_of_the_buyers_code_is_not_kept_as_a_code() -> None:
    code = payment_code("0001", 42)
    assert normalise_error(f"E{code}") == (
        UNRECOGNISED_ERROR,
        f"(E{'*' * (len(code) - 4)}{code[-4:]})",
    )
