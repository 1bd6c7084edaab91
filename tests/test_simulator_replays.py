"""The simulator's answers a kiosk must never believe: unsigned `is_success=F` after the effect,
another trade's signed answer, a cancel answer in place of a pay answer, signed answers with
fields left out; and plans bound to a payment code before the kiosk's trade id is known."""

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
    new_code,
    pay_params,
    query_params,
    refund_params,
    verifies,
)


@pytest.fixture
def keys() -> Keys:
    return Keys(merchant=named_key("merchant"), alipay=named_key("alipay"))


@pytest.fixture
def sim(simulator: GatewaySimulator) -> GatewaySimulator:
    return simulator


def test_unsigned_reject_after_the_charge_is_is_success_f_without_a_signature(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.UNSIGNED_REJECT))
    answer = call(sim, keys, "pay", pay_params("T-UNSIGNED"))
    assert (answer.is_success, answer.error) == ("F", "ILLEGAL_SIGN")
    assert answer.sign is None and answer.fields == {}
    assert held(sim, "T-UNSIGNED")
    sent = sim.answers_sent[-1]
    assert (sent.trade, sent.signed, sent.error) == ("T-UNSIGNED", False, "ILLEGAL_SIGN")


def test_unsigned_reject_without_the_charge_creates_nothing(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.UNSIGNED_REJECT, error="BUYER_BALANCE_NOT_ENOUGH", charge=False))
    answer = call(sim, keys, "pay", pay_params("T-UNSIGNED-0"))
    assert (answer.is_success, answer.error) == ("F", "BUYER_BALANCE_NOT_ENOUGH")
    assert sim.ledger.trade(PARTNER, "T-UNSIGNED-0") is None


def test_unsigned_reject_on_refund_after_the_refund(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-UREF"))
    sim.inject(FaultPlan(Fault.UNSIGNED_REJECT, service="refund"))
    answer = call(sim, keys, "refund", refund_params("T-UREF", "R-UREF", "1.50"))
    assert answer.is_success == "F"
    assert not held(sim, "T-UREF")


def test_odd_error_strings_are_served(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.UNSIGNED_REJECT, error="something odd", charge=False))
    assert call(sim, keys, "pay", pay_params("T-ODD")).error == "something odd"
    sim.inject(FaultPlan(Fault.DECLINE, service="query", error="X" * 3000))
    answer = call(sim, keys, "query", query_params("T-ODD"))
    assert answer.fields["error"] == "X" * 3000 and verifies(sim, answer)


def test_other_trade_answers_another_trades_pay_success(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-REAL"))
    sim.inject(FaultPlan(Fault.OTHER_TRADE, charge=False))
    answer = call(sim, keys, "pay", pay_params("T-FOOLED"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert answer.fields["partner_trans_id"] == "T-REAL"
    assert verifies(sim, answer)
    assert sim.ledger.trade(PARTNER, "T-FOOLED") is None
    assert sim.answers_sent[-1].about == "T-REAL"


def test_cancel_answer_in_place_of_a_pay_answer(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-OTHER"))
    sim.inject(FaultPlan(Fault.CANCEL_ANSWER, charge=False))
    answer = call(sim, keys, "pay", pay_params("T-CANCELISH"))
    assert (answer.fields["result_code"], answer.fields["retry_flag"]) == ("SUCCESS", "N")
    assert answer.fields["out_trade_no"] == "T-OTHER"
    assert "partner_trans_id" not in answer.fields and verifies(sim, answer)
    assert held(sim, "T-OTHER")  # a replay changes nothing


def test_omitted_fields_are_left_out_and_the_rest_signed(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-PAID"))
    sim.inject(FaultPlan(Fault.OTHER_TRADE, service="query", omit=("partner_trans_id", "currency")))
    answer = call(sim, keys, "query", query_params("T-NEVER"))
    assert answer.fields["alipay_trans_status"] == "TRADE_SUCCESS"
    assert "partner_trans_id" not in answer.fields and "currency" not in answer.fields
    assert verifies(sim, answer)


def test_plan_for_a_code_binds_to_the_trade_the_code_starts(
    sim: GatewaySimulator, keys: Keys
) -> None:
    code = new_code()
    sim.inject_for_code(code, FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0))
    sim.inject_for_code(code, FaultPlan(Fault.UNSIGNED_REJECT, service="query", times=0))
    call(sim, keys, "pay", pay_params("T-BOUND", code=code))
    call(sim, keys, "pay", pay_params("T-FREE"))
    assert call(sim, keys, "query", query_params("T-BOUND")).is_success == "F"
    assert call(sim, keys, "query", query_params("T-FREE")).is_success == "T"
    assert call(sim, keys, "cancel", cancel_params("T-BOUND")).fields["result_code"] == "FAIL"
    assert call(sim, keys, "cancel", cancel_params("T-FREE")).fields["result_code"] == "SUCCESS"
    sim.clear_faults()
    assert call(sim, keys, "query", query_params("T-BOUND")).is_success == "T"


def test_plan_with_omit_from_json() -> None:
    plan = FaultPlan.from_json(
        {"fault": "other_trade", "service": "query", "omit": ["partner_trans_id"], "charge": False}
    )
    assert plan.omit == ("partner_trans_id",) and not plan.takes_effect
