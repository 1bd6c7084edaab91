"""The payment flow against the gateway simulator on loopback: every unknown outcome is
resolved by query then cancel, every failed vend is reversed, and the ledger agrees."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient, Outcome, PayOrder, PayResult
from kiosk.alipay.signing import SignType
from kiosk.errors import JournalError, KeyFileError
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.payment import (
    BEIJING,
    FlowSettings,
    PaymentFlow,
    SaleResult,
    cancel_window_open,
    refunds_paused,
    trans_create_time,
)
from kiosk.payment_code import PaymentCode
from kiosk.ports import VendResult
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER, payment_code

PRICE = Decimal("1.50")
SETTINGS = FlowSettings(
    terminal_id="VM-TEST",
    currency="USD",
    trans_name="Vending purchase",
    extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1", "terminal_id": "VM-TEST"},
    query_interval_s=0.05,
    query_deadline_s=1.0,
    vend_timeout_s=0.5,
    cancel_tries_in_foreground=2,
    retry_base_s=0.01,
    retry_max_s=0.05,
)


class Watch:
    def __init__(self) -> None:
        self.events: list[str] = []

    def reachable(self) -> None:
        self.events.append("reachable")

    def unreachable(self) -> None:
        self.events.append("unreachable")

    def merchant_problem(self, code: str) -> None:
        self.events.append(f"merchant:{code}")

    def vending(self, ref: str) -> None:
        self.events.append("vending")


@pytest.fixture
def vend() -> FakeVendOutput:
    return FakeVendOutput()


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def make_flow(
    make_client: Callable[..., AlipayClient],
    journal: Journal,
    vend: FakeVendOutput,
    watch: Watch,
) -> Iterator[Callable[..., PaymentFlow]]:
    def make(sign_type: SignType = SignType.RSA2, **overrides: object) -> PaymentFlow:
        settings = FlowSettings(**{**SETTINGS.__dict__, **overrides})  # type: ignore[arg-type]
        return PaymentFlow(make_client(sign_type), journal, vend, settings, watch=watch)

    yield make


def sell(flow: PaymentFlow, suffix: str, n: int = 1) -> object:
    return flow.sell(PaymentCode.parse(payment_code(suffix, n)), PRICE, "coffee")


def settle_all(flow: PaymentFlow, journal: Journal, rounds: int = 50) -> None:
    """What the journal worker does, in the test's thread: settle until nothing is open."""
    for _ in range(rounds):
        open_ = journal.unfinished()
        if not open_:
            return
        for txn in open_:
            flow.settle(txn)
    raise AssertionError(f"still unfinished: {[t.state for t in journal.unfinished()]}")


