"""The simulator's clock: `shift_clock` moves the simulated Alipay a day on, its Beijing-day
cancel window shuts and unpaid trades close, as for a kiosk that comes back after 30 hours."""

from __future__ import annotations

import pytest

from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import named_key
from tests.test_simulator import (
    PARTNER,
    Keys,
    call,
    cancel_params,
    held,
    pay_params,
    query_params,
    refund_params,
)

DAY_AND_A_HALF = 30 * 3600.0


@pytest.fixture
def keys() -> Keys:
    return Keys(merchant=named_key("merchant"), alipay=named_key("alipay"))


@pytest.fixture
def sim(simulator: GatewaySimulator) -> GatewaySimulator:
    return simulator


def test_cancel_a_day_later_is_refused_as_past_the_window(
    sim: GatewaySimulator, keys: Keys
) -> None:
    call(sim, keys, "pay", pay_params("T-LATE"))
    sim.shift_clock(DAY_AND_A_HALF)
    answer = call(sim, keys, "cancel", cancel_params("T-LATE"))
    assert (answer.fields["result_code"], answer.fields["retry_flag"]) == ("FAIL", "N")
    assert answer.fields["detail_error_code"] == "TRADE_CANCEL_TIME_OUT"
    assert held(sim, "T-LATE")
    refunded = call(sim, keys, "refund", refund_params("T-LATE", "R-LATE", "1.50"))
    assert refunded.fields["result_code"] == "SUCCESS"
    assert sim.ledger.charged_total() == 0


def test_cancel_the_same_day_still_works(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-SAMEDAY"))
    sim.shift_clock(60.0)
    answer = call(sim, keys, "cancel", cancel_params("T-SAMEDAY"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert not held(sim, "T-SAMEDAY")


def test_never_created_trade_is_still_cancelled_a_day_later(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED))
    call(sim, keys, "pay", pay_params("T-GHOST-LATE"))
    sim.shift_clock(DAY_AND_A_HALF)
    answer = call(sim, keys, "cancel", cancel_params("T-GHOST-LATE"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert sim.ledger.trade(PARTNER, "T-GHOST-LATE") is None


def test_unpaid_trade_closes_when_the_clock_moves_past_its_time(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
    call(sim, keys, "pay", pay_params("T-WAITING"))
    assert call(sim, keys, "query", query_params("T-WAITING")).fields["alipay_trans_status"] == (
        "WAIT_BUYER_PAY"
    )
    sim.shift_clock(DAY_AND_A_HALF)
    answer = call(sim, keys, "query", query_params("T-WAITING"))
    assert answer.fields["alipay_trans_status"] == "TRADE_CLOSED"
    # Created after the shift: the trade lives on the shifted clock, so it is not closed at once.
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
    call(sim, keys, "pay", pay_params("T-WAITING-2"))
    answer = call(sim, keys, "query", query_params("T-WAITING-2"))
    assert answer.fields["alipay_trans_status"] == "WAIT_BUYER_PAY"


def test_pay_time_carries_the_shifted_date(sim: GatewaySimulator, keys: Keys) -> None:
    before = call(sim, keys, "pay", pay_params("T-DATE-1")).fields["alipay_pay_time"]
    sim.shift_clock(DAY_AND_A_HALF)
    after = call(sim, keys, "pay", pay_params("T-DATE-2")).fields["alipay_pay_time"]
    assert after[:8] > before[:8]


def test_control_endpoint_shifts_the_clock(sim: GatewaySimulator) -> None:
    import requests

    base = sim.url.rsplit("/", 1)[0]
    answer = requests.post(f"{base}/_sim/clock", json={"shift_s": 3600}, timeout=5).json()
    assert answer == {"ok": True, "offset_s": 3600.0}
    assert sim.ledger.clock_offset_s == 3600.0
