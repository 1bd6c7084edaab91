"""One kept-alive connection between the Alipay client and the gateway simulator (HTTP/1.1):
calls after the first make no new connection, and an answer a fault spoils (dropped, cut
short, HTTP 500, held past the timeout) ends its connection without spoiling the next call."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from urllib.parse import urlencode

import pytest
import requests

from kiosk.alipay.client import AlipayClient, Outcome, PayOrder
from kiosk.errors import GatewayUnreachable
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER, payment_code

_refs = itertools.count(1)


def order() -> PayOrder:
    n = next(_refs)
    return PayOrder(
        partner_trans_id=f"VM-KA-{n}",
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code=payment_code("0001", n),
        trans_name="Vending purchase",
        trans_create_time="20260101120000",
        extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1"},
    )


def held(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.holds_money


def test_a_client_sends_its_calls_on_one_connection(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    client = make_client(pay_timeout_s=5.0)
    first, second = order(), order()
    assert client.pay(first).outcome is Outcome.SUCCESS
    assert client.query(first.partner_trans_id).outcome is Outcome.SUCCESS
    assert client.pay(second).outcome is Outcome.SUCCESS
    assert simulator.connections_opened == 1


def test_sound_answers_keep_the_connection_open_and_a_spoiled_one_closes_it(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    client = make_client()

    def signed_pay() -> bytes:
        return urlencode(client.pay_params(order())).encode("ascii")

    with requests.Session() as session:
        simulator.inject(FaultPlan(Fault.HTTP_500, charge=False))
        spoiled = session.post(simulator.url, data=signed_pay(), timeout=5)
        assert spoiled.status_code == 500
        assert spoiled.headers.get("Connection") == "close"
        for _ in range(2):
            answer = session.post(simulator.url, data=signed_pay(), timeout=5)
            assert answer.status_code == 200 and b"<result_code>SUCCESS<" in answer.content
            assert answer.headers.get("Connection") != "close"
    # The 500's connection, and one kept for the two sound answers.
    assert simulator.connections_opened == 2


@pytest.mark.parametrize(
    ("plan", "detail"),
    [
        (FaultPlan(Fault.DROP_AFTER_CHARGE), "connection closed without an answer"),
        (FaultPlan(Fault.TRUNCATED), "answer does not parse"),
        (FaultPlan(Fault.HTTP_500, charge=True), "HTTP 500"),
        (FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=20), "read timeout"),
    ],
    ids=["dropped", "truncated", "http-500", "slow"],
)
def test_a_spoiled_answer_on_a_kept_connection_leaves_the_next_call_sound(
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
    plan: FaultPlan,
    detail: str,
) -> None:
    client = make_client(pay_timeout_s=2.0)  # the slow answer waits 20 s
    assert client.pay(order()).outcome is Outcome.SUCCESS  # the connection is open now
    spoiled = order()
    simulator.inject(plan, partner_trans_id=spoiled.partner_trans_id)
    result = client.pay(spoiled)
    assert (result.outcome, result.detail) == (Outcome.UNKNOWN, detail)
    assert held(simulator, spoiled.partner_trans_id)  # charged: the query finds it
    after = order()
    assert client.pay(after).outcome is Outcome.SUCCESS
    assert client.query(spoiled.partner_trans_id).outcome is Outcome.SUCCESS
    assert held(simulator, after.partner_trans_id)
    # The spoiled answer's connection was not used again; one new one for what came after.
    assert simulator.connections_opened == 2


def test_going_offline_cuts_a_kept_connection(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    client = make_client(pay_timeout_s=5.0)
    assert client.pay(order()).outcome is Outcome.SUCCESS
    seen = len(simulator.requests_seen)
    simulator.go_offline()
    offline = order()
    try:
        result = client.pay(offline)
    except GatewayUnreachable:
        pass  # the usual way: the cut connection is noticed before sending
    else:  # sent into the cut connection as it closed: unknown, never an answer
        assert result.outcome is Outcome.UNKNOWN
    assert len(simulator.requests_seen) == seen  # an offline gateway saw nothing
    assert simulator.ledger.trade(PARTNER, offline.partner_trans_id) is None
    simulator.go_online()
    assert client.pay(order()).outcome is Outcome.SUCCESS


def test_a_connection_idle_past_the_reuse_window_is_not_used_again(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    client = AlipayClient(replace(make_client(pay_timeout_s=5.0).settings, reuse_connection_s=0.0))
    try:
        for _ in range(3):
            assert client.pay(order()).outcome is Outcome.SUCCESS
    finally:
        client.close()
    assert simulator.connections_opened == 3
