"""The four MAPI services as the simulated Alipay runs them: pay, query, cancel, refund.

Each takes the verified request's parameters and the fault that applies (if any), changes the
ledger under its lock, and returns the fields of `<response><alipay>`. Every answer, success or
refusal, echoes the fields that tie it to its request (pay: `partner_trans_id`, `trans_amount`,
`currency`; query: the trade's ids, and its amount and currency when it exists; cancel:
`out_trade_no`; refund: `partner_trans_id`, `partner_refund_id`, `refund_amount`, `currency`),
as a client believes only an answer that names what it asked. Transport faults (slow, dropped,
HTTP 500, forged, GBK, truncated) are the gateway's business, not these functions'.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from decimal import Decimal

from kiosk.money import CURRENCY_RE, format_amount, parse_amount
from kiosk.simulator.faults import DEFAULT_DECLINE, Fault, FaultPlan, plan_for_code
from kiosk.simulator.ledger import Ledger, Trade, TradeStatus, mark_paid

Fields = dict[str, str]

# Alipay's code for a payment code already used on another trade is not documented; the seed
# list's "make sure the cashier doesn't scan the user's barcode repeatedly" fits best.
STALE_CODE_ERROR = "SOUNDWAVE_PARSER_FAIL"
# Not documented for MAPI either: Alipay's names for these refusals elsewhere in its APIs.
CANCEL_WINDOW_ERROR = "TRADE_CANCEL_TIME_OUT"
REFUND_TOO_MUCH_ERROR = "REFUND_AMT_RESTRICTION"

# CNY per unit, fixed so answers are reproducible.
EXCHANGE_RATES = {
    "CNY": Decimal("1"),
    "USD": Decimal("7.1"),
    "EUR": Decimal("7.7"),
    "GBP": Decimal("9.0"),
    "HKD": Decimal("0.91"),
    "SGD": Decimal("5.3"),
    "JPY": Decimal("0.048"),
    "KRW": Decimal("0.0052"),
}

_CREATE_TIME = re.compile(r"^\d{14}$")
_CODE = re.compile(r"^\d{16,24}$")


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def _rate(currency: str) -> Decimal:
    return EXCHANGE_RATES.get(currency, Decimal("1"))


def _trade_fields(trade: Trade) -> Fields:
    rate = _rate(trade.currency)
    digits = int(trade.buyer_code_hash[:12], 16)
    fields = {
        "partner_trans_id": trade.partner_trans_id,
        "alipay_trans_id": trade.alipay_trans_id,
        "alipay_buyer_login_id": f"138****{digits % 10000:04d}",
        "alipay_buyer_user_id": f"2088{digits % 10**12:012d}",
        "currency": trade.currency,
        "trans_amount": format_amount(trade.amount, trade.currency),
        "exchange_rate": f"{rate:.8f}",
        "trans_amount_cny": str((trade.amount * rate).quantize(Decimal("0.01"))),
    }
    if trade.pay_time is not None:
        fields["alipay_pay_time"] = trade.pay_time
    return fields


def _failed(error: str, result_code: str = "FAILED", **fields: str) -> Fields:
    return {"result_code": result_code, "error": error, **fields}


def _echo(params: dict[str, str], *names: str) -> Fields:
    """The request's own values of `names`, as a refusal echoes them."""
    return {name: params.get(name, "") for name in names}


def _pay_echo(params: dict[str, str]) -> Fields:
    return _echo(params, "partner_trans_id", "trans_amount", "currency")


# spot.pay -------------------------------------------------------------------------------


def _pay_parameter_error(partner: str, params: dict[str, str]) -> str | None:
    required = (
        "alipay_seller_id",
        "trans_name",
        "partner_trans_id",
        "currency",
        "trans_amount",
        "buyer_identity_code",
        "identity_code_type",
        "trans_create_time",
    )
    if any(not params.get(name) for name in required):
        return "INVALID_PARAMETER"
    if len(params["partner_trans_id"]) > 64 or len(params["trans_name"]) > 256:
        return "INVALID_PARAMETER"
    if params["identity_code_type"] != "barcode":
        return "INVALID_PARAMETER"
    if not _CREATE_TIME.match(params["trans_create_time"]):
        return "INVALID_PARAMETER"
    currency = params["currency"]
    if not CURRENCY_RE.match(currency):
        return "INVALID_PARAMETER"
    try:
        parse_amount(params["trans_amount"], currency)
    except ValueError:
        return "INVALID_PARAMETER"
    if params["alipay_seller_id"] != partner:
        return "SELLER_NOT_EXIST"
    extend = params.get("extend_info", "")
    try:
        extend_info = json.loads(extend) if extend else {}
    except ValueError:
        return "INVALID_PARAMETER"
    if not isinstance(extend_info, dict):
        return "INVALID_PARAMETER"
    # Alipay's current rules: secondary merchant and store are required.
    if not extend_info.get("secondary_merchant_id"):
        return "SECONDARY_MERCHANT_ID_BLANK"
    if not extend_info.get("store_id"):
        return "INVALID_PARAMETER"
    if not _CODE.match(params["buyer_identity_code"]):
        return "SOUNDWAVE_PARSER_FAIL"
    return None


