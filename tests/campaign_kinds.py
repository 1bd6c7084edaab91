"""The fault campaign's fault kinds: for each, how one sale is set up on the simulator.

A kind is a function of the campaign's random generator that returns a `Setup`: the last 4
digits of the payment code (the simulator's magic behaviours), plans injected for the next
matching requests (`general`), plans bound to this sale's own trade (`for_code`, armed by the
first pay that carries the code, so query, cancel and refund faults reach this trade and no
other), what the vending controller answers, and whether the gateway is offline or the daemon's
wall clock jumps during the sale.

The kinds are drawn at random, one per transaction. `late_restart` and `long_outage` are not
drawn but scheduled (they need more than one sale's time); see tests/test_campaign.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from kiosk.simulator import Fault, FaultPlan

HOUR = 3600.0
# What the vending controller does with an APPROVED, drawn per sale when the kind leaves it open.
VMC_ANSWERS = ("success", "success", "success", "failure", "silence")

# Codes an unsigned `is_success=F` carries in the campaign: each would be final if believed
# (a merchant error, a buyer's refusal, "no such trade", "closed"); none is signed, so none
# proves anything. ILLEGAL_SIGN is what a key rotation at Alipay looks like.
UNSIGNED_CODES = (
    "ILLEGAL_SIGN",
    "ILLEGAL_SIGN",
    "ILLEGAL_PARTNER",
    "BUYER_BALANCE_NOT_ENOUGH",
    "PAYMENT_FAIL",
    "TRADE_NOT_EXIST",
    "TRADE_HAS_CLOSE",
    "TRADE_STATUS_ERROR",
    "SYSTEM_ERROR",
)
# Error strings no client was written for.
ODD_ERRORS = (
    "SOMETHING ODD",
    "illegal_sign",
    "system_error",
    "trade_not_exist",
    "Trade_Has_Close",
    "ILLEGAL\x01SIGN",
    "NUL\x00BYTE",
    "TAB\tNEWLINE\nCR\r",
    "\x1b[31mESCAPE\x1b[0m",
    "DEL\x7f",
    "LINE\u2028SEPARATOR",
    "错误代码",
    "<b>markup</b> &amp; entities",
    "%s%s%n{0}{ref}",
    " SYSTEM_ERROR ",
    "",
    "E" * 300,
    "L" * 5000,
    "O" * 70000,  # the answer is then over the kiosk's 64 KiB cap
)
# Fields a replayed signed answer leaves out; with `partner_trans_id` gone, nothing in the
# answer names the trade it is about.
OMISSIONS: tuple[tuple[str, ...], ...] = (
    ("partner_trans_id",),
    ("partner_trans_id", "alipay_trans_id"),
    ("partner_trans_id", "trans_amount"),
    ("partner_trans_id", "currency"),
    ("partner_trans_id", "trans_amount", "currency", "alipay_trans_id"),
    ("trans_amount",),
    ("currency",),
)
# How far the daemon's wall clock jumps during a sale (its monotonic clock does not move).
CLOCK_JUMPS = (2 * HOUR, -3 * HOUR, 26 * HOUR, -26 * HOUR, 600.0, -600.0)


@dataclass(frozen=True)
class Setup:
    suffix: str = "0005"
    general: tuple[FaultPlan, ...] = ()
    for_code: tuple[FaultPlan, ...] = ()
    answer: str | None = None  # success | failure | silence; None: drawn
    offline: bool = False
    clock_jump_s: float | None = None
    detail: str = ""  # the variant, for the report


Kind = Callable[[random.Random], Setup]


def _fixed(setup: Setup) -> Kind:
    return lambda rng: setup


# The campaign's first kinds (magic codes and general plans) ---------------------------------

BASIC: dict[str, Kind] = {
    "none": _fixed(Setup("0001")),
    "decline": _fixed(Setup("2022")),
    "decline_other": _fixed(Setup("2031")),
    "confirm_on_phone": _fixed(
        Setup("0002", general=(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=0.3),))
    ),
    "slow_after_charge": _fixed(
        Setup("0003", general=(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=1.0),))
    ),
    "drop_after_charge": _fixed(Setup("3002")),
    "system_error_charged": _fixed(Setup("3003")),
    "system_error_not_charged": _fixed(Setup("3004")),
    "forged_signature": _fixed(Setup("3006")),
    "http_500": _fixed(Setup("3005")),
    "cancel_window_closed": _fixed(Setup("4001")),
    "offline": _fixed(Setup("0004", offline=True)),
}


# Routes to a service: plans that make a sale reach query, cancel or refund ------------------


def _hidden_pay(rng: random.Random) -> FaultPlan:
    """A pay whose outcome the kiosk cannot know, charged or not: it must query."""
    return rng.choice(
        (
            FaultPlan(Fault.DROP_AFTER_CHARGE),
            FaultPlan(Fault.SYSTEM_ERROR_CHARGED),
            FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED),
        )
    )


def _route(rng: random.Random, service: str, plan: FaultPlan) -> Setup:
    """A sale whose `service` requests meet `plan`."""
    if service == "pay":
        return Setup(for_code=(plan,))
    if service == "query":
        return Setup(for_code=(_hidden_pay(rng), plan))
    if service == "cancel":
        if rng.random() < 0.5:  # the outcome stays unknown until the deadline: cancel
            return Setup(for_code=(_hidden_pay(rng), plan))
        return Setup(for_code=(plan,), answer=rng.choice(("failure", "silence")))
    # refund: paid, the vend fails, the cancel window is closed
    return Setup(
        for_code=(FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0), plan),
        answer=rng.choice(("failure", "silence")),
    )


# Unsigned is_success=F, after the effect or not ---------------------------------------------


def unsigned_pay(rng: random.Random) -> Setup:
    charge = rng.random() < 0.7
    error = rng.choice(UNSIGNED_CODES)
    plan = FaultPlan(Fault.UNSIGNED_REJECT, error=error, charge=charge)
    return replace(
        Setup(for_code=(plan,)), detail=f"{error} {'charged' if charge else 'not charged'}"
    )


def unsigned_query(rng: random.Random) -> Setup:
    """Every query of the trade is answered unsigned F (most often TRADE_NOT_EXIST); half the
    time the cancel window is closed too, so the kiosk must ask after a refused cancel."""
    error = rng.choice(("TRADE_NOT_EXIST", "TRADE_NOT_EXIST", "ILLEGAL_SIGN", "TRADE_HAS_CLOSE"))
    plans = [_hidden_pay(rng), FaultPlan(Fault.UNSIGNED_REJECT, "query", error=error, times=0)]
    window = rng.random() < 0.5
    if window:
        plans.append(FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0))
    detail = f"{error} {plans[0].fault}{' window closed' if window else ''}"
    return replace(Setup(for_code=tuple(plans)), detail=detail)


def unsigned_cancel(rng: random.Random) -> Setup:
    error = rng.choice(("ILLEGAL_SIGN", "TRADE_NOT_EXIST", "TRADE_HAS_CLOSE", "SYSTEM_ERROR"))
    charge = rng.random() < 0.5
    plan = FaultPlan(
        Fault.UNSIGNED_REJECT, "cancel", error=error, charge=charge, times=rng.randint(1, 3)
    )
    return replace(
        _route(rng, "cancel", plan), detail=f"{error} {'done' if charge else 'not done'}"
    )


def unsigned_refund(rng: random.Random) -> Setup:
    error = rng.choice(("ILLEGAL_SIGN", "TRADE_NOT_EXIST", "TRADE_HAS_CLOSE", "SYSTEM_ERROR"))
    charge = rng.random() < 0.5
    plan = FaultPlan(
        Fault.UNSIGNED_REJECT, "refund", error=error, charge=charge, times=rng.randint(1, 2)
    )
    return replace(
        _route(rng, "refund", plan), detail=f"{error} {'done' if charge else 'not done'}"
    )


# Signed answers about another trade, or without the fields that say which -------------------


def other_trade_pay(rng: random.Random) -> Setup:
    """The pay is not charged; its answer is another trade's signed pay SUCCESS."""
    omit = rng.choice(((), ("partner_trans_id",), ("partner_trans_id", "alipay_trans_id")))
    plan = FaultPlan(Fault.OTHER_TRADE, charge=False, omit=omit)
    return replace(Setup(for_code=(plan,)), detail=f"omit {','.join(omit) or 'nothing'}")


