"""Every Alipay spot.pay error code has a deliberate reaction; unknown codes are queried."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiosk import error_codes
from kiosk.error_codes import ALL_CODES, Reaction, reaction_for

CODES_FILE = Path(__file__).resolve().parents[2] / "shared/docs/alipay-spot-pay-error-codes.txt"

Q, D, OOS = Reaction.QUERY, Reaction.DECLINE, Reaction.OUT_OF_SERVICE

# The reaction each code must get, restated here so a change to the table is a visible decision.
EXPECTED: dict[str, tuple[Reaction, bool]] = {
    "SYSTEM_ERROR": (Q, False),
    "CONTEXT_INCONSISTENT": (Q, True),
    "TRADE_STATUS_ERROR": (Q, True),
    "TRADE_BUYER_NOT_MATCH": (Q, True),
    "TRADE_HAS_CLOSE": (Q, False),
    "PULL_MOBILE_CASHIER_FAIL": (Q, False),
    "ILLEGAL_SIGN": (OOS, True),
    "INVALID_PARAMETER": (OOS, True),
    "ILLEGAL_ARGUMENT": (OOS, True),
    "ILLEGAL_PARTNER": (OOS, True),
    "ILLEGAL_EXTERFACE": (OOS, True),
    "ILLEGAL_PARTNER_EXTERFACE": (OOS, True),
    "ILLEGAL_SIGN_TYPE": (OOS, True),
    "HAS_NO_PRIVILEGE": (OOS, True),
    "EXIST_FORBIDDEN_WORD": (OOS, True),
    "SELLER_NOT_EXIST": (OOS, True),
    "ERROR_SELLER_CERTIFY_LEVEL_LIMIT": (OOS, True),
    "EXCHANGE_AMOUNT_OR_CURRENCY_ERROR": (OOS, True),
    "ILLEGAL_SECURITY_PROFILE": (OOS, True),
    "ILLEGAL_EXTERFACE_FOR_CA_VERIFY": (OOS, True),
    "INVALID_RECEIVE_ACCOUNT": (OOS, True),
    "FORBIDDEN_MERCHANT_INDUSTRY": (OOS, True),
    "ILLEGAL_MERCHANT_INDUSTRY": (OOS, True),
    "CURRENCY_NOT_SUPPORT": (OOS, True),
    "TRADE_TOTAL_FEE_ERROR": (OOS, True),
    "ACCESS_FORBIDDEN": (OOS, True),
    "SECONDARY_MERCHANT_ID_BLANK": (OOS, True),
    "SECONDARY_MERCHANT_ID_INVALID": (OOS, True),
    "STORE_NOT_MATCH": (OOS, True),
    "SECONDARY_MERCHANT_STATUS_ERROR": (OOS, True),
    "PRODUCT_AMOUNT_LIMIT_ERROR": (OOS, True),
    "RESTRICTED_MERCHANT_INDUSTRY": (D, True),
    "BUYER_NOT_EXIST": (D, False),
    "BUYER_ENABLE_STATUS_FORBID": (D, False),
    "BUYER_SELLER_EQUAL": (D, False),
    "CLIENT_VERSION_NOT_MATCH": (D, False),
    "SOUNDWAVE_PARSER_FAIL": (D, False),
    "BUYER_BALANCE_NOT_ENOUGH": (D, False),
    "TOTAL_FEE_EXCEED": (D, False),
    "BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR": (D, False),
    "BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR": (D, False),
    "ERROR_BUYER_CERTIFY_LEVEL_LIMIT": (D, False),
    "PAYMENT_REQUEST_HAS_RISK": (D, False),
    "NO_PAYMENT_INSTRUMENTS_AVAILABLE": (D, False),
    "BUYER_BANKCARD_BALANCE_NOT_ENOUGH": (D, False),
    "PAYMENT_FAIL": (D, False),
    "MOBILE_PAYMENT_SWITCH_OFF": (D, False),
    "USER_FACE_PAYMENT_SWITCH_OFF": (D, False),
    "ERROR_BALANCE_PAYMENT_DISABLE": (D, False),
    "BEYOND_PAY_RESTRICTION": (D, False),
    "NOT_SUPPORT_PAYMENT_INST": (D, False),
}


def codes_in_alipay_list() -> set[str]:
    if not CODES_FILE.is_file():
        pytest.skip(f"Alipay's error code list is not at {CODES_FILE} (the shared docs folder)")
    text = CODES_FILE.read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Z][A-Z0-9_]+)$", text, flags=re.MULTILINE))


def test_alipay_list_has_51_codes() -> None:
    assert len(codes_in_alipay_list()) == 51


def test_every_code_in_alipay_list_is_mapped() -> None:
    assert codes_in_alipay_list() - set(ALL_CODES) == set()


def test_table_maps_only_codes_in_alipay_list() -> None:
    assert set(ALL_CODES) - codes_in_alipay_list() == set()


def test_expectations_cover_the_whole_table() -> None:
    assert set(EXPECTED) == set(ALL_CODES)


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED.items()))
def test_code_reaction(code: str, expected: tuple[Reaction, bool]) -> None:
    reaction = reaction_for(code)
    assert (reaction.reaction, reaction.alarm) == expected
    assert reaction.code == code
    assert reaction.why


def test_every_out_of_service_code_raises_an_alarm() -> None:
    assert all(r.alarm for r in ALL_CODES.values() if r.reaction is Reaction.OUT_OF_SERVICE)


def test_unknown_code_is_queried() -> None:
    reaction = reaction_for("SOME_NEW_CODE")
    assert reaction.reaction is Reaction.QUERY
    assert reaction.code == "SOME_NEW_CODE"


def test_missing_code_is_queried() -> None:
    assert reaction_for(None).reaction is Reaction.QUERY
    assert reaction_for("").reaction is Reaction.QUERY


def test_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        ALL_CODES["SYSTEM_ERROR"] = ALL_CODES["PAYMENT_FAIL"]  # type: ignore[index]


def test_product_quota_exceeded_is_the_merchants_condition() -> None:
    # The merchant's quota meets every later customer the same way until a person raises it.
    reaction = reaction_for("PRODUCT_AMOUNT_LIMIT_ERROR")
    assert (reaction.reaction, reaction.alarm) == (Reaction.OUT_OF_SERVICE, True)
    assert "every later customer" in reaction.why


def test_industry_amount_limit_stays_a_decline_because_a_cheaper_item_may_pass() -> None:
    reaction = reaction_for("RESTRICTED_MERCHANT_INDUSTRY")
    assert (reaction.reaction, reaction.alarm) == (Reaction.DECLINE, True)
    assert "cheaper item may pass" in reaction.why


def test_a_refused_pay_naming_an_alipay_trade_is_cancelled_before_final() -> None:
    assert error_codes.cancel_before_final("2024010121001004440000000001") is True


def test_a_refused_pay_naming_no_trade_needs_no_cancel() -> None:
    assert error_codes.cancel_before_final(None) is False
    assert error_codes.cancel_before_final("") is False


def test_unrecognised_error_from_the_client_is_queried_with_an_alarm() -> None:
    reaction = reaction_for("UNRECOGNISED_ERROR")
    assert (reaction.reaction, reaction.alarm) == (Reaction.QUERY, True)
