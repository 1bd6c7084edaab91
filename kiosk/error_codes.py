"""What the kiosk does about each Alipay spot.pay error code: query, decline, or go out of service.

A pure table over every code in Alipay's list. Codes not in it (the client's UNRECOGNISED_ERROR
for a malformed one among them), and no code at all, mean "query": an outcome is never guessed.
A refused pay that names an Alipay trade is cancelled before the refusal is final
(`cancel_before_final`), whatever its code.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class Reaction(enum.StrEnum):
    QUERY = "query"  # outcome unknown: query, then cancel
    DECLINE = "decline"  # the buyer's problem: red light, buyer may retry with a fresh code
    OUT_OF_SERVICE = "out_of_service"  # merchant set-up: every further scan would fail; alarm


@dataclass(frozen=True)
class CodeReaction:
    code: str
    reaction: Reaction
    alarm: bool  # a person should look at the kiosk or the merchant account
    why: str


_Q, _D, _OOS = Reaction.QUERY, Reaction.DECLINE, Reaction.OUT_OF_SERVICE

# The rule behind the table. A code that may mean the trade exists, or is in doubt, is QUERY.
# Otherwise ask: would this refusal meet every later customer the same way? Then it is a
# merchant condition, not the buyer's: OUT_OF_SERVICE with an alarm, and the gateway probe
# brings the kiosk back once a signed request passes again (a new customer must not be
# charged the wait of a refusal that was certain). Only a refusal that depends on this buyer
# (their account, app, balance, limits, code) or on this sale's amount, so that the next
# customer or a cheaper item may pass, is a DECLINE; an amount-dependent one that points at the
# merchant's set-up also raises an alarm.
#
# code: (reaction, alarm, why)
_TABLE: dict[str, tuple[Reaction, bool, str]] = {
    # -- outcome unknown, or a trade that might hold the buyer's money: query, then cancel
    "SYSTEM_ERROR": (_Q, False, "Alipay was unavailable; the trade may exist, Alipay says query"),
    "CONTEXT_INCONSISTENT": (
        _Q,
        True,
        "the id exists with other details; the kiosk never reuses an id that way, so its own "
        "record is in doubt and the existing trade may be paid",
    ),
    "TRADE_STATUS_ERROR": (
        _Q,
        True,
        "the trade behind this id is in a state that forbids paying, which may mean it is "
        "already paid; the kiosk never resends an id in that state",
    ),
    "TRADE_BUYER_NOT_MATCH": (
        _Q,
        True,
        "the id already belongs to another buyer's code; the kiosk never does that, and that "
        "trade may be paid",
    ),
    "TRADE_HAS_CLOSE": (
        _Q,
        False,
        "the trade behind this id is closed; a query confirms it is unpaid (or fully reversed) "
        "before the buyer is told",
    ),
    "PULL_MOBILE_CASHIER_FAIL": (
        _Q,
        False,
        "the confirmation step on the buyer's phone failed to start; the trade may still be "
        "waiting for the buyer, so query and cancel close it",
    ),
    # -- merchant set-up: every further scan fails the same way; out of service with alarm
    "ILLEGAL_SIGN": (_OOS, True, "Alipay rejects the kiosk's signature: wrong key or sign_type"),
    "INVALID_PARAMETER": (
        _OOS,
        True,
        "a request parameter is wrong; the payment code is checked locally, so the fault is in "
        "the kiosk's own set-up",
    ),
    "ILLEGAL_ARGUMENT": (
        _OOS,
        True,
        "a request parameter is wrong; the payment code is checked locally, so the fault is in "
        "the kiosk's own set-up",
    ),
    "ILLEGAL_PARTNER": (_OOS, True, "the partner id is not the one Alipay issued"),
    "ILLEGAL_EXTERFACE": (_OOS, True, "the service is not configured for this partner"),
    "ILLEGAL_PARTNER_EXTERFACE": (
        _OOS,
        True,
        "the partner has no access to this service: the agreement is not finalised",
    ),
    "ILLEGAL_SIGN_TYPE": (_OOS, True, "Alipay refuses the configured sign_type"),
    "HAS_NO_PRIVILEGE": (_OOS, True, "the merchant account lacks the privilege for this call"),
    "EXIST_FORBIDDEN_WORD": (_OOS, True, "trans_name holds a forbidden word; fix the config"),
    "SELLER_NOT_EXIST": (_OOS, True, "alipay_seller_id names no account; fix seller_id"),
    "ERROR_SELLER_CERTIFY_LEVEL_LIMIT": (
        _OOS,
        True,
        "the merchant failed PBOC validation; documents are owed to Alipay",
    ),
    "EXCHANGE_AMOUNT_OR_CURRENCY_ERROR": (
        _OOS,
        True,
        "the amount or currency is refused for this merchant: a price or currency set-up fault",
    ),
    "ILLEGAL_SECURITY_PROFILE": (
        _OOS,
        True,
        "no matching key profile at Alipay: the merchant public key is not uploaded",
    ),
    "ILLEGAL_EXTERFACE_FOR_CA_VERIFY": (
        _OOS,
        True,
        "the service may not use certificate verification for this account",
    ),
    "INVALID_RECEIVE_ACCOUNT": (_OOS, True, "the seller is not in Alipay's payee list"),
    "FORBIDDEN_MERCHANT_INDUSTRY": (
        _OOS,
        True,
        "this transaction type is not allowed for the configured merchant industry",
    ),
    "ILLEGAL_MERCHANT_INDUSTRY": (
        _OOS,
        True,
        "secondary_merchant_industry is not a valid MCC; fix the config",
    ),
    "CURRENCY_NOT_SUPPORT": (_OOS, True, "the configured currency is not in the agreement"),
    "TRADE_TOTAL_FEE_ERROR": (
        _OOS,
        True,
        "the amount parameters are refused; the kiosk formats amounts itself, so its price "
        "or currency set-up is wrong",
    ),
    "ACCESS_FORBIDDEN": (_OOS, True, "the merchant has no permission to use the product"),
    "SECONDARY_MERCHANT_ID_BLANK": (
        _OOS,
        True,
        "secondary_merchant_id did not reach Alipay; fix [merchant] in the config",
    ),
    "SECONDARY_MERCHANT_ID_INVALID": (
        _OOS,
        True,
        "the secondary merchant is not registered with Alipay",
    ),
    "STORE_NOT_MATCH": (_OOS, True, "the store id does not match a registered secondary merchant"),
    "SECONDARY_MERCHANT_STATUS_ERROR": (
        _OOS,
        True,
        "the secondary merchant's status at Alipay is abnormal; Alipay business support must act",
    ),
    "PRODUCT_AMOUNT_LIMIT_ERROR": (
        _OOS,
        True,
        "the merchant's product quota is exceeded and Alipay says to contact its technical "
        "support: a quota on the merchant's account meets every later customer the same way "
        "until a person has it raised, so it is the merchant's condition, not the buyer's",
    ),
    # -- a merchant limit that depends on the amount: a cheaper item may still sell
    "RESTRICTED_MERCHANT_INDUSTRY": (
        _D,
        True,
        "the amount is over the industry's limit for this merchant; the limit depends on the "
        "amount, so a cheaper item may pass and later customers are not all refused: this "
        "sale is declined, and the alarm asks a person to look at the prices",
    ),
    # -- the buyer's problem: decline; the buyer may try again with a fresh code or pay otherwise
    "BUYER_NOT_EXIST": (_D, False, "the code names no Alipay account; the buyer pays otherwise"),
    "BUYER_ENABLE_STATUS_FORBID": (
        _D,
        False,
        "the buyer's account is disabled for security; the buyer must contact Alipay",
    ),
    "BUYER_SELLER_EQUAL": (_D, False, "the buyer's account is the seller's own"),
    "CLIENT_VERSION_NOT_MATCH": (_D, False, "the buyer's Alipay app is too old; update it"),
    "SOUNDWAVE_PARSER_FAIL": (
        _D,
        False,
        "the code is not a valid Alipay code (misread or stale); scan a fresh one",
    ),
    "BUYER_BALANCE_NOT_ENOUGH": (_D, False, "the buyer's balance is too low"),
    "TOTAL_FEE_EXCEED": (_D, False, "the amount is over the buyer's limit; pay otherwise"),
    "BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR": (_D, False, "the buyer's daily limit is reached"),
    "BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR": (_D, False, "the buyer's monthly limit is reached"),
    "ERROR_BUYER_CERTIFY_LEVEL_LIMIT": (
        _D,
        False,
        "the buyer has not passed real-name (PBOC) validation",
    ),
    "PAYMENT_REQUEST_HAS_RISK": (_D, False, "Alipay's risk control refused this payment"),
    "NO_PAYMENT_INSTRUMENTS_AVAILABLE": (
        _D,
        False,
        "the buyer has no usable payment instrument; a fresh code may work",
    ),
    "BUYER_BANKCARD_BALANCE_NOT_ENOUGH": (_D, False, "the buyer's bank card balance is too low"),
    "PAYMENT_FAIL": (
        _D,
        False,
        "the payment failed on the buyer's side; the buyer may retry with a fresh code",
    ),
    "MOBILE_PAYMENT_SWITCH_OFF": (_D, False, "the buyer switched off mobile payment"),
    "USER_FACE_PAYMENT_SWITCH_OFF": (_D, False, "the buyer switched off the payment code"),
    "ERROR_BALANCE_PAYMENT_DISABLE": (_D, False, "the buyer switched off balance payment"),
    "BEYOND_PAY_RESTRICTION": (_D, False, "the buyer's payment restriction is exceeded"),
    "NOT_SUPPORT_PAYMENT_INST": (_D, False, "the buyer's Alipay wallet version is not supported"),
}

ALL_CODES: Mapping[str, CodeReaction] = MappingProxyType(
    {code: CodeReaction(code, *entry) for code, entry in _TABLE.items()}
)


def cancel_before_final(alipay_trans_id: str | None) -> bool:
    """Whether a refused (FAILED) pay must be cancelled before its refusal becomes final.

    A refusal that names an Alipay trade (`alipay_trans_id`) says a trade exists at Alipay, and
    a trade that exists may still be waiting for the buyer or be paid later. A cancel closes an
    unpaid trade and reverses a paid one, so the flow cancels it first, whatever the code says;
    a refusal naming no trade left nothing behind to close.
    """
    return bool(alipay_trans_id)


def reaction_for(code: str | None) -> CodeReaction:
    """The reaction to an error code. Unknown codes and no code at all mean QUERY."""
    if code is not None and code in ALL_CODES:
        return ALL_CODES[code]
    if not code:
        return CodeReaction("", Reaction.QUERY, False, "no code proves nothing: query")
    # A code Alipay added later: safe to query, and a person should map it.
    return CodeReaction(code, Reaction.QUERY, True, "a code the kiosk does not know: query")
