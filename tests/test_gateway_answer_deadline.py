"""`pay_timeout_s` (and the read timeout of query/cancel/refund) bounds the whole answer, not
just each socket read. A gateway, proxy or captive middlebox that sends the headers and then
trickles the body one byte at a time, each just inside the read timeout, must not hold the
sale thread (or the journal worker) past the connect timeout plus the read timeout: the call
ends as an unknown outcome ("answer too slow") and the connection is closed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from kiosk.alipay.client import AlipayClient, GatewaySettings, Outcome, PayOrder
from kiosk.alipay.signing import SignType
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code, signature_for

DRIP_EVERY_S = 0.4  # inside the 0.5 s read timeout
DRIP_BYTES = 25  # ~10 s in all; a real trickle could go on for 64 KiB


@pytest.fixture
def trickler() -> Iterator[str]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                    )
                    for _ in range(DRIP_BYTES):
                        if stop.wait(DRIP_EVERY_S):
                            return
                        conn.sendall(b"1\r\n \r\n")
                    conn.sendall(b"0\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/gateway.do"
    finally:
        stop.set()
        server.close()


def test_a_trickling_answer_ends_unknown_at_the_exchange_deadline(
    trickler: str, simulator: GatewaySimulator
) -> None:
    client = AlipayClient(
        GatewaySettings(
            gateway=trickler,
            partner=PARTNER,
            seller_id=PARTNER,
            signature=signature_for(SignType.RSA2, simulator),
            connect_timeout_s=0.5,
            pay_timeout_s=0.5,
            read_timeout_s=0.5,
        )
    )
    order = PayOrder(
        partner_trans_id="VM-T-1",
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code=payment_code("0001"),
        trans_name="x",
        trans_create_time="20260101120000",
    )
    started = time.monotonic()
    result = client.pay(order)
    elapsed = time.monotonic() - started
    client.close()
    assert elapsed < 3.0, (
        f"pay with pay_timeout_s=0.5 took {elapsed:.1f} s (outcome {result.outcome}): "
        "the read timeout bounds each read, not the answer"
    )
    assert result.outcome is Outcome.UNKNOWN and result.detail == "answer too slow", result