def cancel_answer_for_pay(rng: random.Random) -> Setup:
    """The pay is not charged; its answer is a signed cancel SUCCESS."""
    return Setup(for_code=(FaultPlan(Fault.CANCEL_ANSWER, charge=False),))


def other_trade_query(rng: random.Random) -> Setup:
    """The trade is never paid; every query is answered with another (paid) trade's signed
    query answer, without the fields that would tell."""
    omit = rng.choice(OMISSIONS)
    pay = rng.choice(
        (FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED), FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
    )
    plan = FaultPlan(Fault.OTHER_TRADE, "query", omit=omit, times=0)
    return replace(Setup(for_code=(pay, plan)), detail=f"omit {','.join(omit)} after {pay.fault}")


# Odd error strings ---------------------------------------------------------------------------


def odd_error_unsigned(rng: random.Random) -> Setup:
    service = rng.choice(("pay", "query", "cancel", "refund"))
    error = rng.choice(ODD_ERRORS)
    plan = FaultPlan(
        Fault.UNSIGNED_REJECT,
        service,
        error=error,
        charge=rng.random() < 0.5,
        times=0 if service == "query" else rng.randint(1, 2),
    )
    return replace(_route(rng, service, plan), detail=f"{service} {error[:20]!r}")


def odd_error_signed(rng: random.Random) -> Setup:
    service = rng.choice(("pay", "query", "cancel", "refund"))
    error = rng.choice(ODD_ERRORS)
    plan = FaultPlan(
        Fault.DECLINE, service, error=error, times=0 if service == "query" else rng.randint(1, 2)
    )
    return replace(_route(rng, service, plan), detail=f"{service} {error[:20]!r}")


