"""A signer thread that could not be started (no thread to be had for a moment: the
service's task limit, memory) must not wedge the client: that sale is signed in place and
paid, and so is the next, never left waiting for ever on a signature no thread will make.
A signer that is stuck holds a sale up only so long, then the sale signs in place."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay import client as client_module
from kiosk.alipay.client import AlipayClient
from kiosk.journal import Journal
from kiosk.payment import PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.test_payment_flow import SETTINGS

WAIT_S = 10.0  # for what must happen: a sale against the simulator on loopback


@pytest.fixture
def flow(make_client: Callable[..., AlipayClient], journal: Journal) -> Iterator[PaymentFlow]:
    yield PaymentFlow(make_client(), journal, FakeVendOutput(), SETTINGS)


def _sell_on_a_thread(flow: PaymentFlow, n: int) -> tuple[threading.Event, list[object]]:
    done = threading.Event()
    out: list[object] = []

    def run() -> None:
        try:
            out.append(flow.sell(PaymentCode.parse(payment_code("0001", n)), Decimal("1.50"), "x"))
        except BaseException as exc:  # the test looks at it
            out.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="test-sale", daemon=True).start()
    return done, out


def test_a_signer_thread_that_failed_to_start_does_not_wedge_the_next_sale(
    flow: PaymentFlow,
    journal: Journal,
    simulator: GatewaySimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = threading.Thread.start
    refused: list[str] = []

    def start_once_refused(self: threading.Thread) -> None:
        if self.name == "alipay-signer" and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_refused)
    # The first scan finds no thread to sign on: it signs in place, and is paid.
    done, out = _sell_on_a_thread(flow, 1)
    assert done.wait(WAIT_S)
    assert refused == ["alipay-signer"]
    assert out[0].result is SaleResult.VENDED  # type: ignore[attr-defined]
    # Threads are to be had again: the next scan must be paid and vended, not hang.
    done, out = _sell_on_a_thread(flow, 2)
    finished = done.wait(WAIT_S)
    left = [t.state for t in journal.unfinished()]
    assert finished, f"the next sale never ended; journal holds {left}"
    assert out[0].result is SaleResult.VENDED  # type: ignore[attr-defined]
    assert left == []
    pays = [r for r in simulator.requests_seen if r.service == "pay"]
    assert len(pays) == 2 and all(r.verified for r in pays)


def test_a_stuck_signer_holds_a_sale_up_only_so_long(
    flow: PaymentFlow,
    journal: Journal,
    simulator: GatewaySimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The signing thread never answers (a sign that blocks there): the sale waits the
    bounded time, signs in place, and is paid; the next sale starts a new thread."""
    monkeypatch.setattr(client_module, "SIGN_AHEAD_WAIT_S", 0.2)
    unblock = threading.Event()
    signature = flow.client.settings.signature
    sign = signature.sign

    def stuck_on_the_signer(text: str, encoding: str = "utf-8") -> str:
        if threading.current_thread().name == "alipay-signer" and not unblock.is_set():
            unblock.wait(WAIT_S)
        return sign(text, encoding)

    monkeypatch.setattr(signature, "sign", stuck_on_the_signer)
    try:
        done, out = _sell_on_a_thread(flow, 1)
        assert done.wait(WAIT_S), "a stuck signer held the sale for good"
        assert out[0].result is SaleResult.VENDED  # type: ignore[attr-defined]
    finally:
        unblock.set()
    done, out = _sell_on_a_thread(flow, 2)
    assert done.wait(WAIT_S)
    assert out[0].result is SaleResult.VENDED  # type: ignore[attr-defined]
    assert journal.unfinished() == []
    assert [r.service for r in simulator.requests_seen].count("pay") == 2