def _answer_for_trade(trade: Trade) -> Fields:
    """What a pay (or a retry of it) says about an existing trade: its real state."""
    if trade.status in (TradeStatus.TRADE_SUCCESS, TradeStatus.TRADE_FINISHED):
        return {"result_code": "SUCCESS", **_trade_fields(trade)}
    if trade.status == TradeStatus.WAIT_BUYER_PAY:
        return {"result_code": "UNKNOW", **_trade_fields(trade)}
    return _failed(
        "TRADE_HAS_CLOSE",
        partner_trans_id=trade.partner_trans_id,
        trans_amount=format_amount(trade.amount, trade.currency),
        currency=trade.currency,
    )


def pay(
    ledger: Ledger,
    partner: str,
    params: dict[str, str],
    injected: FaultPlan | None,
    request_ref: str,
    close_unpaid_after_s: float,
    arm_fault: Callable[[FaultPlan, str], None],
) -> tuple[Fields, FaultPlan | None]:
    """spot.pay: idempotent on (partner, partner_trans_id). Returns the answer and the plan
    that shaped it (the injected one, or the one the payment code's magic digits chose)."""
    error = _pay_parameter_error(partner, params)
    trans_id = params.get("partner_trans_id", "")
    echo = _pay_echo(params)
    if error is not None:
        return _failed(error, **echo), injected
    key = (partner, trans_id)
    code = params["buyer_identity_code"]
    hashed = code_hash(code)
    currency = params["currency"]
    amount = parse_amount(params["trans_amount"], currency)
    with ledger.lock:
        ledger.advance()
        existing = ledger.find(partner, trans_id)
        plan = injected
        if plan is None and existing is None and key not in ledger.magic_played:
            plan, cancel_plan = plan_for_code(code)
            # A magic decline declines every retry; other magic plays once, so a retry of a
            # pay whose outcome was hidden resolves like on the real gateway.
            if cancel_plan is not None or (plan is not None and plan.fault is not Fault.DECLINE):
                ledger.magic_played.add(key)
            if cancel_plan is not None:
                arm_fault(cancel_plan, trans_id)
        if plan is not None and not plan.takes_effect:
            if existing is None:
                ledger.used_codes.setdefault(hashed, key)
            if plan.fault is Fault.DECLINE:
                return _failed(plan.error or DEFAULT_DECLINE, **echo), plan
            return _failed("SYSTEM_ERROR", **echo), plan

        if key in ledger.burnt_ids:
            fields = _failed("TRADE_HAS_CLOSE", **echo)
        elif existing is not None:
            if existing.amount != amount or existing.currency != currency:
                fields = _failed("CONTEXT_INCONSISTENT", **echo)
            elif existing.buyer_code_hash != hashed:
                fields = _failed("TRADE_BUYER_NOT_MATCH", **echo)
            else:
                existing.events.append(f"{request_ref}: pay retried, answered its real state")
                fields = _answer_for_trade(existing)
        elif ledger.used_codes.get(hashed, key) != key:
            fields = _failed(STALE_CODE_ERROR, **echo)
        else:
            ledger.used_codes[hashed] = key
            now = ledger.now()
            trade = Trade(
                partner=partner,
                partner_trans_id=trans_id,
                alipay_trans_id=ledger.next_alipay_trans_id(),
                amount=amount,
                currency=currency,
                buyer_code_hash=hashed,
                created_monotonic=now,
            )
            trade.events.append(f"{request_ref}: created")
            if plan is not None and plan.fault is Fault.WAIT_BUYER_PAY:
                trade.close_at = now + close_unpaid_after_s
                if plan.delay_s is not None:
                    trade.confirm_at = now + plan.delay_s
                trade.events.append(f"{request_ref}: waiting for the buyer to confirm")
            else:
                mark_paid(trade, request_ref, ledger.wall())
            ledger.add(trade)
            fields = _answer_for_trade(trade)
        if plan is not None and plan.fault is Fault.SYSTEM_ERROR_CHARGED:
            fields = _failed("SYSTEM_ERROR", **echo)
        return fields, plan


# overseas.query -------------------------------------------------------------------------


