"""The MAPI client against a crafted gateway on 127.0.0.1: what counts as paid, failed, unknown
or never sent, and what the requests look like on the wire."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlencode

import pytest

from kiosk.alipay.client import (
    AlipayClient,
    CancelResult,
    GatewaySettings,
    Outcome,
    PayOrder,
    PayResult,
    QueryResult,
    RefundResult,
    TradeStatus,
)
from kiosk.alipay.signing import SignType, presign_string
from kiosk.alipay.xml import render_answer
from kiosk.errors import GatewayUnreachable
from kiosk.log import JsonFormatter, TextFormatter
from tests.alipay_fixtures import (
    CraftedGateway,
    KeyPair,
    Received,
    RefusingPort,
    Reply,
    key_pair,
    make_tls_files,
    server_tls,
)

PARTNER = "2088101122334455"
BUYER_CODE = "286512345678901234"
TRANS_ID = "VM0042-20240101120000-0001"


def order(**changes: object) -> PayOrder:
    fields: dict[str, object] = dict(
        partner_trans_id=TRANS_ID,
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code=BUYER_CODE,
        trans_name="Vending purchase",
        trans_create_time="20240101120000",
        extend_info={"store_id": "S-042", "secondary_merchant_id": "M-001", "terminal_id": "T"},
    )
    fields.update(changes)
    return PayOrder(**fields)  # type: ignore[arg-type]


def pay_fields(got: Received, **changes: str | None) -> dict[str, str]:
    """A paid answer echoing the request; a change of None leaves the field out."""
    fields = {
        "result_code": "SUCCESS",
        "partner_trans_id": got.params["partner_trans_id"],
        "alipay_trans_id": "2024010121001004440000000001",
        "alipay_buyer_login_id": "ab***@example.com",
        "currency": got.params["currency"],
        "trans_amount": got.params["trans_amount"],
        "exchange_rate": "7.1234",
        "trans_amount_cny": "10.69",
    }
    fields.update(changes)  # type: ignore[arg-type]
    return {key: value for key, value in fields.items() if value is not None}


def signed(pair: KeyPair, fields: dict[str, str], **kwargs: object) -> Reply:
    return Reply(body=render_answer(fields, pair.alipay, **kwargs))  # type: ignore[arg-type]


@pytest.fixture
def gateway() -> Iterator[CraftedGateway]:
    crafted = CraftedGateway(lambda got: Reply(status=500)).start()
    yield crafted
    crafted.stop()


@pytest.fixture
def refusing() -> Iterator[RefusingPort]:
    port = RefusingPort()
    yield port
    port.close()


@pytest.fixture
def pair() -> KeyPair:
    return key_pair(SignType.RSA2)


def make_client(url: str, pair: KeyPair, **changes: object) -> AlipayClient:
    settings: dict[str, object] = dict(
        gateway=url,
        partner=PARTNER,
        seller_id=PARTNER,
        signature=pair.kiosk,
        connect_timeout_s=2.0,
        pay_timeout_s=5.0,
        read_timeout_s=5.0,
    )
    settings.update(changes)
    return AlipayClient(GatewaySettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
def client(gateway: CraftedGateway, pair: KeyPair) -> Iterator[AlipayClient]:
    with make_client(gateway.url, pair) as made:
        yield made


# -- success and signatures ---------------------------------------------------------------------


@pytest.mark.parametrize("sign_type", list(SignType))
def test_pay_success_for_each_sign_type(gateway: CraftedGateway, sign_type: SignType) -> None:
    pair = key_pair(sign_type)
    gateway.responder = lambda got: signed(pair, pay_fields(got))
    with make_client(gateway.url, pair) as client:
        result = client.pay(order())
    assert result.outcome is Outcome.SUCCESS
    assert result.alipay_trans_id == "2024010121001004440000000001"
    assert result.error is None


@pytest.mark.parametrize("sign_type", list(SignType))
def test_request_is_signed_so_alipay_can_verify_it(
    gateway: CraftedGateway, sign_type: SignType
) -> None:
    pair = key_pair(sign_type)
    gateway.responder = lambda got: signed(pair, pay_fields(got))
    with make_client(gateway.url, pair) as client:
        client.pay(order())
    got = gateway.last()
    assert got.params["sign_type"] == sign_type.value
    assert pair.alipay.verify(presign_string(got.params), got.params["sign"])


def test_signature_covers_input_charset_sent_in_url(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got))
    client.pay(order())
    got = gateway.last()
    assert got.query == {"_input_charset": "UTF-8"}
    without_charset = {k: v for k, v in got.params.items() if k != "_input_charset"}
    assert not pair.alipay.verify(presign_string(without_charset), got.params["sign"])
    assert pair.alipay.verify(presign_string({**got.params, **got.query}), got.params["sign"])


def test_pay_request_carries_mapi_fields_as_a_form(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got))
    client.pay(order())
    got = gateway.last()
    assert got.content_type.startswith("application/x-www-form-urlencoded")
    assert got.params["service"] == "alipay.acquire.overseas.spot.pay"
    assert got.params["partner"] == PARTNER
    assert got.params["alipay_seller_id"] == PARTNER
    assert got.params["biz_product"] == "OVERSEAS_MBARCODE_PAY"
    assert got.params["identity_code_type"] == "barcode"
    assert got.params["trans_amount"] == "1.50"
    assert got.params["buyer_identity_code"] == BUYER_CODE
    assert got.params["trans_create_time"] == "20240101120000"
    assert got.params["extend_info"] == (
        '{"secondary_merchant_id":"M-001","store_id":"S-042","terminal_id":"T"}'
    )
    assert json.loads(got.params["extend_info"])["store_id"] == "S-042"


def test_jpy_amount_is_sent_as_a_whole_number(pair: KeyPair) -> None:
    client = make_client("http://127.0.0.1:9/gateway.do", pair)
    params = client.pay_params(order(amount=Decimal("150"), currency="JPY"))
    assert params["trans_amount"] == "150"


def test_pay_params_are_the_same_for_the_same_order(pair: KeyPair) -> None:
    client = make_client("http://127.0.0.1:9/gateway.do", pair)
    assert client.pay_params(order()) == client.pay_params(order())


def test_order_repr_hides_the_buyer_code() -> None:
    assert BUYER_CODE not in repr(order())


# -- answers that decide, and answers that do not -----------------------------------------------


def test_pay_unknow_gives_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, result_code="UNKNOW"))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "UNKNOW"


def test_pay_failed_gives_failed_with_its_code(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair,
        pay_fields(
            got, result_code="FAILED", error="BUYER_BALANCE_NOT_ENOUGH", alipay_trans_id=None
        ),
    )
    result = client.pay(order())
    assert result.outcome is Outcome.FAILED
    assert result.error == "BUYER_BALANCE_NOT_ENOUGH"


def test_pay_failed_with_system_error_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair, pay_fields(got, result_code="FAILED", error="SYSTEM_ERROR")
    )
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.error == "SYSTEM_ERROR"


def test_gateway_rejection_is_rejected_with_its_code_and_unverified(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    # is_success=F carries no signature by design: the code is shown, but decides nothing.
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="ILLEGAL_SIGN"))
    result = client.pay(order())
    assert result.outcome is Outcome.REJECTED
    assert result.error == "ILLEGAL_SIGN"
    assert result.verified is False
    assert result.alipay_trans_id is None


def test_gateway_rejection_with_system_error_is_unknown(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="SYSTEM_ERROR"))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.error == "SYSTEM_ERROR"


def test_unknown_result_code_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, result_code="PROCESSING"))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert "PROCESSING" in result.detail


@pytest.mark.parametrize("sign_encoding", ["utf-8", "gbk"])
def test_gbk_answer_with_chinese_text_verifies(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, sign_encoding: str
) -> None:
    gateway.responder = lambda got: signed(
        pair,
        pay_fields(got, alipay_buyer_login_id="张三***@qq.com"),
        encoding="GBK",
        sign_encoding=sign_encoding,
    )
    result = client.pay(order())
    assert result.outcome is Outcome.SUCCESS


def test_forged_answer_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    # Signed as UNKNOW, then rewritten to SUCCESS on the way.
    def forged(got: Received) -> Reply:
        body = render_answer(pay_fields(got, result_code="UNKNOW"), pair.alipay)
        return Reply(body=body.replace(b"UNKNOW", b"SUCCESS"))

    gateway.responder = forged
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "bad signature"


def test_answer_signed_with_another_key_is_unknown(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    stranger = key_pair(SignType.MD5)  # any signer that is not Alipay's key
    gateway.responder = lambda got: Reply(
        body=render_answer(pay_fields(got), stranger.alipay).replace(b">MD5<", b">RSA2<")
    )
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "bad signature"


def test_unsigned_answer_is_unknown(gateway: CraftedGateway, client: AlipayClient) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(pay_fields(got), None))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "answer is not signed"


def test_answer_with_another_sign_type_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: Reply(
        body=render_answer(pay_fields(got), pair.alipay).replace(b">RSA2<", b">RSA<")
    )
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert "sign_type" in result.detail


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"<alipay><is_success>T</is_success><response><alipay><result_code>SUC", "parse"),
        (b"\x00\xff garbage \x13", "parse"),
        (b"", "parse"),
        (b"<html><body>Bad gateway</body></html>", "not an <alipay>"),
        (b"<alipay><response/></alipay>", "is_success"),
    ],
    ids=["truncated", "garbage", "empty", "html", "no-is_success"],
)
def test_unreadable_answer_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, body: bytes, detail: str
) -> None:
    gateway.responder = lambda got: Reply(body=body)
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert detail in result.detail


def test_truncated_signed_answer_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(pay_fields(got), pair.alipay)[:-30])
    assert client.pay(order()).outcome is Outcome.UNKNOWN


def test_entity_bomb_is_unknown(gateway: CraftedGateway, client: AlipayClient) -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE alipay [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b"<alipay><is_success>T</is_success><error>&c;</error></alipay>"
    )
    gateway.responder = lambda got: Reply(body=bomb)
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert "DTD" in result.detail


def test_answer_over_64_kib_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    def huge(got: Received) -> Reply:
        body = render_answer(pay_fields(got, exchange_rate="7" * 70_000), pair.alipay)
        return Reply(body=body, content_length=False)

    gateway.responder = huge
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert "64 KiB" in result.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [("partner_trans_id", "VM0042-other"), ("trans_amount", "15.00"), ("currency", "HKD")],
)
def test_answer_naming_other_details_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, field: str, value: str
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, **{field: value}))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == f"{field} differs"


def test_answer_amount_in_another_spelling_of_the_same_value_is_accepted(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, trans_amount="1.5"))
    assert client.pay(order()).outcome is Outcome.SUCCESS


# -- transport faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 302])
def test_http_status_other_than_200_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, status: int
) -> None:
    gateway.responder = lambda got: Reply(status=status, headers={"Location": "http://x/"})
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == f"HTTP {status}"


def test_read_timeout_is_unknown(gateway: CraftedGateway, pair: KeyPair) -> None:
    gateway.responder = lambda got: Reply(hold=True)
    with make_client(gateway.url, pair, pay_timeout_s=0.3) as client:
        result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "read timeout"


def test_connection_dropped_after_the_request_is_unknown(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(drop=True)
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "connection closed without an answer"


def test_connection_reset_after_the_request_is_unknown(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(reset=True)
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "connection reset"


def test_refused_primary_sends_the_identical_request_to_the_backup(
    gateway: CraftedGateway, refusing: RefusingPort, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got))
    with make_client(refusing.url, pair, backup_gateway=gateway.url) as client:
        result = client.pay(order())
        expected = client.pay_params(order())
    assert result.outcome is Outcome.SUCCESS
    got = gateway.last()
    assert got.params == expected
    assert got.body == urlencode(expected).encode("ascii")
    assert gateway.received.empty()  # sent once


def test_both_gateways_refused_raises_unreachable(refusing: RefusingPort, pair: KeyPair) -> None:
    backup = RefusingPort()
    try:
        client = make_client(refusing.url, pair, backup_gateway=backup.url)
        with client, pytest.raises(GatewayUnreachable) as raised:
            client.pay(order())
    finally:
        backup.close()
    assert "connection refused" in str(raised.value)
    assert BUYER_CODE not in str(raised.value)


def test_refused_gateway_without_backup_raises_unreachable(
    refusing: RefusingPort, pair: KeyPair
) -> None:
    with make_client(refusing.url, pair) as client, pytest.raises(GatewayUnreachable):
        client.query(TRANS_ID)


def test_unresolvable_gateway_raises_unreachable(pair: KeyPair) -> None:
    client = make_client("http://gateway.invalid/gateway.do", pair)
    with client, pytest.raises(GatewayUnreachable) as raised:
        client.query(TRANS_ID)
    assert "DNS" in str(raised.value) or "cannot connect" in str(raised.value)


def test_untrusted_tls_certificate_is_not_sent_and_backup_is_used(
    tmp_path: Path, pair: KeyPair
) -> None:
    _, leaf, key = make_tls_files(tmp_path)
    # The primary's certificate is from a CA outside the system trust store.
    primary = CraftedGateway(lambda got: Reply(status=500), tls=server_tls(leaf, key)).start()
    backup = CraftedGateway(lambda got: signed(pair, pay_fields(got))).start()
    try:
        with make_client(primary.url, pair, backup_gateway=backup.url) as client:
            result = client.pay(order())
    finally:
        primary.stop()
        backup.stop()
    assert result.outcome is Outcome.SUCCESS
    assert primary.received.empty()


def test_tls_gateway_with_the_ca_bundle_is_used(tmp_path: Path, pair: KeyPair) -> None:
    ca, leaf, key = make_tls_files(tmp_path)
    tls = CraftedGateway(lambda got: signed(pair, pay_fields(got)), tls=server_tls(leaf, key))
    tls.start()
    try:
        with make_client(tls.url, pair, verify_tls=str(ca)) as client:
            result = client.pay(order())
    finally:
        tls.stop()
    assert result.outcome is Outcome.SUCCESS


# -- query, cancel, refund ----------------------------------------------------------------------


def query_fields(got: Received, **changes: str | None) -> dict[str, str]:
    fields = {
        "result_code": "SUCCESS",
        "partner_trans_id": got.params["partner_trans_id"],
        "alipay_trans_id": "2024010121001004440000000001",
        "alipay_trans_status": "TRADE_SUCCESS",
        "currency": "USD",
        "trans_amount": "1.50",
    }
    fields.update(changes)  # type: ignore[arg-type]
    return {key: value for key, value in fields.items() if value is not None}


@pytest.mark.parametrize("status", list(TradeStatus))
def test_query_reports_the_trade_status(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, status: TradeStatus
) -> None:
    gateway.responder = lambda got: signed(pair, query_fields(got, alipay_trans_status=status))
    result = client.query(TRANS_ID)
    assert result.outcome is Outcome.SUCCESS
    assert result.trade_status is status
    got = gateway.last()
    assert got.params["service"] == "alipay.acquire.overseas.query"
    assert got.params["partner_trans_id"] == TRANS_ID


def test_query_of_a_trade_that_does_not_exist_is_failed(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair,
        query_fields(
            got,
            result_code="FAIL",
            error="TRADE_NOT_EXIST",
            alipay_trans_id=None,
            alipay_trans_status=None,
        ),
    )
    result = client.query(TRANS_ID)
    assert result.outcome is Outcome.FAILED
    assert result.error == "TRADE_NOT_EXIST"
    assert result.trade_status is None


def test_query_with_an_unknown_trade_status_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, query_fields(got, alipay_trans_status="ODD"))
    assert client.query(TRANS_ID).outcome is Outcome.UNKNOWN


def test_query_sends_the_alipay_trans_id_when_known(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, query_fields(got))
    client.query(TRANS_ID, "2024010121001004440000000001")
    assert gateway.last().params["alipay_trans_id"] == "2024010121001004440000000001"


def test_query_with_expected_amount_rejects_an_answer_for_another_amount(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, query_fields(got, trans_amount="9.99"))
    result = client.query(TRANS_ID, amount=Decimal("1.50"), currency="USD")
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == "trans_amount differs"


def test_cancel_sends_timestamp_and_out_trade_no(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair, {"result_code": "SUCCESS", "retry_flag": "N", "out_trade_no": TRANS_ID}
    )
    result = client.cancel(TRANS_ID, 1704110400123, "2024010121001004440000000001")
    assert result.outcome is Outcome.SUCCESS
    got = gateway.last()
    assert got.params["service"] == "alipay.acquire.cancel"
    assert got.params["out_trade_no"] == TRANS_ID
    assert got.params["timestamp"] == "1704110400123"
    assert got.params["trade_no"] == "2024010121001004440000000001"


def test_cancel_fail_reports_retry_flag_and_detail_code(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair,
        {
            "result_code": "FAIL",
            "retry_flag": "Y",
            "detail_error_code": "TRADE_STATUS_ERROR",
            "out_trade_no": TRANS_ID,
        },
    )
    result = client.cancel(TRANS_ID, 1704110400123)
    assert result.outcome is Outcome.FAILED
    assert result.retry_flag is True
    assert result.error == "TRADE_STATUS_ERROR"


def test_cancel_unknown_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair, {"result_code": "UNKNOWN", "retry_flag": "Y", "out_trade_no": TRANS_ID}
    )
    result = client.cancel(TRANS_ID, 1704110400123)
    assert result.outcome is Outcome.UNKNOWN
    assert result.retry_flag is True


def test_refund_sends_is_sync_amount_and_currency(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair,
        {
            "result_code": "SUCCESS",
            "partner_trans_id": TRANS_ID,
            "partner_refund_id": "R-1",
            "refund_amount": "1.50",
            "currency": "USD",
        },
    )
    result = client.refund(TRANS_ID, "R-1", Decimal("1.5"), "USD", reason="vend failed")
    assert result.outcome is Outcome.SUCCESS
    got = gateway.last()
    assert got.params["service"] == "alipay.acquire.overseas.spot.refund"
    assert got.params["is_sync"] == "Y"
    assert got.params["refund_amount"] == "1.50"
    assert got.params["partner_refund_id"] == "R-1"
    assert got.params["refund_reason"] == "vend failed"


def test_refund_unknow_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, {"result_code": "UNKNOW"})
    assert client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD").outcome is Outcome.UNKNOWN


def test_refund_answer_for_another_refund_amount_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair, {"result_code": "SUCCESS", "refund_amount": "0.50"}
    )
    result = client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD")
    assert result.outcome is Outcome.UNKNOWN


# -- answers that prove themselves: verified, and naming this very request ---------------------

ALIPAY_TRANS_ID = "2024010121001004440000000001"
STAMP = 1704110400123
SERVICES = ["pay", "query", "cancel", "refund"]
Result = PayResult | QueryResult | CancelResult | RefundResult


def send(client: AlipayClient, service: str) -> Result:
    """One call of `service` about TRANS_ID, 1.50 USD (the query gives amount and currency)."""
    if service == "pay":
        return client.pay(order())
    if service == "query":
        return client.query(TRANS_ID, amount=Decimal("1.50"), currency="USD")
    if service == "cancel":
        return client.cancel(TRANS_ID, STAMP)
    return client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD")


def proven(service: str, refused: bool = False, **changes: str | None) -> dict[str, str]:
    """A signed answer's fields echoing everything `send` asked; a change of None drops one."""
    trade = {"partner_trans_id": TRANS_ID, "trans_amount": "1.50", "currency": "USD"}
    fields: dict[str, str | None] = {
        "pay": {"result_code": "SUCCESS", "alipay_trans_id": ALIPAY_TRANS_ID, **trade},
        "query": {
            "result_code": "SUCCESS",
            "alipay_trans_status": "TRADE_SUCCESS",
            "alipay_trans_id": ALIPAY_TRANS_ID,
            **trade,
        },
        "cancel": {"result_code": "SUCCESS", "retry_flag": "N", "out_trade_no": TRANS_ID},
        "refund": {
            "result_code": "SUCCESS",
            "partner_trans_id": TRANS_ID,
            "partner_refund_id": "R-1",
            "refund_amount": "1.50",
            "currency": "USD",
        },
    }[service]
    if refused:
        fields = {**fields, "alipay_trans_status": None}
        if service == "cancel":
            fields.update(result_code="FAIL", detail_error_code="TRADE_STATUS_ERROR")
        else:
            fields.update(
                result_code="FAIL" if service == "query" else "FAILED",
                error="TRADE_NOT_EXIST" if service == "query" else "TRADE_HAS_CLOSE",
            )
    fields.update(changes)
    return {key: value for key, value in fields.items() if value is not None}