# The daemon's wall clock ---------------------------------------------------------------------


def clock_jump(rng: random.Random) -> Setup:
    """A sale that stays open a while; the daemon's wall clock jumps during it and comes back
    once the sale is over (its retries may still be pending)."""
    base = rng.choice(
        (
            Setup("0002", general=(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=0.3),)),
            Setup("3003"),
            Setup("3004"),
            Setup("0006", answer="failure"),
            Setup("4001", answer="silence"),
        )
    )
    jump = rng.choice(CLOCK_JUMPS)
    return Setup(
        base.suffix,
        general=base.general,
        answer=base.answer,
        clock_jump_s=jump,
        detail=f"{jump / HOUR:+.1f} h, code {base.suffix}",
    )


NEW: dict[str, Kind] = {
    "unsigned_pay": unsigned_pay,
    "unsigned_query": unsigned_query,
    "unsigned_cancel": unsigned_cancel,
    "unsigned_refund": unsigned_refund,
    "other_trade_pay": other_trade_pay,
    "cancel_answer_for_pay": cancel_answer_for_pay,
    "other_trade_query": other_trade_query,
    "odd_error_unsigned": odd_error_unsigned,
    "odd_error_signed": odd_error_signed,
    "clock_jump": clock_jump,
}
KINDS: dict[str, Kind] = {**BASIC, **NEW}
CLOCK_KINDS = ("clock_jump", "late_restart")  # need the daemon under libfaketime


# Scheduled kinds -----------------------------------------------------------------------------


def late_restart(rng: random.Random) -> Setup:
    """The daemon is killed with this pay journaled or in flight, then both clocks move on
    ~30 h (past the Beijing-day cancel window) before it starts again."""
    variant, plan = rng.choice(
        (
            ("never created", FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED)),
            ("unpaid", FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None)),
            ("paid, answer in flight", FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=3.0)),
            ("buyer confirms late", FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=0.5)),
        )
    )
    return Setup("0007", for_code=(plan,), detail=variant)