def find_trade(ledger: Ledger, partner: str, params: dict[str, str]) -> Trade | None:
    """The trade a query names: `alipay_trans_id` wins over `partner_trans_id`."""
    with ledger.lock:
        ledger.advance()
        alipay_id = params.get("alipay_trans_id")
        if alipay_id:
            trade = ledger.find_by_alipay_id(alipay_id)
            return trade if trade is not None and trade.partner == partner else None
        return ledger.find(partner, params.get("partner_trans_id", ""))


def query(ledger: Ledger, partner: str, params: dict[str, str], plan: FaultPlan | None) -> Fields:
    echo = _echo(params, "partner_trans_id", "alipay_trans_id")
    if not params.get("partner_trans_id") and not params.get("alipay_trans_id"):
        return _failed("INVALID_PARAMETER", "FAIL")
    with ledger.lock:
        trade = find_trade(ledger, partner, params)
        if trade is not None:
            # The trade's own ids, amount and currency: a refusal about it names it whole.
            echo = {
                "partner_trans_id": trade.partner_trans_id,
                "alipay_trans_id": trade.alipay_trans_id,
                "trans_amount": format_amount(trade.amount, trade.currency),
                "currency": trade.currency,
            }
        if plan is not None and plan.fault in (
            Fault.SYSTEM_ERROR_CHARGED,
            Fault.SYSTEM_ERROR_NOT_CHARGED,
        ):
            return _failed("SYSTEM_ERROR", "FAIL", **echo)
        if plan is not None and plan.fault is Fault.DECLINE:
            return _failed(plan.error or DEFAULT_DECLINE, "FAIL", **echo)
        if trade is None:
            return _failed("TRADE_NOT_EXIST", "FAIL", **echo)
        return {
            "result_code": "SUCCESS",
            "alipay_trans_status": str(trade.status),
            **_trade_fields(trade),
        }


# acquire.cancel -------------------------------------------------------------------------


def cancel(
    ledger: Ledger,
    partner: str,
    params: dict[str, str],
    plan: FaultPlan | None,
    request_ref: str,
) -> Fields:
    out_trade_no = params.get("out_trade_no", "")
    base = {"out_trade_no": out_trade_no}
    if not out_trade_no or not params.get("timestamp", "").isdigit():
        return {
            "result_code": "FAIL",
            "retry_flag": "N",
            "detail_error_code": "INVALID_PARAMETER",
            **base,
        }
    with ledger.lock:
        ledger.advance()
        trade = ledger.find(partner, out_trade_no)
        if trade is not None:
            base["trade_no"] = trade.alipay_trans_id
        if plan is not None and not plan.takes_effect:
            if plan.fault is Fault.CANCEL_WINDOW_CLOSED:
                detail, retry = CANCEL_WINDOW_ERROR, "N"
            elif plan.fault is Fault.DECLINE:
                detail, retry = plan.error or "TRADE_STATUS_ERROR", "N"
            else:
                return {
                    "result_code": "UNKNOWN",
                    "retry_flag": "Y",
                    "detail_error_code": "SYSTEM_ERROR",
                    **base,
                }
            if trade is not None:
                trade.events.append(f"{request_ref}: cancel refused ({detail})")
            return {"result_code": "FAIL", "retry_flag": retry, "detail_error_code": detail, **base}
        trade_no = params.get("trade_no")
        if trade_no and trade is not None and trade_no != trade.alipay_trans_id:
            return {
                "result_code": "FAIL",
                "retry_flag": "N",
                "detail_error_code": "TRADE_NOT_EXIST",
                **base,
                "trade_no": trade_no,  # no trade by this pair: the refusal names what was asked
            }
        if (
            trade is not None
            and trade.status in (TradeStatus.WAIT_BUYER_PAY, TradeStatus.TRADE_SUCCESS)
            and ledger.past_cancel_window(trade)
        ):
            trade.events.append(f"{request_ref}: cancel refused (past the cancel window)")
            return {
                "result_code": "FAIL",
                "retry_flag": "N",
                "detail_error_code": CANCEL_WINDOW_ERROR,
                **base,
            }
        if trade is None:
            ledger.burnt_ids.add((partner, out_trade_no))
            ledger.changed()
        elif trade.status == TradeStatus.WAIT_BUYER_PAY:
            trade.status = TradeStatus.TRADE_CLOSED
            trade.events.append(f"{request_ref}: cancelled before payment, closed")
            ledger.changed()
        elif trade.status == TradeStatus.TRADE_SUCCESS:
            trade.status = TradeStatus.TRADE_CLOSED
            trade.reversed = True
            trade.events.append(
                f"{request_ref}: cancelled after payment, {trade.amount - trade.refunded} "
                f"{trade.currency} given back (fee included)"
            )
            ledger.changed()
        elif trade.status == TradeStatus.TRADE_FINISHED:
            return {
                "result_code": "FAIL",
                "retry_flag": "N",
                "detail_error_code": "TRADE_STATUS_ERROR",
                **base,
            }
        if plan is not None and plan.fault is Fault.SYSTEM_ERROR_CHARGED:
            return {
                "result_code": "UNKNOWN",
                "retry_flag": "Y",
                "detail_error_code": "SYSTEM_ERROR",
                **base,
            }
        return {"result_code": "SUCCESS", "retry_flag": "N", **base}