# The fields each service's answer must echo to decide; for a query's FAIL only the trade's id.
REQUIRED = {
    "pay": ["partner_trans_id", "trans_amount", "currency"],
    "query": ["partner_trans_id", "trans_amount", "currency"],
    "cancel": ["out_trade_no"],
    "refund": ["partner_trans_id", "partner_refund_id", "refund_amount"],
}
REQUIRED_OF_A_REFUSAL = {**REQUIRED, "query": ["partner_trans_id"]}


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("refused", [False, True], ids=["success", "refusal"])
def test_a_verified_answer_naming_the_request_decides(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, service: str, refused: bool
) -> None:
    gateway.responder = lambda got: signed(pair, proven(service, refused))
    result = send(client, service)
    assert result.outcome is (Outcome.FAILED if refused else Outcome.SUCCESS)
    assert result.verified is True


@pytest.mark.parametrize("service", SERVICES)
def test_gateway_rejection_of_any_call_is_rejected_and_unverified(
    gateway: CraftedGateway, client: AlipayClient, service: str
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="ILLEGAL_PARTNER"))
    result = send(client, service)
    assert result.outcome is Outcome.REJECTED
    assert (result.error, result.verified) == ("ILLEGAL_PARTNER", False)


def test_unsigned_no_such_trade_is_rejected_not_failed(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="TRADE_NOT_EXIST"))
    result = client.query(TRANS_ID)
    assert result.outcome is Outcome.REJECTED
    assert (result.error, result.verified) == ("TRADE_NOT_EXIST", False)