def held(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.holds_money


# -- paid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sign_type", list(SignType))
def test_paid_scan_vends_and_the_ledger_holds_the_money(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
    sign_type: SignType,
) -> None:
    sale = sell(make_flow(sign_type), "0001")
    assert sale.result is SaleResult.VENDED
    assert vend.approvals == [(sale.ref, PRICE)]
    assert held(simulator, sale.ref)
    txn = journal.get(sale.ref)
    assert txn is not None and txn.state is TxnState.VENDED


def test_pay_is_journaled_before_it_is_sent(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
) -> None:
    flow = make_flow()
    seen: list[list[str]] = []
    real_pay = flow.client.pay

    def pay(order: PayOrder) -> PayResult:
        seen.append([r["kind"] for r in journal.requests_for(order.partner_trans_id)])
        return real_pay(order)

    flow.client.pay = pay  # type: ignore[method-assign]
    sell(flow, "0001")
    assert seen == [["pay"]]


class _RecordingSignature:
    """The client's signature, noting the thread of each sign."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sign_type = inner.sign_type
        self.signed_on: list[str] = []

    def sign(self, text: str, encoding: str = "utf-8") -> str:
        self.signed_on.append(threading.current_thread().name)
        return self._inner.sign(text, encoding)

    def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool:
        return self._inner.verify(text, signature, encoding)


def test_the_pay_is_signed_beside_its_commit_and_sent_only_after_it(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
    simulator: GatewaySimulator,
) -> None:
    """The RSA sign runs on the client's own thread while the sale's thread makes the first
    commit durable; the request still leaves only once that commit is done."""
    flow = make_flow()
    signature = _RecordingSignature(flow.client.settings.signature)
    flow.client.settings = dataclasses.replace(flow.client.settings, signature=signature)
    sent_after: list[list[str]] = []
    send = flow.client._send

    def journaled_then_send(gateway: str, body: bytes, read_timeout_s: float) -> Any:
        with Journal(journal.path.parent, read_only=True) as reader:  # committed rows only
            sent_after.append([t.state.value for t in reader.listing()])
        return send(gateway, body, read_timeout_s)

    flow.client._send = journaled_then_send  # type: ignore[method-assign]
    sale = sell(flow, "0001")
    assert sale.result is SaleResult.VENDED  # type: ignore[attr-defined]
    assert signature.signed_on == ["alipay-signer"]
    assert sent_after == [["paying"]]
    assert [r.service for r in simulator.requests_seen] == ["pay"]


def test_a_pay_signed_for_a_commit_that_failed_is_never_sent(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
    simulator: GatewaySimulator,
) -> None:
    """Signed beside a commit that then fails (the disk refused it): nothing leaves, and the
    next scan is paid with its own signature, never the one left over."""
    flow = make_flow()
    real = journal._conn
    refused = []

    class CommitRefused:
        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT" and not refused:
                refused.append(sql)
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    journal._conn = CommitRefused()  # type: ignore[assignment]
    with pytest.raises(JournalError):
        sell(flow, "0001", 1)
    journal._conn = real
    assert simulator.requests_seen == []
    sale = sell(flow, "0001", 2)
    assert sale.result is SaleResult.VENDED  # type: ignore[attr-defined]
    paid = [r for r in simulator.requests_seen if r.service == "pay"]
    assert [r.params["partner_trans_id"] for r in paid] == [sale.ref]  # type: ignore[attr-defined]
    assert paid[0].verified  # signed for this very order


def test_a_sign_that_fails_on_the_signing_thread_fails_the_sale_as_before(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
    simulator: GatewaySimulator,
) -> None:
    """The error comes back to the sale (nothing hangs, nothing is swallowed) and the pay
    is not sent; the journaled transaction is left for the worker to settle."""
    flow = make_flow()

    class Broken:
        sign_type = flow.client.settings.signature.sign_type

        def sign(self, text: str, encoding: str = "utf-8") -> str:
            raise KeyFileError("the key went away")

        def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool:
            return False

    flow.client.settings = dataclasses.replace(flow.client.settings, signature=Broken())
    with pytest.raises(KeyFileError, match="the key went away"):
        sell(flow, "0001")
    assert simulator.requests_seen == []
    assert [t.state for t in journal.unfinished()] == [TxnState.PAYING]


def test_a_pay_whose_answer_was_lost_is_never_sent_again(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
) -> None:
    """The code is not in the journal, and nothing needs it: a restart queries and cancels."""
    open_and_pay(make_flow(), "VM-TEST-1", "0001")
    settle_all(make_flow(), journal)
    services = [r.service for r in simulator.requests_seen]
    assert services.count("pay") == 1 and "cancel" in services
    assert journal.get("VM-TEST-1").state is TxnState.CANCELLED
    assert not held(simulator, "VM-TEST-1")


# -- declined -----------------------------------------------------------------------------


def test_buyer_problem_declines_without_charge_or_query(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
) -> None:
    sale = sell(make_flow(), "2022")  # BUYER_BALANCE_NOT_ENOUGH
    assert (sale.result, sale.reason) == (SaleResult.DECLINED, "BUYER_BALANCE_NOT_ENOUGH")
    assert [r.service for r in simulator.requests_seen] == ["pay"]
    assert journal.get(sale.ref).state is TxnState.DECLINED


def test_merchant_configuration_code_takes_the_kiosk_out_of_service(
    make_flow: Callable[..., PaymentFlow],
    watch: Watch,
) -> None:
    sale = sell(make_flow(), "2049")  # SECONDARY_MERCHANT_ID_INVALID
    assert sale.result is SaleResult.OUT_OF_SERVICE
    assert "merchant:SECONDARY_MERCHANT_ID_INVALID" in watch.events


def test_unreachable_gateway_is_a_known_refusal_not_an_unknown(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    watch: Watch,
) -> None:
    simulator.go_offline()
    sale = sell(make_flow(), "0001")
    assert (sale.result, sale.reason) == (SaleResult.DECLINED, "OFFLINE")
    assert journal.get(sale.ref).final
    assert "unreachable" in watch.events
    assert simulator.ledger.trades() == []


def test_backup_gateway_takes_the_identical_pay_when_the_primary_refuses(
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    client = make_client(gateway="http://127.0.0.1:9/gateway.do", backup=simulator.url)
    flow = PaymentFlow(client, journal, vend, SETTINGS)
    sale = sell(flow, "0001")
    assert sale.result is SaleResult.VENDED and held(simulator, sale.ref)


# -- unknown outcomes: query, then cancel ---------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "why"),
    [
        ("1001", "buyer confirms on the phone"),
        ("3001", "slow answer after charging"),
        ("3002", "connection dropped after charging"),
        ("3003", "SYSTEM_ERROR after charging"),
        ("3005", "HTTP 500 after charging"),
        ("3006", "forged signature on a real charge"),
        ("3008", "truncated answer after charging"),
    ],
)
def test_unknown_outcome_is_resolved_by_query_and_vends(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    suffix: str,
    why: str,
) -> None:
    flow = make_flow(query_deadline_s=4.0)
    sale = sell(flow, suffix)
    assert sale.result is SaleResult.VENDED, why
    services = [r.service for r in simulator.requests_seen]
    assert services[0] == "pay" and "query" in services, why
    assert journal.get(sale.ref).state is TxnState.VENDED


@pytest.mark.parametrize(
    ("suffix", "why"),
    [
        ("3004", "SYSTEM_ERROR, not charged"),
        ("3009", "HTTP 500, not charged"),
        ("1002", "buyer never confirms"),
    ],
)
def test_unknown_outcome_never_paid_is_cancelled_after_the_deadline(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
    suffix: str,
    why: str,
) -> None:
    sale = sell(make_flow(query_deadline_s=0.3), suffix)
    assert (sale.result, sale.reason) == (SaleResult.DECLINED, "TIMEOUT"), why
    assert vend.approvals == []
    assert not held(simulator, sale.ref)
    assert journal.get(sale.ref).state is TxnState.CANCELLED
    assert "cancel" in [r.service for r in simulator.requests_seen]


def test_gbk_answer_is_decoded_and_verified(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
) -> None:
    sale = sell(make_flow(), "3007")
    assert sale.result is SaleResult.VENDED
    assert [r.service for r in simulator.requests_seen] == ["pay"]


def test_forged_answers_everywhere_never_approve_a_vend(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    for service in ("pay", "query", "cancel"):
        simulator.inject(FaultPlan(Fault.FORGED_SIGNATURE, service=service, times=0))
    flow = make_flow(query_deadline_s=0.3)
    sale = sell(flow, "0001")
    assert sale.result is SaleResult.UNRESOLVED
    assert vend.approvals == []
    simulator.clear_faults()
    settle_all(flow, journal)
    assert not held(simulator, sale.ref)
    assert journal.get(sale.ref).state is TxnState.CANCELLED


# -- after payment: the vend ------------------------------------------------------------------


@pytest.mark.parametrize("vend_result", [VendResult.FAILED, VendResult.TIMED_OUT])
def test_failed_vend_is_reversed_by_cancel(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
    vend_result: VendResult,
) -> None:
    vend.script(vend_result)
    sale = sell(make_flow(), "0001")
    assert sale.result is SaleResult.REVERSED
    assert not held(simulator, sale.ref)
    assert simulator.ledger.trade(PARTNER, sale.ref).charged
    assert journal.get(sale.ref).state is TxnState.CANCELLED


def test_failed_vend_past_the_cancel_window_is_refunded(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    vend.script(VendResult.FAILED)
    sale = sell(make_flow(), "4001")  # pays; its cancels fail with retry_flag=N
    assert sale.result is SaleResult.REVERSED
    trade = simulator.ledger.trade(PARTNER, sale.ref)
    assert trade.refunded == PRICE and not trade.holds_money
    assert journal.get(sale.ref).state is TxnState.REFUNDED


# -- the background: network loss and restarts --------------------------------------------------


def test_charge_then_network_loss_is_reversed_when_the_gateway_returns(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
    watch: Watch,
) -> None:
    simulator.inject(FaultPlan(Fault.DROP_AFTER_CHARGE))
    flow = make_flow(query_deadline_s=0.3)
    real_pay = flow.client.pay

    def pay_then_lose_network(order: PayOrder) -> PayResult:
        result = real_pay(order)
        simulator.go_offline()
        return result

    flow.client.pay = pay_then_lose_network  # type: ignore[method-assign]
    sale = sell(flow, "0001")
    assert sale.result is SaleResult.UNRESOLVED
    assert held(simulator, sale.ref) and vend.approvals == []
    assert journal.get(sale.ref).state is TxnState.CANCELLING
    assert "unreachable" in watch.events
    simulator.go_online()
    settle_all(flow, journal)
    assert not held(simulator, sale.ref)


@pytest.mark.parametrize("state", [TxnState.PAYING, TxnState.QUERYING, TxnState.PAID])
def test_restart_with_a_charge_in_flight_reverses_it(
    make_flow: Callable[..., PaymentFlow],
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    state: TxnState,
) -> None:
    txn = open_and_pay(make_flow(), "VM-TEST-crash", "0001")  # then the kiosk died
    journal.update(txn, state=state)
    settle_all(make_flow(), journal)
    assert not held(simulator, "VM-TEST-crash")
    assert journal.get("VM-TEST-crash").state is TxnState.CANCELLED


def test_restart_with_a_pay_journaled_but_never_sent_burns_the_id(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
) -> None:
    open_row(journal, "VM-TEST-unsent", "0001")
    settle_all(make_flow(), journal)
    assert journal.get("VM-TEST-unsent").state is TxnState.CANCELLED
    assert simulator.ledger.trade(PARTNER, "VM-TEST-unsent") is None


@pytest.mark.parametrize(
    ("report", "final"),
    [(VendResult.VENDED, TxnState.VENDED), (VendResult.TIMED_OUT, TxnState.CANCELLED)],
)
def test_restart_mid_vend_waits_for_the_controller_then_reverses(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
    report: VendResult,
    final: TxnState,
) -> None:
    txn = open_and_pay(make_flow(), "VM-TEST-vending", "0001")
    journal.update(txn, state=TxnState.VENDING)
    vend.script_report(report)
    settle_all(make_flow(), journal)
    assert vend.awaited == ["VM-TEST-vending"]
    assert journal.get("VM-TEST-vending").state is final
    assert held(simulator, "VM-TEST-vending") == (final is TxnState.VENDED)


def test_stopping_parks_a_query_at_a_journaled_point(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
) -> None:
    flow = make_flow(query_deadline_s=30.0, query_interval_s=0.2)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(sell(flow, "1002")))
    worker.start()
    flow.stopping.set()
    worker.join(10)
    assert not worker.is_alive()
    assert result[0].result is SaleResult.STOPPED
    assert journal.get(result[0].ref).state in (TxnState.QUERYING, TxnState.PAYING)


# -- the cancel window ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created", "now", "open_"),
    [
        # trans_create_time is Beijing time (UTC+8); `now` is UTC
        ("20261126090000", datetime(2026, 11, 26, 15, 59, tzinfo=UTC), True),  # 23:59 Beijing
        ("20261126090000", datetime(2026, 11, 26, 16, 14, tzinfo=UTC), True),  # grace
        ("20261126090000", datetime(2026, 11, 26, 16, 16, tzinfo=UTC), False),
        ("20261126010000", datetime(2026, 11, 26, 15, 0, tzinfo=UTC), True),  # 01:00 → 23:00
        ("20261125230000", datetime(2026, 11, 25, 16, 20, tzinfo=UTC), False),  # 23:00 → 00:20
    ],
)
def test_cancel_window_follows_the_beijing_day(created: str, now: datetime, open_: bool) -> None:
    assert cancel_window_open(created, now) is open_


def test_trans_create_time_is_sent_in_beijing_time(
    make_flow: Callable[..., PaymentFlow], simulator: GatewaySimulator
) -> None:
    before = datetime.now(UTC)
    sell(make_flow(), "0001")
    sent = simulator.requests_seen[0].params["trans_create_time"]
    stamp = datetime.strptime(sent, "%Y%m%d%H%M%S").replace(tzinfo=BEIJING)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert sent == trans_create_time(stamp)


def open_row(journal: Journal, ref: str, suffix: str, stamp: str | None = None) -> Transaction:
    """A transaction as a sale journals it before its pay is sent."""
    return journal.open_transaction(
        ref=ref,
        amount=PRICE,
        currency="USD",
        item="coffee",
        code_last4=suffix,
        trans_create_time=stamp or trans_create_time(datetime.now(UTC)),
    )


def open_and_pay(flow: PaymentFlow, ref: str, suffix: str, stamp: str | None = None) -> Transaction:
    """A journaled transaction whose pay went out (its answer lost with the kiosk)."""
    txn = open_row(flow.journal, ref, suffix, stamp)
    order = PayOrder(
        partner_trans_id=ref,
        amount=PRICE,
        currency="USD",
        buyer_identity_code=payment_code(suffix),
        trans_name=SETTINGS.trans_name,
        trans_create_time=txn.trans_create_time,
        extend_info=SETTINGS.extend_info,
    )
    flow.client.pay(order)
    return txn


@pytest.mark.parametrize(
    ("now", "paused"),
    [
        (datetime(2026, 11, 26, 16, 0, tzinfo=UTC), True),  # 00:00 Beijing
        (datetime(2026, 11, 26, 17, 29, tzinfo=UTC), True),  # 01:29 Beijing
        (datetime(2026, 11, 26, 17, 31, tzinfo=UTC), False),  # 01:31 Beijing
        (datetime(2026, 11, 26, 3, 0, tzinfo=UTC), False),
    ],
)
def test_synchronous_refunds_pause_in_the_beijing_night(now: datetime, paused: bool) -> None:
    assert refunds_paused(now) is paused


def test_attempts_count_only_requests_that_reached_a_gateway(
    make_flow: Callable[..., PaymentFlow], simulator: GatewaySimulator, journal: Journal
) -> None:
    simulator.go_offline()
    offline = sell(make_flow(), "0001", 1)
    assert journal.get(offline.ref).attempts == 0
    simulator.go_online()
    paid = sell(make_flow(query_deadline_s=4.0), "1001", 2)  # pay, then queries until paid
    seen = [r for r in simulator.requests_seen if r.params.get("partner_trans_id") == paid.ref]
    assert journal.get(paid.ref).attempts == len(seen) >= 2


# -- reversal follows Alipay's answer, never the local clock alone ----------------------------

DAYTIME = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)  # 14:00 Beijing: refunds are not paused
THIRTY_HOURS_AGO = trans_create_time(DAYTIME - timedelta(hours=30))


def flow_at(
    make_client: Callable[..., AlipayClient],
    journal: Journal,
    vend: FakeVendOutput,
    now: datetime,
) -> PaymentFlow:
    return PaymentFlow(make_client(), journal, vend, SETTINGS, wall_clock=lambda: now)


def test_restart_past_the_cancel_window_with_a_pay_never_sent_is_cancelled_without_alarm(
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    open_row(journal, "VM-TEST-old", "0001", THIRTY_HOURS_AGO)
    settle_all(flow_at(make_client, journal, vend, DAYTIME), journal)
    txn = journal.get("VM-TEST-old")
    assert txn.state is TxnState.CANCELLED
    assert "refund" not in [r.service for r in simulator.requests_seen]


def test_restart_past_the_cancel_window_with_an_unpaid_trade_is_cancelled_not_refunded(
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    flow = flow_at(make_client, journal, vend, DAYTIME)
    txn = open_and_pay(flow, "VM-TEST-unpaid", "1002", THIRTY_HOURS_AGO)  # waits for the buyer
    journal.update(txn, state=TxnState.QUERYING)
    settle_all(flow, journal)
    assert journal.get("VM-TEST-unpaid").state is TxnState.CANCELLED
    assert "refund" not in [r.service for r in simulator.requests_seen]
    assert not simulator.ledger.trade(PARTNER, "VM-TEST-unpaid").charged


def test_reversal_tries_cancel_first_even_when_the_local_clock_says_the_window_closed(
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    """A clock a day ahead must not turn a same-day reversal into a refund."""
    flow = flow_at(make_client, journal, vend, datetime.now(UTC) + timedelta(days=1))
    txn = open_and_pay(flow, "VM-TEST-ahead", "0001", trans_create_time(datetime.now(UTC)))
    journal.update(txn, state=TxnState.PAID)
    settle_all(flow, journal)
    assert journal.get("VM-TEST-ahead").state is TxnState.CANCELLED
    assert [r.service for r in simulator.requests_seen][-1] == "cancel"
    assert not held(simulator, "VM-TEST-ahead")


def test_cancel_timestamp_is_fresh_on_every_send(
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    ticks = iter(range(10_000))
    flow = PaymentFlow(
        make_client(),
        journal,
        vend,
        SETTINGS,
        wall_clock=lambda: datetime.now(UTC) + timedelta(seconds=next(ticks)),
    )
    txn = open_and_pay(flow, "VM-TEST-retry", "0001")
    journal.update(txn, state=TxnState.CANCELLING)
    simulator.inject(FaultPlan(Fault.SYSTEM_ERROR_CHARGED, service="cancel", times=2))
    settle_all(flow, journal)
    sent = [r.params["timestamp"] for r in simulator.requests_seen if r.service == "cancel"]
    journaled = [
        r["params"]["timestamp"]
        for r in journal.requests_for("VM-TEST-retry")
        if r["kind"] == "cancel"
    ]
    assert len(sent) == 3 and len(set(sent)) == 3
    assert journaled == sent
    assert journal.get("VM-TEST-retry").state is TxnState.CANCELLED


def test_no_file_in_the_state_dir_holds_a_whole_payment_code(
    make_flow: Callable[..., PaymentFlow],
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    flow = make_flow(query_deadline_s=0.2)
    codes = [payment_code(suffix, n) for n, suffix in enumerate(("0001", "1002", "2022"), 1)]
    vend.script(VendResult.VENDED)
    for code in codes:
        flow.sell(PaymentCode.parse(code), PRICE, "coffee")
    files = list(journal.path.parent.iterdir())
    assert any(f.name.endswith("-wal") for f in files)  # open: the WAL is there too
    for f in files:
        data = f.read_bytes()
        for code in codes:
            assert code.encode() not in data, f"{f.name} holds a whole payment code"


# -- refusals that prove nothing never settle money -------------------------------------------


def answer_instead(flow: PaymentFlow, call: str, **fields: object) -> None:
    """The request really goes to the gateway (and takes effect there); the kiosk gets an
    answer with these fields instead, e.g. an unsigned rejection (`is_success=F`)."""
    real = getattr(flow.client, call)

    def replaced(*args: object, **kwargs: object) -> object:
        return dataclasses.replace(real(*args, **kwargs), **fields)

    setattr(flow.client, call, replaced)


UNSIGNED = {"outcome": Outcome.REJECTED, "verified": False}


@pytest.mark.parametrize(
    ("code", "result"),
    [
        ("ILLEGAL_SIGN", SaleResult.OUT_OF_SERVICE),  # a key rotation at Alipay
        ("BUYER_BALANCE_NOT_ENOUGH", SaleResult.DECLINED),
    ],
)
def test_unsigned_pay_refusal_is_shown_but_the_charge_behind_it_is_reversed(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    watch: Watch,
    code: str,
    result: SaleResult,
) -> None:
    flow = make_flow()
    answer_instead(flow, "pay", error=code, alipay_trans_id=None, **UNSIGNED)
    sale = sell(flow, "0001")  # the gateway charged it
    assert (sale.result, sale.reason) == (result, code)
    assert (f"merchant:{code}" in watch.events) is (result is SaleResult.OUT_OF_SERVICE)
    assert not journal.get(sale.ref).final  # not declined on an unsigned word
    settle_all(make_flow(), journal)
    assert journal.get(sale.ref).state is TxnState.CANCELLED
    assert not held(simulator, sale.ref)


def test_unsigned_no_such_trade_never_ends_a_reversal(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    """Cancel says never (retry_flag=N); an unsigned TRADE_NOT_EXIST must not close the books
    on a paid trade: the refund still goes out once a signed query shows it paid."""
    vend.script(VendResult.FAILED)
    flow = make_flow(cancel_tries_in_foreground=1)
    answer_instead(
        flow, "query", error="TRADE_NOT_EXIST", trade_status=None, alipay_trans_id=None, **UNSIGNED
    )
    sale = sell(flow, "4001")  # pays; its cancels fail with retry_flag=N
    assert sale.result is SaleResult.REVERSED
    assert journal.get(sale.ref).state is TxnState.CANCELLING
    assert held(simulator, sale.ref)
    settle_all(make_flow(), journal)
    assert journal.get(sale.ref).state is TxnState.REFUNDED
    assert not held(simulator, sale.ref)


def test_unsigned_refund_refusal_is_retried_not_sent_to_attention(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    vend.script(VendResult.FAILED)
    flow = make_flow(cancel_tries_in_foreground=1)
    answer_instead(flow, "refund", error="ILLEGAL_SIGN", **UNSIGNED)
    sale = sell(flow, "4001")
    for _ in range(3):
        flow.settle(journal.get(sale.ref))
    assert journal.get(sale.ref).state is TxnState.REFUNDING
    settle_all(make_flow(), journal)  # the key works again
    assert journal.get(sale.ref).state is TxnState.REFUNDED
    assert not held(simulator, sale.ref)


def test_refused_pay_naming_a_trade_is_cancelled_before_it_is_final(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
) -> None:
    """PAYMENT_FAIL with an alipay_trans_id: the trade may still be open (here it waits for
    the buyer, who could still confirm). It is closed before the refusal is final."""
    flow = make_flow()
    real = flow.client.pay

    def failed_naming_the_trade(order: PayOrder) -> PayResult:
        answer = real(order)
        trade = simulator.ledger.trade(PARTNER, order.partner_trans_id)
        return dataclasses.replace(
            answer,
            outcome=Outcome.FAILED,
            error="PAYMENT_FAIL",
            alipay_trans_id=trade.alipay_trans_id,
        )

    flow.client.pay = failed_naming_the_trade  # type: ignore[method-assign]
    sale = sell(flow, "1002")  # a trade waiting for the buyer
    assert (sale.result, sale.reason) == (SaleResult.DECLINED, "PAYMENT_FAIL")
    assert journal.get(sale.ref).state is TxnState.CANCELLING
    settle_all(make_flow(), journal)
    txn = journal.get(sale.ref)
    assert (txn.state, txn.error_code) == (TxnState.CANCELLED, "PAYMENT_FAIL")
    assert simulator.ledger.trade(PARTNER, sale.ref).status == "TRADE_CLOSED"


# -- abandoned: the controller dropped the request before approval (MDB) ----------------------


def test_a_sale_abandoned_while_the_pay_is_in_flight_is_reversed_and_never_vended(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    flow = make_flow()
    abandoned = threading.Event()
    real_pay = flow.client.pay

    def pay_while_the_customer_walks_away(order: PayOrder) -> PayResult:
        result = real_pay(order)  # Alipay takes the money ...
        abandoned.set()  # ... while the machine drops the request
        return result

    flow.client.pay = pay_while_the_customer_walks_away  # type: ignore[method-assign]
    states: list[TxnState] = []
    real_update = journal.update

    def update(txn: Transaction, **changes: object) -> Transaction:
        updated = real_update(txn, **changes)  # type: ignore[arg-type]
        states.append(updated.state)
        return updated

    journal.update = update  # type: ignore[method-assign]
    sale = flow.sell(PaymentCode.parse(payment_code("0001")), PRICE, "coffee", abandoned)
    assert (sale.result, sale.reason) == (SaleResult.REVERSED, "CANCELLED")
    assert vend.approvals == []  # never dispensed
    trade = simulator.ledger.trade(PARTNER, sale.ref)
    assert trade is not None and trade.charged and not trade.holds_money
    assert journal.get(sale.ref).state is TxnState.CANCELLED
    # Never journaled as vending: a restart must not wait for a report that is not this sale's.
    assert TxnState.VENDING not in states and states[-1] is TxnState.CANCELLED
    services = [r.service for r in simulator.requests_seen]
    assert services == ["pay", "cancel"]  # cancel first, as for a failed vend


def test_a_sale_abandoned_while_querying_stops_querying_and_cancels(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    flow = make_flow(query_deadline_s=30.0)  # without the abandon it would query for 30 s
    abandoned = threading.Event()
    real_query = flow.client.query
    queries = 0

    def query(*args: object, **kwargs: object) -> object:
        nonlocal queries
        queries += 1
        if queries == 2:
            abandoned.set()  # the customer cancels while the buyer has not confirmed
        return real_query(*args, **kwargs)  # type: ignore[arg-type]

    flow.client.query = query  # type: ignore[method-assign]
    # 1002: UNKNOW, and the buyer never confirms.
    sale = flow.sell(PaymentCode.parse(payment_code("1002")), PRICE, "coffee", abandoned)
    assert (sale.result, sale.reason) == (SaleResult.DECLINED, "CANCELLED")
    assert queries == 2
    assert vend.approvals == []
    assert not held(simulator, sale.ref)
    assert journal.get(sale.ref).state is TxnState.CANCELLED
    assert [r.service for r in simulator.requests_seen][-1] == "cancel"


def test_a_sale_abandoned_before_a_query_finds_it_paid_is_reversed(
    make_flow: Callable[..., PaymentFlow],
    simulator: GatewaySimulator,
    journal: Journal,
    vend: FakeVendOutput,
) -> None:
    flow = make_flow(query_deadline_s=30.0)
    abandoned = threading.Event()
    real_query = flow.client.query

    def query(*args: object, **kwargs: object) -> object:
        result = real_query(*args, **kwargs)  # type: ignore[arg-type]
        abandoned.set()  # dropped while this query was on its way back
        return result

    flow.client.query = query  # type: ignore[method-assign]
    # 3003: charged, the pay answered SYSTEM_ERROR; the first query finds it paid.
    sale = flow.sell(PaymentCode.parse(payment_code("3003")), PRICE, "coffee", abandoned)
    assert (sale.result, sale.reason) == (SaleResult.REVERSED, "CANCELLED")
    assert vend.approvals == []
    assert not held(simulator, sale.ref)
    assert simulator.ledger.trade(PARTNER, sale.ref).charged
    assert journal.get(sale.ref).state is TxnState.CANCELLED


def test_a_sale_not_abandoned_sells_as_before(
    make_flow: Callable[..., PaymentFlow], simulator: GatewaySimulator, vend: FakeVendOutput
) -> None:
    abandoned = threading.Event()
    sale = make_flow().sell(PaymentCode.parse(payment_code("0001")), PRICE, "coffee", abandoned)
    assert sale.result is SaleResult.VENDED
    assert vend.approvals == [(sale.ref, PRICE)]
    assert held(simulator, sale.ref)
