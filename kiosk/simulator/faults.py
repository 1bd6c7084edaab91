"""Faults the gateway simulator can inject, and the magic payment codes that choose one.

A rig or test either injects a `FaultPlan` (by API or `POST /_sim/fault`) or scans a code whose
last 4 digits pick a behaviour (see `plan_for_code` and docs/simulator.md).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any

SERVICES = ("pay", "query", "cancel", "refund")

# The spot.pay error codes of alipay-spot-pay-error-codes.txt, in that file's order. A magic
# code ending in 2NNN declines with entry NNN (1-based): ..2001 SYSTEM_ERROR, ..2022
# BUYER_BALANCE_NOT_ENOUGH. Append only: rigs' code lists depend on the numbering.
SEED_ERROR_CODES: tuple[str, ...] = (
    "SYSTEM_ERROR",  # 001
    "ILLEGAL_SIGN",  # 002
    "INVALID_PARAMETER",  # 003
    "ILLEGAL_ARGUMENT",  # 004
    "ILLEGAL_PARTNER",  # 005
    "ILLEGAL_EXTERFACE",  # 006
    "ILLEGAL_PARTNER_EXTERFACE",  # 007
    "ILLEGAL_SIGN_TYPE",  # 008
    "HAS_NO_PRIVILEGE",  # 009
    "TRADE_BUYER_NOT_MATCH",  # 010
    "TRADE_HAS_CLOSE",  # 011
    "TRADE_STATUS_ERROR",  # 012
    "EXIST_FORBIDDEN_WORD",  # 013
    "SELLER_NOT_EXIST",  # 014
    "BUYER_NOT_EXIST",  # 015
    "BUYER_ENABLE_STATUS_FORBID",  # 016
    "BUYER_SELLER_EQUAL",  # 017
    "CLIENT_VERSION_NOT_MATCH",  # 018
    "SOUNDWAVE_PARSER_FAIL",  # 019
    "CONTEXT_INCONSISTENT",  # 020
    "PRODUCT_AMOUNT_LIMIT_ERROR",  # 021
    "BUYER_BALANCE_NOT_ENOUGH",  # 022
    "TOTAL_FEE_EXCEED",  # 023
    "BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR",  # 024
    "BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR",  # 025
    "ERROR_BUYER_CERTIFY_LEVEL_LIMIT",  # 026
    "ERROR_SELLER_CERTIFY_LEVEL_LIMIT",  # 027
    "PAYMENT_REQUEST_HAS_RISK",  # 028
    "NO_PAYMENT_INSTRUMENTS_AVAILABLE",  # 029
    "BUYER_BANKCARD_BALANCE_NOT_ENOUGH",  # 030
    "PAYMENT_FAIL",  # 031
    "MOBILE_PAYMENT_SWITCH_OFF",  # 032
    "USER_FACE_PAYMENT_SWITCH_OFF",  # 033
    "ERROR_BALANCE_PAYMENT_DISABLE",  # 034
    "EXCHANGE_AMOUNT_OR_CURRENCY_ERROR",  # 035
    "ILLEGAL_SECURITY_PROFILE",  # 036
    "ILLEGAL_EXTERFACE_FOR_CA_VERIFY",  # 037
    "PULL_MOBILE_CASHIER_FAIL",  # 038
    "BEYOND_PAY_RESTRICTION",  # 039
    "NOT_SUPPORT_PAYMENT_INST",  # 040
    "INVALID_RECEIVE_ACCOUNT",  # 041
    "FORBIDDEN_MERCHANT_INDUSTRY",  # 042
    "ILLEGAL_MERCHANT_INDUSTRY",  # 043
    "CURRENCY_NOT_SUPPORT",  # 044
    "TRADE_TOTAL_FEE_ERROR",  # 045
    "RESTRICTED_MERCHANT_INDUSTRY",  # 046
    "ACCESS_FORBIDDEN",  # 047
    "SECONDARY_MERCHANT_ID_BLANK",  # 048
    "SECONDARY_MERCHANT_ID_INVALID",  # 049
    "STORE_NOT_MATCH",  # 050
    "SECONDARY_MERCHANT_STATUS_ERROR",  # 051
)

DEFAULT_DECLINE = "PAYMENT_FAIL"
SLOW_DEFAULT_S = 30.0
BUYER_CONFIRMS_AFTER_S = 2.0


class Fault(enum.StrEnum):
    SLOW_AFTER_CHARGE = "slow_after_charge"  # charge, then answer only after `delay_s`
    DROP_AFTER_CHARGE = "drop_after_charge"  # charge, then close the connection, no answer
    SYSTEM_ERROR_CHARGED = "system_error_charged"  # charge, answer FAILED + SYSTEM_ERROR
    SYSTEM_ERROR_NOT_CHARGED = "system_error_not_charged"  # same answer, no trade created
    HTTP_500 = "http_500"  # 500 with an HTML body; `charge` decides whether the pay went through
    FORGED_SIGNATURE = "forged_signature"  # charge, answer SUCCESS with a wrong signature
    GBK = "gbk"  # answer normally, encoded GBK, with Chinese text in a signed field
    TRUNCATED = "truncated"  # charge, answer cut in the middle
    DECLINE = "decline"  # answer FAILED with `error`, no charge
    WAIT_BUYER_PAY = "wait_buyer_pay"  # UNKNOW; buyer confirms after `delay_s` (None: never)
    CANCEL_WINDOW_CLOSED = "cancel_window_closed"  # cancels fail: FAIL, retry_flag=N
    # Answers a kiosk must never believe; the request's effect happens when `charge` is set.
    UNSIGNED_REJECT = "unsigned_reject"  # is_success=F, <error> `error` (ILLEGAL_SIGN), no sign
    OTHER_TRADE = "other_trade"  # this service's signed answer about another trade
    CANCEL_ANSWER = "cancel_answer"  # a signed cancel SUCCESS (another trade's) in its place


# Faults whose request takes effect only when the plan's `charge` says so.
CHARGE_DECIDES = frozenset(
    {Fault.HTTP_500, Fault.UNSIGNED_REJECT, Fault.OTHER_TRADE, Fault.CANCEL_ANSWER}
)
DEFAULT_UNSIGNED_ERROR = "ILLEGAL_SIGN"


@dataclass
class FaultPlan:
    """One fault, for the next `times` matching requests of `service` (0: until cleared).

    "Charge" generalises per service: the request's effect (pay, cancel, refund) happens.
    CANCEL_WINDOW_CLOSED always concerns cancel, WAIT_BUYER_PAY always pay.
    """

    fault: Fault
    service: str = "pay"  # pay | query | cancel | refund
    error: str | None = None  # for DECLINE and UNSIGNED_REJECT
    delay_s: float | None = None
    charge: bool = True  # for HTTP_500, UNSIGNED_REJECT, OTHER_TRADE, CANCEL_ANSWER
    times: int = 1
    omit: tuple[str, ...] = ()  # answer fields left out (the answer is signed without them)

    def __post_init__(self) -> None:
        self.fault = Fault(self.fault)
        self.omit = tuple(str(name) for name in self.omit)
        if self.fault is Fault.CANCEL_WINDOW_CLOSED:
            self.service = "cancel"
        elif self.fault is Fault.WAIT_BUYER_PAY:
            self.service = "pay"
        if self.service not in SERVICES:
            raise ValueError(f"service must be one of {', '.join(SERVICES)}, not {self.service!r}")
        if self.times < 0:
            raise ValueError("times must be 0 (until cleared) or more")
        if self.delay_s is not None and self.delay_s < 0:
            raise ValueError("delay_s must not be negative")

    @property
    def takes_effect(self) -> bool:
        """Whether the request's effect (charge, cancel, refund) happens under this fault."""
        if self.fault in CHARGE_DECIDES:
            return self.charge
        return self.fault not in (
            Fault.SYSTEM_ERROR_NOT_CHARGED,
            Fault.DECLINE,
            Fault.CANCEL_WINDOW_CLOSED,
        )

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FaultPlan:
        known = {"fault", "service", "error", "delay_s", "charge", "times", "omit"}
        unknown = set(obj) - known - {"partner_trans_id"}
        if unknown:
            raise ValueError(f"unknown FaultPlan fields: {', '.join(sorted(unknown))}")
        if "fault" not in obj:
            raise ValueError("a FaultPlan needs a 'fault'")
        delay = obj.get("delay_s")
        return cls(
            fault=Fault(obj["fault"]),
            service=str(obj.get("service", "pay")),
            error=None if obj.get("error") is None else str(obj["error"]),
            delay_s=None if delay is None else float(delay),
            charge=bool(obj.get("charge", True)),
            times=int(obj.get("times", 1)),
            omit=tuple(str(name) for name in obj.get("omit") or ()),
        )