def test_unsigned_refund_refusal_is_rejected_not_failed(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="TRADE_HAS_CLOSE"))
    result = client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD")
    assert result.outcome is Outcome.REJECTED
    assert result.error == "TRADE_HAS_CLOSE"


def test_gateway_rejection_without_a_code_is_rejected(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(
        body=b"<?xml version='1.0'?><alipay><is_success>F</is_success></alipay>"
    )
    result = client.pay(order())
    assert result.outcome is Outcome.REJECTED
    assert result.error is None


@pytest.mark.parametrize(
    ("service", "field"),
    [(service, field) for service, fields in REQUIRED.items() for field in fields],
)
def test_signed_success_without_a_required_echo_is_unknown(
    gateway: CraftedGateway,
    client: AlipayClient,
    pair: KeyPair,
    service: str,
    field: str,
) -> None:
    gateway.responder = lambda got: signed(pair, proven(service, **{field: None}))
    result = send(client, service)
    assert result.outcome is Outcome.UNKNOWN
    assert result.verified is True
    assert result.detail.endswith(f"without {field}")


def test_signed_success_without_partner_trans_id_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, partner_trans_id=None))
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.alipay_trans_id is None  # an answer that names no trade gives no trade id


@pytest.mark.parametrize(
    ("service", "field"),
    [(service, field) for service, fields in REQUIRED_OF_A_REFUSAL.items() for field in fields],
)
def test_signed_refusal_without_a_required_echo_is_rejected(
    gateway: CraftedGateway,
    client: AlipayClient,
    pair: KeyPair,
    service: str,
    field: str,
) -> None:
    gateway.responder = lambda got: signed(pair, proven(service, refused=True, **{field: None}))
    result = send(client, service)
    assert result.outcome is Outcome.REJECTED
    assert result.verified is True
    assert result.error in ("TRADE_NOT_EXIST", "TRADE_HAS_CLOSE", "TRADE_STATUS_ERROR")