# spot.refund ----------------------------------------------------------------------------


def refund(
    ledger: Ledger,
    partner: str,
    params: dict[str, str],
    plan: FaultPlan | None,
    request_ref: str,
) -> Fields:
    trans_id = params.get("partner_trans_id", "")
    refund_id = params.get("partner_refund_id", "")
    currency = params.get("currency", "")
    base = _echo(params, "partner_trans_id", "partner_refund_id", "refund_amount", "currency")
    if not trans_id or not refund_id or len(refund_id) > 64 or refund_id == trans_id:
        return _failed("INVALID_PARAMETER", **base)
    try:
        amount = parse_amount(params.get("refund_amount", ""), currency)
    except ValueError:
        return _failed("INVALID_PARAMETER", **base)
    if plan is not None and not plan.takes_effect:
        if plan.fault is Fault.DECLINE:
            return _failed(plan.error or "TRADE_STATUS_ERROR", **base)
        return _failed("SYSTEM_ERROR", **base)
    with ledger.lock:
        ledger.advance()
        trade = ledger.find(partner, trans_id)
        if trade is None:
            return _failed("TRADE_NOT_EXIST", **base)
        previous = trade.refunds.get(refund_id)
        if previous is not None:
            if previous != amount or currency != trade.currency:
                return _failed("CONTEXT_INCONSISTENT", **base)
            trade.events.append(f"{request_ref}: refund {refund_id} retried, nothing moved")
            fields = _refund_fields(trade, refund_id, amount)
        elif currency != trade.currency:
            return _failed("EXCHANGE_AMOUNT_OR_CURRENCY_ERROR", **base)
        elif trade.status == TradeStatus.WAIT_BUYER_PAY:
            return _failed("TRADE_STATUS_ERROR", **base)
        elif not trade.holds_money:
            return _failed("TRADE_HAS_CLOSE", **base)
        elif amount > trade.amount - trade.refunded:
            return _failed(REFUND_TOO_MUCH_ERROR, **base)
        else:
            trade.refunds[refund_id] = amount
            trade.refunded += amount
            trade.events.append(f"{request_ref}: refunded {amount} {trade.currency}")
            if trade.refunded == trade.amount:
                trade.reversed = True
                trade.status = TradeStatus.TRADE_CLOSED
                trade.events.append(f"{request_ref}: refunded in full, closed")
            ledger.changed()
            fields = _refund_fields(trade, refund_id, amount)
        if plan is not None and plan.fault is Fault.SYSTEM_ERROR_CHARGED:
            return _failed("SYSTEM_ERROR", **base)
        return fields


def _refund_fields(trade: Trade, refund_id: str, amount: Decimal) -> Fields:
    rate = _rate(trade.currency)
    return {
        "result_code": "SUCCESS",
        "partner_trans_id": trade.partner_trans_id,
        "alipay_trans_id": trade.alipay_trans_id,
        "partner_refund_id": refund_id,
        "refund_amount": format_amount(amount, trade.currency),
        "currency": trade.currency,
        "exchange_rate": f"{rate:.8f}",
        "refund_amount_cny": str((amount * rate).quantize(Decimal("0.01"))),
    }


# Answers about another trade, for the replay faults (OTHER_TRADE, CANCEL_ANSWER) ---------


def answer_about(ledger: Ledger, trade: Trade, service: str) -> Fields:
    """The signed answer `service` gives about `trade` as it stands, changing nothing: what a
    replayed or misrouted answer would carry."""
    with ledger.lock:
        ledger.advance()
        if service == "pay":
            return _answer_for_trade(trade)
        if service == "query":
            return {
                "result_code": "SUCCESS",
                "alipay_trans_status": str(trade.status),
                **_trade_fields(trade),
            }
        if service == "cancel":
            return {
                "result_code": "SUCCESS",
                "retry_flag": "N",
                "out_trade_no": trade.partner_trans_id,
                "trade_no": trade.alipay_trans_id,
            }
        return _refund_fields(trade, f"{trade.partner_trans_id}-R", trade.amount)