def plan_for_code(code: str) -> tuple[FaultPlan | None, FaultPlan | None]:
    """The behaviour a magic payment code picks: (plan for its pay, plan for its cancels).

    Last 4 digits: 0000-0999 pay at once; 1001 buyer confirms after 2 s; 1002 buyer never
    confirms; 2NNN decline with SEED_ERROR_CODES[NNN-1] (out of range: PAYMENT_FAIL);
    3001 slow (30 s) after charging; 3002 dropped after charging; 3003 SYSTEM_ERROR charged;
    3004 SYSTEM_ERROR not charged; 3005 HTTP 500 charged; 3006 forged signature; 3007 GBK;
    3008 truncated after charging; 3009 HTTP 500 not charged; 4001 pays at once, but its
    cancels fail (window closed: refund needed). Anything else pays at once.
    """
    tail = code[-4:]
    if len(tail) < 4 or not tail.isdigit():
        return None, None
    if tail[0] == "2":
        number = int(tail[1:])
        error = SEED_ERROR_CODES[number - 1] if 1 <= number <= len(SEED_ERROR_CODES) else None
        return FaultPlan(Fault.DECLINE, error=error or DEFAULT_DECLINE), None
    table: dict[str, tuple[FaultPlan | None, FaultPlan | None]] = {
        "1001": (FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=BUYER_CONFIRMS_AFTER_S), None),
        "1002": (FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None), None),
        "3001": (FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=SLOW_DEFAULT_S), None),
        "3002": (FaultPlan(Fault.DROP_AFTER_CHARGE), None),
        "3003": (FaultPlan(Fault.SYSTEM_ERROR_CHARGED), None),
        "3004": (FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED), None),
        "3005": (FaultPlan(Fault.HTTP_500, charge=True), None),
        "3006": (FaultPlan(Fault.FORGED_SIGNATURE), None),
        "3007": (FaultPlan(Fault.GBK), None),
        "3008": (FaultPlan(Fault.TRUNCATED), None),
        "3009": (FaultPlan(Fault.HTTP_500, charge=False), None),
        "4001": (None, FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0)),
    }
    return table.get(tail, (None, None))


@dataclass
class _Armed:
    plan: FaultPlan
    partner_trans_id: str | None
    left: int  # 0: until cleared


class FaultBook:
    """Injected faults waiting for matching requests; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []

    def add(self, plan: FaultPlan, partner_trans_id: str | None = None) -> None:
        with self._lock:
            self._armed.append(_Armed(plan, partner_trans_id, plan.times))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def take(self, service: str, partner_trans_id: str | None) -> FaultPlan | None:
        """The plan for this request, if any; a plan for this very trade wins over a general one."""
        with self._lock:
            candidates = [a for a in self._armed if a.plan.service == service]
            specific = [a for a in candidates if a.partner_trans_id is not None]
            chosen = next(
                (a for a in specific if a.partner_trans_id == partner_trans_id),
                next((a for a in candidates if a.partner_trans_id is None), None),
            )
            if chosen is None:
                return None
            if chosen.left > 0:
                chosen.left -= 1
                if chosen.left == 0:
                    self._armed.remove(chosen)
            return chosen.plan