def test_query_saying_no_such_trade_needs_only_the_trade_id(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    fields = proven("query", refused=True, trans_amount=None, currency=None, alipay_trans_id=None)
    assert set(fields) == {"result_code", "error", "partner_trans_id"}
    gateway.responder = lambda got: signed(pair, fields)
    result = client.query(TRANS_ID, amount=Decimal("1.50"), currency="USD")
    assert (result.outcome, result.error) == (Outcome.FAILED, "TRADE_NOT_EXIST")


def test_query_without_amount_needs_no_amount_echo(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("query", trans_amount=None, currency=None))
    assert client.query(TRANS_ID).outcome is Outcome.SUCCESS


def test_replayed_cancel_answer_is_not_a_payment(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("cancel"))
    assert client.pay(order()).outcome is Outcome.UNKNOWN


def test_replayed_pay_answer_is_not_a_cancel(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    # It names the same trade (partner_trans_id), but not as a cancel's answer would.
    gateway.responder = lambda got: signed(pair, proven("pay"))
    result = client.cancel(TRANS_ID, STAMP)
    assert result.outcome is Outcome.UNKNOWN
    assert result.retry_flag is None


def test_replayed_query_answer_of_a_waiting_trade_is_not_a_payment(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(
        pair, proven("query", alipay_trans_status="WAIT_BUYER_PAY")
    )
    assert client.pay(order()).outcome is Outcome.UNKNOWN


def test_replayed_pay_answer_is_not_a_refund(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("pay"))
    assert client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD").outcome is Outcome.UNKNOWN


def test_cancel_answer_naming_another_alipay_trade_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("cancel", alipay_trans_id="2024-other"))
    assert client.cancel(TRANS_ID, STAMP, ALIPAY_TRANS_ID).outcome is Outcome.UNKNOWN


@pytest.mark.parametrize(
    ("field", "value"),
    [("partner_refund_id", "R-2"), ("currency", "HKD"), ("partner_trans_id", "VM0042-other")],
)
def test_refund_answer_naming_another_refund_is_unknown(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, field: str, value: str
) -> None:
    gateway.responder = lambda got: signed(pair, proven("refund", **{field: value}))
    result = client.refund(TRANS_ID, "R-1", Decimal("1.50"), "USD")
    assert result.outcome is Outcome.UNKNOWN
    assert result.detail == f"{field} differs"


def test_rejected_cancel_carries_no_retry_flag(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("cancel", True, out_trade_no=None))
    result = client.cancel(TRANS_ID, STAMP)
    assert result.outcome is Outcome.REJECTED
    assert result.retry_flag is None


def test_unproven_pay_answer_gives_no_alipay_trans_id(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    # A query by this id would ask about whatever trade the answer named.
    gateway.responder = lambda got: signed(
        pair, pay_fields(got, result_code="UNKNOW", currency=None)
    )
    result = client.pay(order())
    assert result.outcome is Outcome.UNKNOWN
    assert result.alipay_trans_id is None


def test_failed_pay_keeps_its_alipay_trans_id(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    # The flow cancels a refused trade that Alipay named before the refusal is final.
    gateway.responder = lambda got: signed(
        pair, pay_fields(got, result_code="FAILED", error="PAYMENT_FAIL")
    )
    result = client.pay(order())
    assert (result.outcome, result.alipay_trans_id) == (Outcome.FAILED, ALIPAY_TRANS_ID)


def test_answers_that_do_not_verify_are_unverified(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    bodies = [
        render_answer(proven("query", refused=True), None),  # unsigned
        render_answer(proven("query", refused=True), key_pair(SignType.MD5).alipay).replace(
            b">MD5<", b">RSA2<"
        ),  # another key
        b"<alipay><is_success>T</is_success>",  # unreadable
    ]
    for body in bodies:
        gateway.responder = lambda got, body=body: Reply(body=body)  # type: ignore[misc]
        result = client.query(TRANS_ID)
        assert (result.outcome, result.verified) == (Outcome.UNKNOWN, False)


def test_signed_answer_naming_other_details_is_still_verified(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    # The key and partner work (what the gateway probe wants to know); the answer decides nothing.
    gateway.responder = lambda got: signed(pair, proven("query", partner_trans_id="other"))
    result = client.query(TRANS_ID)
    assert (result.outcome, result.verified) == (Outcome.UNKNOWN, True)


def test_cancel_sends_the_timestamp_given_on_each_call(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair
) -> None:
    gateway.responder = lambda got: signed(pair, proven("cancel"))
    client.cancel(TRANS_ID, STAMP)
    client.cancel(TRANS_ID, STAMP + 3000)
    assert [gateway.last().params["timestamp"] for _ in range(2)] == [
        str(STAMP),
        str(STAMP + 3000),
    ]


# -- error codes are normalised where they enter ------------------------------------------------


def test_odd_error_in_a_gateway_rejection_becomes_unrecognised_error(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="SOMETHING ODD"))
    result = client.pay(order())
    assert result.outcome is Outcome.REJECTED
    assert result.error == "UNRECOGNISED_ERROR"
    assert "SOMETHING ODD" in result.detail


@pytest.mark.parametrize("service", SERVICES)
def test_odd_error_in_a_signed_refusal_becomes_unrecognised_error(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, service: str
) -> None:
    odd = "not a code: 失败\t" + "x" * 60
    key = "detail_error_code" if service == "cancel" else "error"
    gateway.responder = lambda got: signed(pair, proven(service, refused=True, **{key: odd}))
    result = send(client, service)
    assert result.outcome is Outcome.FAILED
    assert result.error == "UNRECOGNISED_ERROR"
    assert "not a code: " in result.detail
    assert "失败" not in result.detail and "\t" not in result.detail
    assert all(" " <= char <= "~" for char in result.detail)


def test_raw_error_text_is_cut_to_40_characters(
    gateway: CraftedGateway, client: AlipayClient
) -> None:
    gateway.responder = lambda got: Reply(body=render_answer(None, None, error="odd" + "y" * 80))
    result = client.query(TRANS_ID)
    assert result.error == "UNRECOGNISED_ERROR"
    assert "odd" + "y" * 37 in result.detail
    assert "y" * 38 not in result.detail


@pytest.mark.parametrize(
    "odd", ["lower_case", "SYSTEM_ERROR ", "1START", "A" * 65, "TRADE-NOT-EXIST", "SYSTEM_ERROR\n"]
)
def test_only_a_well_formed_code_is_kept(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, odd: str
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, result_code="FAILED", error=odd))
    result = client.pay(order())
    assert result.error == "UNRECOGNISED_ERROR"


def test_unrecognised_error_is_exported_as_the_fixed_code() -> None:
    from kiosk.alipay.client import UNRECOGNISED_ERROR

    assert UNRECOGNISED_ERROR == "UNRECOGNISED_ERROR"


# -- secrets ------------------------------------------------------------------------------------


def test_buyer_code_and_sign_never_appear_in_logs(
    gateway: CraftedGateway, refusing: RefusingPort, pair: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    answers = iter(
        [
            lambda got: signed(pair, pay_fields(got)),
            lambda got: signed(pair, pay_fields(got, result_code="UNKNOW")),
            lambda got: Reply(body=b"<alipay>"),
            lambda got: Reply(reset=True),
        ]
    )
    caplog.set_level(logging.DEBUG)
    with make_client(gateway.url, pair) as client:
        for answer in answers:
            gateway.responder = answer
            client.pay(order())
        sign = client.pay_params(order())["sign"]
    with make_client(refusing.url, pair) as client, pytest.raises(GatewayUnreachable):
        client.pay(order())
    assert caplog.records, "the client logs each call"
    for formatter in (TextFormatter(), JsonFormatter()):
        for record in caplog.records:
            line = formatter.format(record)
            assert BUYER_CODE not in line
            assert sign not in line


def test_each_call_logs_one_event_with_its_outcome(
    gateway: CraftedGateway, client: AlipayClient, pair: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.responder = lambda got: signed(pair, pay_fields(got, result_code="UNKNOW"))
    caplog.set_level(logging.INFO, logger="kiosk.alipay")
    client.pay(order())
    calls = [r for r in caplog.records if r.getMessage() == "alipay.call"]
    assert len(calls) == 1
    fields = calls[0].kiosk_fields  # type: ignore[attr-defined]
    assert fields["service"] == "alipay.acquire.overseas.spot.pay"
    assert fields["partner_trans_id"] == TRANS_ID
    assert fields["outcome"] == "unknown"
    assert fields["verified"] is True
    assert fields["detail"] == "UNKNOW"
    assert isinstance(fields["elapsed_ms"], int)


def test_tls_handshake_failure_is_not_sent_and_backup_is_used(pair: KeyPair) -> None:
    plain = CraftedGateway(lambda got: Reply(status=500)).start()  # speaks no TLS
    backup = CraftedGateway(lambda got: signed(pair, pay_fields(got))).start()
    primary_url = plain.url.replace("http://", "https://")
    try:
        with make_client(primary_url, pair, backup_gateway=backup.url) as client:
            result = client.pay(order())
    finally:
        plain.stop()
        backup.stop()
    assert result.outcome is Outcome.SUCCESS
    assert plain.received.empty()
