"""The Alipay MAPI gateway simulator, driven over loopback with `requests` and the signing code."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from xml.etree.ElementTree import ParseError

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from defusedxml import ElementTree as SafeET

from kiosk.alipay.client import (
    AlipayClient,
    CancelResult,
    GatewaySettings,
    Outcome,
    PayOrder,
    PayResult,
    QueryResult,
    RefundResult,
)
from kiosk.alipay.signing import Md5Signature, RsaSignature, Signature, SignType, presign_string
from kiosk.log import mask_code
from kiosk.simulator import (
    SEED_ERROR_CODES,
    Fault,
    FaultPlan,
    GatewaySimulator,
    MerchantAccount,
    TradeStatus,
)
from tests.conftest import payment_code

PARTNER = "2088101122334455"
MD5_KEY = b"0123456789abcdef0123456789abcdef"
VECTOR_PARTNER = "1000000000000000"  # ALIPAY.md's MD5 test vectors
VECTOR_KEY = b"10000000000000000000000000000000"
SERVICE = {
    "pay": "alipay.acquire.overseas.spot.pay",
    "query": "alipay.acquire.overseas.query",
    "cancel": "alipay.acquire.cancel",
    "refund": "alipay.acquire.overseas.spot.refund",
}
_codes = itertools.count(1)


@dataclass
class Keys:
    merchant: rsa.RSAPrivateKey
    alipay: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        merchant=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        alipay=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def _accounts(keys: Keys) -> list[MerchantAccount]:
    return [
        MerchantAccount(PARTNER, md5_key=MD5_KEY, merchant_public_key=keys.merchant.public_key()),
        MerchantAccount(VECTOR_PARTNER, md5_key=VECTOR_KEY),
    ]


@pytest.fixture
def sim(keys: Keys) -> Iterator[GatewaySimulator]:
    with GatewaySimulator(_accounts(keys), keys.alipay) as simulator:
        yield simulator


@dataclass
class Answer:
    status: int
    raw: bytes
    is_success: str
    error: str | None
    fields: dict[str, str]
    request: dict[str, str]
    sign: str | None
    sign_type: str | None


def decode_answer(raw: bytes) -> str:
    """Decode by the XML declaration: expat refuses multi-byte encodings such as GBK itself."""
    declared = re.match(rb'<\?xml[^>]*encoding="([^"]+)"[^>]*\?>', raw)
    text = raw.decode(declared.group(1).decode("ascii") if declared else "utf-8")
    return text[declared.end() :] if declared else text


def parse(response: requests.Response) -> Answer:
    root = SafeET.fromstring(decode_answer(response.content))
    inner = root.find("response/alipay")
    return Answer(
        status=response.status_code,
        raw=response.content,
        is_success=root.findtext("is_success", ""),
        error=root.findtext("error"),
        fields={child.tag: child.text or "" for child in inner} if inner is not None else {},
        request={p.get("name", ""): p.text or "" for p in root.iterfind("request/param")},
        sign=root.findtext("sign"),
        sign_type=root.findtext("sign_type"),
    )


def request_signer(keys: Keys, sign_type: str, md5_key: bytes = MD5_KEY) -> Signature:
    if sign_type == "MD5":
        return Md5Signature(md5_key)
    return RsaSignature(SignType(sign_type), private_key=keys.merchant)


def answer_signer(sim: GatewaySimulator, sign_type: str, md5_key: bytes = MD5_KEY) -> Signature:
    if sign_type == "MD5":
        return Md5Signature(md5_key)
    return RsaSignature(SignType(sign_type), public_key=sim.alipay_public_key)


def signed(
    keys: Keys, service: str, params: dict[str, str], sign_type: str = "RSA2"
) -> dict[str, str]:
    full = {"service": SERVICE.get(service, service), "partner": PARTNER, **params}
    full["_input_charset"] = "UTF-8"
    full["sign"] = request_signer(keys, sign_type).sign(presign_string(full))
    full["sign_type"] = sign_type
    return full


def post(url: str, params: dict[str, str], timeout: float = 5.0) -> requests.Response:
    """As ALIPAY.md says: `_input_charset` in the URL query, the rest as a form body."""
    body = {k: v for k, v in params.items() if k != "_input_charset"}
    query = {"_input_charset": params["_input_charset"]}
    return requests.post(url, params=query, data=body, timeout=timeout)


def call(
    sim: GatewaySimulator,
    keys: Keys,
    service: str,
    params: dict[str, str],
    sign_type: str = "RSA2",
    timeout: float = 5.0,
) -> Answer:
    return parse(post(sim.url, signed(keys, service, params, sign_type), timeout))


def verifies(sim: GatewaySimulator, answer: Answer, md5_key: bytes = MD5_KEY) -> bool:
    assert answer.sign is not None and answer.sign_type is not None
    signer = answer_signer(sim, answer.sign_type, md5_key)
    return signer.verify(presign_string(answer.fields), answer.sign)


def new_code(tail: str = "0001") -> str:
    return f"28{next(_codes):012d}{tail}"


def pay_params(
    trans_id: str, code: str | None = None, amount: str = "1.50", currency: str = "USD"
) -> dict[str, str]:
    return {
        "alipay_seller_id": PARTNER,
        "trans_name": "Vending purchase",
        "partner_trans_id": trans_id,
        "currency": currency,
        "trans_amount": amount,
        "buyer_identity_code": code or new_code(),
        "identity_code_type": "barcode",
        "trans_create_time": "20240601120000",
        "biz_product": "OVERSEAS_MBARCODE_PAY",
        "extend_info": json.dumps(
            {"secondary_merchant_id": "M-001", "store_id": "S-042", "terminal_id": "VM-0042"}
        ),
    }


def query_params(trans_id: str) -> dict[str, str]:
    return {"partner_trans_id": trans_id}


def cancel_params(trans_id: str) -> dict[str, str]:
    return {"out_trade_no": trans_id, "timestamp": str(int(time.time() * 1000))}


def refund_params(trans_id: str, refund_id: str, amount: str) -> dict[str, str]:
    return {
        "partner_trans_id": trans_id,
        "partner_refund_id": refund_id,
        "refund_amount": amount,
        "currency": "USD",
        "is_sync": "Y",
    }


def held(sim: GatewaySimulator, trans_id: str) -> bool:
    trade = sim.ledger.trade(PARTNER, trans_id)
    return trade is not None and trade.holds_money


# Signatures and the gateway's own checks ----------------------------------------------------


@pytest.mark.parametrize("sign_type", ["RSA2", "RSA", "MD5"])
def test_each_sign_type_is_verified_and_answered_with_the_same(
    sim: GatewaySimulator, keys: Keys, sign_type: str
) -> None:
    answer = call(sim, keys, "pay", pay_params(f"T-{sign_type}"), sign_type=sign_type)
    assert answer.is_success == "T"
    assert answer.fields["result_code"] == "SUCCESS"
    assert answer.sign_type == sign_type
    assert verifies(sim, answer)
    assert sim.requests_seen[-1].verified


def test_rsa2_answer_does_not_verify_as_sha1(sim: GatewaySimulator, keys: Keys) -> None:
    answer = call(sim, keys, "pay", pay_params("T-HASH"), sign_type="RSA2")
    sha1 = RsaSignature(SignType.RSA, public_key=sim.alipay_public_key)
    assert answer.sign is not None
    assert not sha1.verify(presign_string(answer.fields), answer.sign)


def test_md5_request_of_published_test_vector_is_accepted(sim: GatewaySimulator) -> None:
    params = {
        "_input_charset": "utf-8",
        "partner": VECTOR_PARTNER,
        "partner_trans_id": "2010121000000002",
        "service": "alipay.acquire.overseas.query",
        "sign": "2a7f598bbb13d02f7de819ae689f80ba",
        "sign_type": "MD5",
    }
    answer = parse(post(sim.url, params))
    assert answer.is_success == "T"
    assert answer.fields == {
        "result_code": "FAIL",
        "error": "TRADE_NOT_EXIST",
        "partner_trans_id": "2010121000000002",
    }
    assert verifies(sim, answer, md5_key=VECTOR_KEY)


def test_bad_signature_is_illegal_sign(sim: GatewaySimulator, keys: Keys) -> None:
    params = signed(keys, "pay", pay_params("T-BADSIG"))
    params["trans_amount"] = "0.01"  # changed after signing
    answer = parse(post(sim.url, params))
    assert (answer.is_success, answer.error) == ("F", "ILLEGAL_SIGN")
    assert answer.sign is None and not answer.fields
    assert sim.ledger.trades() == []


def test_unknown_partner_is_illegal_partner(sim: GatewaySimulator, keys: Keys) -> None:
    params = signed(keys, "query", {"partner": "2088999999999999", "partner_trans_id": "X"})
    answer = parse(post(sim.url, params))
    assert (answer.is_success, answer.error) == ("F", "ILLEGAL_PARTNER")


def test_unknown_service_is_illegal_exterface(sim: GatewaySimulator, keys: Keys) -> None:
    answer = call(sim, keys, "alipay.acquire.overseas.nothing", {"partner_trans_id": "X"})
    assert (answer.is_success, answer.error) == ("F", "ILLEGAL_EXTERFACE")


def test_sign_type_without_a_key_on_file_is_refused(sim: GatewaySimulator) -> None:
    params = {"service": SERVICE["query"], "partner": VECTOR_PARTNER, "partner_trans_id": "X"}
    params["_input_charset"] = "UTF-8"
    params["sign"] = "AAAA"
    params["sign_type"] = "RSA2"  # this partner has only an MD5 key
    answer = parse(post(sim.url, params))
    assert (answer.is_success, answer.error) == ("F", "ILLEGAL_SECURITY_PROFILE")


def test_input_charset_in_the_body_and_get_are_accepted(sim: GatewaySimulator, keys: Keys) -> None:
    params = signed(keys, "pay", pay_params("T-GET"))
    by_get = parse(requests.get(sim.url, params=params, timeout=5))
    by_body = parse(requests.post(sim.url, data=params, timeout=5))
    assert by_get.fields["result_code"] == "SUCCESS"
    assert by_body.fields["result_code"] == "SUCCESS"
    assert by_body.fields["alipay_trans_id"] == by_get.fields["alipay_trans_id"]


# spot.pay ------------------------------------------------------------------------------------


def test_pay_success_answers_the_documented_fields(sim: GatewaySimulator, keys: Keys) -> None:
    code = new_code()
    answer = call(sim, keys, "pay", pay_params("T-OK", code=code))
    fields = answer.fields
    assert fields["result_code"] == "SUCCESS"
    assert fields["partner_trans_id"] == "T-OK"
    assert len(fields["alipay_trans_id"]) == 28 and fields["alipay_trans_id"].isdigit()
    assert (fields["currency"], fields["trans_amount"]) == ("USD", "1.50")
    assert "*" in fields["alipay_buyer_login_id"]
    cny = (Decimal("1.50") * Decimal(fields["exchange_rate"])).quantize(Decimal("0.01"))
    assert Decimal(fields["trans_amount_cny"]) == cny
    assert len(fields["alipay_pay_time"]) == 14
    assert held(sim, "T-OK")
    assert sim.ledger.charged_total() == Decimal("1.50")


def test_buyer_code_is_masked_in_the_echo_and_the_records(
    sim: GatewaySimulator, keys: Keys
) -> None:
    code = new_code()
    answer = call(sim, keys, "pay", pay_params("T-MASK", code=code))
    assert answer.request["buyer_identity_code"] == mask_code(code)
    assert code.encode() not in answer.raw
    assert "sign" not in answer.request
    assert sim.requests_seen[-1].params["buyer_identity_code"] == mask_code(code)
    assert code not in json.dumps(sim.ledger.to_json())


def test_pay_retry_returns_the_same_trade_and_charges_once(
    sim: GatewaySimulator, keys: Keys
) -> None:
    params = pay_params("T-RETRY")
    first = call(sim, keys, "pay", params)
    second = call(sim, keys, "pay", params)
    assert second.fields["result_code"] == "SUCCESS"
    assert second.fields["alipay_trans_id"] == first.fields["alipay_trans_id"]
    assert len(sim.ledger.trades()) == 1
    assert sim.ledger.charged_total() == Decimal("1.50")


def test_pay_retry_with_another_amount_is_context_inconsistent(
    sim: GatewaySimulator, keys: Keys
) -> None:
    params = pay_params("T-CTX")
    call(sim, keys, "pay", params)
    answer = call(sim, keys, "pay", {**params, "trans_amount": "2.00"})
    assert (answer.fields["result_code"], answer.fields["error"]) == (
        "FAILED",
        "CONTEXT_INCONSISTENT",
    )
    assert sim.ledger.charged_total() == Decimal("1.50")


def test_pay_retry_with_another_buyer_code_is_trade_buyer_not_match(
    sim: GatewaySimulator, keys: Keys
) -> None:
    params = pay_params("T-BUYER")
    call(sim, keys, "pay", params)
    answer = call(sim, keys, "pay", {**params, "buyer_identity_code": new_code()})
    assert answer.fields["error"] == "TRADE_BUYER_NOT_MATCH"


def test_payment_code_used_on_another_trade_is_refused(sim: GatewaySimulator, keys: Keys) -> None:
    code = new_code()
    call(sim, keys, "pay", pay_params("T-CODE-1", code=code))
    answer = call(sim, keys, "pay", pay_params("T-CODE-2", code=code))
    assert (answer.fields["result_code"], answer.fields["error"]) == (
        "FAILED",
        "SOUNDWAVE_PARSER_FAIL",
    )
    assert sim.ledger.trade(PARTNER, "T-CODE-2") is None


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"trans_amount": "1.5"}, "INVALID_PARAMETER"),
        ({"trans_amount": "abc"}, "INVALID_PARAMETER"),
        ({"trans_create_time": ""}, "INVALID_PARAMETER"),
        ({"identity_code_type": "qrcode"}, "INVALID_PARAMETER"),
        ({"extend_info": "{}"}, "SECONDARY_MERCHANT_ID_BLANK"),
    ],
)
def test_bad_pay_parameters_are_failed_not_gateway_errors(
    sim: GatewaySimulator, keys: Keys, change: dict[str, str], error: str
) -> None:
    answer = call(sim, keys, "pay", {**pay_params("T-PARAM"), **change})
    assert answer.is_success == "T"
    assert (answer.fields["result_code"], answer.fields["error"]) == ("FAILED", error)
    assert verifies(sim, answer)
    assert sim.ledger.trades() == []


def test_jpy_amounts_are_whole_numbers(sim: GatewaySimulator, keys: Keys) -> None:
    answer = call(sim, keys, "pay", pay_params("T-JPY", amount="150", currency="JPY"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert answer.fields["trans_amount"] == "150"


# Buyer confirming on the phone, and unpaid trades closing ------------------------------------


def test_buyer_confirming_on_the_phone_makes_the_trade_paid(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=0.2), partner_trans_id="T-WAIT")
    answer = call(sim, keys, "pay", pay_params("T-WAIT"))
    assert answer.fields["result_code"] == "UNKNOW"
    assert not held(sim, "T-WAIT")
    assert sim.ledger.wait_for_status(PARTNER, "T-WAIT", TradeStatus.TRADE_SUCCESS, timeout=5)
    queried = call(sim, keys, "query", query_params("T-WAIT"))
    assert queried.fields["alipay_trans_status"] == "TRADE_SUCCESS"
    assert held(sim, "T-WAIT")


def test_unpaid_trade_closes_after_close_unpaid_after_s(keys: Keys) -> None:
    with GatewaySimulator(_accounts(keys), keys.alipay, close_unpaid_after_s=0.2) as sim:
        sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
        assert call(sim, keys, "pay", pay_params("T-NEVER")).fields["result_code"] == "UNKNOW"
        assert call(sim, keys, "query", query_params("T-NEVER")).fields["alipay_trans_status"] == (
            "WAIT_BUYER_PAY"
        )
        assert sim.ledger.wait_for_status(PARTNER, "T-NEVER", TradeStatus.TRADE_CLOSED, 5)
        queried = call(sim, keys, "query", query_params("T-NEVER"))
        assert queried.fields["alipay_trans_status"] == "TRADE_CLOSED"
        assert sim.ledger.charged_total() == 0


def test_magic_code_1001_buyer_confirms_after_two_seconds(
    sim: GatewaySimulator, keys: Keys
) -> None:
    answer = call(sim, keys, "pay", pay_params("T-1001", code=new_code("1001")))
    assert answer.fields["result_code"] == "UNKNOW"
    assert sim.ledger.wait_for_status(PARTNER, "T-1001", TradeStatus.TRADE_SUCCESS, timeout=5)


# overseas.query -----------------------------------------------------------------------------


def test_query_of_unknown_trade_is_trade_not_exist(sim: GatewaySimulator, keys: Keys) -> None:
    answer = call(sim, keys, "query", query_params("T-NOWHERE"))
    assert answer.fields == {
        "result_code": "FAIL",
        "error": "TRADE_NOT_EXIST",
        "partner_trans_id": "T-NOWHERE",
    }


def test_query_by_alipay_trans_id_wins(sim: GatewaySimulator, keys: Keys) -> None:
    paid = call(sim, keys, "pay", pay_params("T-AID"))
    params = {"partner_trans_id": "T-OTHER", "alipay_trans_id": paid.fields["alipay_trans_id"]}
    answer = call(sim, keys, "query", params)
    assert answer.fields["partner_trans_id"] == "T-AID"
    assert answer.fields["alipay_trans_status"] == "TRADE_SUCCESS"


# acquire.cancel -----------------------------------------------------------------------------


def test_cancel_of_unpaid_trade_closes_it(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
    call(sim, keys, "pay", pay_params("T-CUNPAID"))
    answer = call(sim, keys, "cancel", cancel_params("T-CUNPAID"))
    assert (answer.fields["result_code"], answer.fields["retry_flag"]) == ("SUCCESS", "N")
    assert answer.fields["out_trade_no"] == "T-CUNPAID"
    trade = sim.ledger.trade(PARTNER, "T-CUNPAID")
    assert trade is not None and trade.status == "TRADE_CLOSED" and not trade.charged


def test_cancel_of_paid_trade_reverses_it(sim: GatewaySimulator, keys: Keys) -> None:
    paid = call(sim, keys, "pay", pay_params("T-CPAID"))
    answer = call(sim, keys, "cancel", cancel_params("T-CPAID"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert answer.fields["trade_no"] == paid.fields["alipay_trans_id"]
    assert verifies(sim, answer)
    trade = sim.ledger.trade(PARTNER, "T-CPAID")
    assert trade is not None and trade.charged and trade.reversed
    assert trade.status == "TRADE_CLOSED"
    assert sim.ledger.charged_total() == 0
    assert any("cancel#" in line for line in trade.events)


def test_cancel_of_never_created_trade_succeeds_and_burns_the_id(
    sim: GatewaySimulator, keys: Keys
) -> None:
    answer = call(sim, keys, "cancel", cancel_params("T-GHOST"))
    assert answer.fields["result_code"] == "SUCCESS"
    later = call(sim, keys, "pay", pay_params("T-GHOST"))
    assert (later.fields["result_code"], later.fields["error"]) == ("FAILED", "TRADE_HAS_CLOSE")
    assert sim.ledger.charged_total() == 0


def test_cancel_after_the_window_fails_for_good_and_refund_works(
    sim: GatewaySimulator, keys: Keys
) -> None:
    call(sim, keys, "pay", pay_params("T-WINDOW"))
    sim.inject(FaultPlan(Fault.CANCEL_WINDOW_CLOSED), partner_trans_id="T-WINDOW")
    answer = call(sim, keys, "cancel", cancel_params("T-WINDOW"))
    assert (answer.fields["result_code"], answer.fields["retry_flag"]) == ("FAIL", "N")
    assert answer.fields["detail_error_code"]
    assert held(sim, "T-WINDOW")
    refunded = call(sim, keys, "refund", refund_params("T-WINDOW", "R-WINDOW", "1.50"))
    assert refunded.fields["result_code"] == "SUCCESS"
    assert sim.ledger.charged_total() == 0


def test_magic_code_4001_pays_but_every_cancel_fails(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-4001", code=new_code("4001")))
    for _ in range(2):
        answer = call(sim, keys, "cancel", cancel_params("T-4001"))
        assert (answer.fields["result_code"], answer.fields["retry_flag"]) == ("FAIL", "N")
    assert held(sim, "T-4001")


# spot.refund --------------------------------------------------------------------------------


def test_refund_is_idempotent_per_refund_id(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-REF", amount="3.00"))
    first = call(sim, keys, "refund", refund_params("T-REF", "R-1", "1.00"))
    again = call(sim, keys, "refund", refund_params("T-REF", "R-1", "1.00"))
    assert first.fields["result_code"] == again.fields["result_code"] == "SUCCESS"
    assert verifies(sim, again)
    assert sim.ledger.charged_total() == Decimal("2.00")


def test_refund_cannot_exceed_what_is_left(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-BOUND", amount="2.00"))
    assert call(sim, keys, "refund", refund_params("T-BOUND", "R-A", "1.50")).fields[
        "result_code"
    ] == ("SUCCESS")
    too_much = call(sim, keys, "refund", refund_params("T-BOUND", "R-B", "1.00"))
    assert too_much.fields["result_code"] == "FAILED"
    assert sim.ledger.charged_total() == Decimal("0.50")


def test_full_refund_closes_the_trade(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-FULL"))
    call(sim, keys, "refund", refund_params("T-FULL", "R-FULL", "1.50"))
    queried = call(sim, keys, "query", query_params("T-FULL"))
    assert queried.fields["alipay_trans_status"] == "TRADE_CLOSED"
    trade = sim.ledger.trade(PARTNER, "T-FULL")
    assert trade is not None and trade.reversed and trade.refunds == {"R-FULL": Decimal("1.50")}


def test_refund_of_unpaid_trade_fails(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
    call(sim, keys, "pay", pay_params("T-RUNPAID"))
    answer = call(sim, keys, "refund", refund_params("T-RUNPAID", "R-X", "1.50"))
    assert (answer.fields["result_code"], answer.fields["error"]) == (
        "FAILED",
        "TRADE_STATUS_ERROR",
    )


# Faults -------------------------------------------------------------------------------------


def test_slow_after_charge_times_the_client_out_but_charges(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=10))
    with pytest.raises(requests.Timeout):
        call(sim, keys, "pay", pay_params("T-SLOW"), timeout=0.3)
    assert held(sim, "T-SLOW")


def test_slow_answer_arrives_after_its_delay(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=0.2))
    started = time.monotonic()
    answer = call(sim, keys, "pay", pay_params("T-SLOWOK"))
    assert time.monotonic() - started >= 0.2
    assert answer.fields["result_code"] == "SUCCESS"


def test_slow_answer_does_not_block_other_requests(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=30), partner_trans_id="T-HELD")
    outcome: list[BaseException] = []

    def pay_slowly() -> None:
        try:
            call(sim, keys, "pay", pay_params("T-HELD"), timeout=30)
        except requests.RequestException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=pay_slowly)
    worker.start()
    assert sim.ledger.wait_for_status(PARTNER, "T-HELD", TradeStatus.TRADE_SUCCESS, timeout=5)
    answer = call(sim, keys, "pay", pay_params("T-QUICK"), timeout=2)
    assert answer.fields["result_code"] == "SUCCESS"
    started = time.monotonic()
    sim.stop()  # must not wait for the held answer
    assert time.monotonic() - started < 2
    worker.join(timeout=5)
    assert not worker.is_alive() and outcome  # the held connection was dropped


def test_drop_after_charge_closes_without_an_answer(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.DROP_AFTER_CHARGE))
    with pytest.raises(requests.ConnectionError):
        call(sim, keys, "pay", pay_params("T-DROP"))
    assert held(sim, "T-DROP")


def test_system_error_charged_is_found_paid_by_query(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.SYSTEM_ERROR_CHARGED))
    answer = call(sim, keys, "pay", pay_params("T-SYSC"))
    assert (answer.fields["result_code"], answer.fields["error"]) == ("FAILED", "SYSTEM_ERROR")
    assert verifies(sim, answer)
    queried = call(sim, keys, "query", query_params("T-SYSC"))
    assert queried.fields["alipay_trans_status"] == "TRADE_SUCCESS"


def test_system_error_not_charged_creates_no_trade_and_a_retry_creates_it(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED))
    params = pay_params("T-SYSN")
    assert call(sim, keys, "pay", params).fields["error"] == "SYSTEM_ERROR"
    assert call(sim, keys, "query", query_params("T-SYSN")).fields["error"] == "TRADE_NOT_EXIST"
    assert call(sim, keys, "pay", params).fields["result_code"] == "SUCCESS"
    assert sim.ledger.charged_total() == Decimal("1.50")


@pytest.mark.parametrize("charge", [True, False])
def test_http_500_answers_html_and_charges_as_told(
    sim: GatewaySimulator, keys: Keys, charge: bool
) -> None:
    sim.inject(FaultPlan(Fault.HTTP_500, charge=charge))
    response = post(sim.url, signed(keys, "pay", pay_params("T-500")))
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    assert held(sim, "T-500") is charge


def test_forged_signature_answers_success_that_does_not_verify(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.FORGED_SIGNATURE))
    answer = call(sim, keys, "pay", pay_params("T-FORGED"))
    assert answer.fields["result_code"] == "SUCCESS"
    assert not verifies(sim, answer)
    assert held(sim, "T-FORGED")


def test_gbk_answer_declares_and_uses_gbk(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.GBK))
    response = post(sim.url, signed(keys, "pay", pay_params("T-GBK")))
    assert response.content.startswith(b'<?xml version="1.0" encoding="GBK"?>')
    text = response.content.decode("gbk")
    assert "支付宝" in text
    with pytest.raises(UnicodeDecodeError):
        response.content.decode("utf-8")
    answer = parse(response)
    assert "支付宝" in answer.fields["alipay_buyer_login_id"]
    assert verifies(sim, answer)  # signed over the UTF-8 pre-sign string


def test_truncated_answer_is_not_parseable_but_charged(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.TRUNCATED))
    response = post(sim.url, signed(keys, "pay", pay_params("T-CUT")))
    assert response.status_code == 200
    with pytest.raises(ParseError):
        SafeET.fromstring(decode_answer(response.content))
    assert held(sim, "T-CUT")


def test_decline_answers_failed_with_the_error_and_charges_nothing(
    sim: GatewaySimulator, keys: Keys
) -> None:
    sim.inject(FaultPlan(Fault.DECLINE, error="BUYER_BALANCE_NOT_ENOUGH"))
    answer = call(sim, keys, "pay", pay_params("T-DECL"))
    assert (answer.fields["result_code"], answer.fields["error"]) == (
        "FAILED",
        "BUYER_BALANCE_NOT_ENOUGH",
    )
    assert sim.ledger.trades() == []


def test_fault_for_one_trade_leaves_others_alone(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.DECLINE, error="PAYMENT_FAIL"), partner_trans_id="T-TARGET")
    assert call(sim, keys, "pay", pay_params("T-BYSTANDER")).fields["result_code"] == "SUCCESS"
    assert call(sim, keys, "pay", pay_params("T-TARGET")).fields["error"] == "PAYMENT_FAIL"


def test_fault_applies_only_the_given_number_of_times(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="query", times=2))
    results = [call(sim, keys, "query", query_params("T-TIMES")).fields["error"] for _ in range(3)]
    assert results == ["SYSTEM_ERROR", "SYSTEM_ERROR", "TRADE_NOT_EXIST"]


def test_fault_on_cancel_takes_effect_then_drops(sim: GatewaySimulator, keys: Keys) -> None:
    call(sim, keys, "pay", pay_params("T-CDROP"))
    sim.inject(FaultPlan(Fault.DROP_AFTER_CHARGE, service="cancel"))
    with pytest.raises(requests.ConnectionError):
        call(sim, keys, "cancel", cancel_params("T-CDROP"))
    assert not held(sim, "T-CDROP")


def test_clear_faults_forgets_injected_plans(sim: GatewaySimulator, keys: Keys) -> None:
    sim.inject(FaultPlan(Fault.DECLINE))
    sim.clear_faults()
    assert call(sim, keys, "pay", pay_params("T-CLEAR")).fields["result_code"] == "SUCCESS"


@pytest.mark.parametrize(
    ("tail", "error"),
    [("2022", SEED_ERROR_CODES[21]), ("2019", "SOUNDWAVE_PARSER_FAIL"), ("2999", "PAYMENT_FAIL")],
)
def test_magic_decline_codes_use_the_seed_list_numbering(
    sim: GatewaySimulator, keys: Keys, tail: str, error: str
) -> None:
    params = pay_params(f"T-{tail}", code=new_code(tail))
    assert call(sim, keys, "pay", params).fields["error"] == error
    assert call(sim, keys, "pay", params).fields["error"] == error  # a retry declines again
    assert SEED_ERROR_CODES[21] == "BUYER_BALANCE_NOT_ENOUGH"


def test_magic_code_3004_hides_the_outcome_once(sim: GatewaySimulator, keys: Keys) -> None:
    params = pay_params("T-3004", code=new_code("3004"))
    assert call(sim, keys, "pay", params).fields["error"] == "SYSTEM_ERROR"
    assert call(sim, keys, "pay", params).fields["result_code"] == "SUCCESS"


def test_magic_code_3002_drops_after_charging(sim: GatewaySimulator, keys: Keys) -> None:
    with pytest.raises(requests.ConnectionError):
        call(sim, keys, "pay", pay_params("T-3002", code=new_code("3002")))
    assert held(sim, "T-3002")


# What the client needs of every signed answer ---------------------------------------------------

Scenario = tuple[str, dict[str, str], Answer]  # (service, the request's parameters, its answer)


def _paid(sim: GatewaySimulator, keys: Keys, trans_id: str) -> None:
    assert call(sim, keys, "pay", pay_params(trans_id)).fields["result_code"] == "SUCCESS"


def _pay(
    sim: GatewaySimulator, keys: Keys, params: dict[str, str], plan: FaultPlan | None = None
) -> Scenario:
    if plan is not None:
        sim.inject(plan, partner_trans_id=params["partner_trans_id"])
    return "pay", params, call(sim, keys, "pay", params)


def _again(sim: GatewaySimulator, keys: Keys, params: dict[str, str], **change: str) -> Scenario:
    call(sim, keys, "pay", params)
    return _pay(sim, keys, {**params, **change})


def _after_cancel(sim: GatewaySimulator, keys: Keys, params: dict[str, str]) -> Scenario:
    call(sim, keys, "cancel", cancel_params(params["partner_trans_id"]))
    return _pay(sim, keys, params)


def _with_used_code(sim: GatewaySimulator, keys: Keys) -> Scenario:
    code = new_code()
    call(sim, keys, "pay", pay_params("E-CODE-1", code=code))
    return _pay(sim, keys, pay_params("E-CODE-2", code=code))


def _closed_then_retried(sim: GatewaySimulator, keys: Keys) -> Scenario:
    params = pay_params("E-CLOSED")
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None), partner_trans_id="E-CLOSED")
    call(sim, keys, "pay", params)
    call(sim, keys, "cancel", cancel_params("E-CLOSED"))
    return _pay(sim, keys, params)


def _other(
    sim: GatewaySimulator,
    keys: Keys,
    service: str,
    params: dict[str, str],
    plan: FaultPlan | None = None,
    paid: bool = True,
    amount: str = "1.50",
) -> Scenario:
    trans_id = params.get("partner_trans_id") or params["out_trade_no"]
    if paid:
        assert call(sim, keys, "pay", pay_params(trans_id, amount=amount)).fields["result_code"]
    if plan is not None:
        sim.inject(plan, partner_trans_id=trans_id)
    return service, params, call(sim, keys, service, params)


def _unpaid(sim: GatewaySimulator, keys: Keys, service: str, params: dict[str, str]) -> Scenario:
    trans_id = params.get("partner_trans_id") or params["out_trade_no"]
    sim.inject(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None), partner_trans_id=trans_id)
    return _other(sim, keys, service, params)


def _refund_twice(sim: GatewaySimulator, keys: Keys) -> Scenario:
    _paid(sim, keys, "E-RTWICE")
    call(sim, keys, "refund", refund_params("E-RTWICE", "R-TWICE", "0.50"))
    return _other(sim, keys, "refund", refund_params("E-RTWICE", "R-TWICE", "0.70"), paid=False)


Q, C = query_params, cancel_params
SCENARIOS: dict[str, Callable[[GatewaySimulator, Keys], Scenario]] = {
    "pay paid": lambda s, k: _pay(s, k, pay_params("E-PAID")),
    "pay declined": lambda s, k: _pay(s, k, pay_params("E-DECL"), FaultPlan(Fault.DECLINE)),
    "pay declined by magic code": lambda s, k: _pay(
        s, k, pay_params("E-2022", code=new_code("2022"))
    ),
    "pay parameter error": lambda s, k: _pay(s, k, {**pay_params("E-PARAM"), "extend_info": "{}"}),
    "pay SYSTEM_ERROR charged": lambda s, k: _pay(
        s, k, pay_params("E-SYSC"), FaultPlan(Fault.SYSTEM_ERROR_CHARGED)
    ),
    "pay SYSTEM_ERROR not charged": lambda s, k: _pay(
        s, k, pay_params("E-SYSN"), FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED)
    ),
    "pay waiting for the buyer": lambda s, k: _pay(
        s, k, pay_params("E-WAIT"), FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None)
    ),
    "pay in GBK": lambda s, k: _pay(s, k, pay_params("E-GBK"), FaultPlan(Fault.GBK)),
    "pay retried with another amount": lambda s, k: _again(
        s, k, pay_params("E-CTX"), trans_amount="2.00"
    ),
    "pay retried with another code": lambda s, k: _again(
        s, k, pay_params("E-BUYER"), buyer_identity_code=new_code()
    ),
    "pay with a used code": _with_used_code,
    "pay of a cancelled id": lambda s, k: _after_cancel(s, k, pay_params("E-BURNT")),
    "pay retried after its trade closed": _closed_then_retried,
    "query paid": lambda s, k: _other(s, k, "query", Q("E-QPAID")),
    "query of no trade": lambda s, k: _other(s, k, "query", Q("E-QNONE"), paid=False),
    "query SYSTEM_ERROR": lambda s, k: _other(
        s, k, "query", Q("E-QSYS"), FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="query")
    ),
    "query declined": lambda s, k: _other(
        s, k, "query", Q("E-QDECL"), FaultPlan(Fault.DECLINE, service="query")
    ),
    "cancel paid": lambda s, k: _other(s, k, "cancel", C("E-CPAID")),
    "cancel of no trade": lambda s, k: _other(s, k, "cancel", C("E-CNONE"), paid=False),
    "cancel after the window": lambda s, k: _other(
        s, k, "cancel", C("E-CWIN"), FaultPlan(Fault.CANCEL_WINDOW_CLOSED)
    ),
    "cancel declined": lambda s, k: _other(
        s, k, "cancel", C("E-CDECL"), FaultPlan(Fault.DECLINE, service="cancel")
    ),
    "cancel SYSTEM_ERROR": lambda s, k: _other(
        s, k, "cancel", C("E-CSYS"), FaultPlan(Fault.SYSTEM_ERROR_CHARGED, service="cancel")
    ),
    "cancel naming another trade_no": lambda s, k: _other(
        s, k, "cancel", {**C("E-CTNO"), "trade_no": "2024000000000000000000000000"}
    ),
    "cancel without a timestamp": lambda s, k: _other(
        s, k, "cancel", {"out_trade_no": "E-CNOTS"}, paid=False
    ),
    "refund": lambda s, k: _other(s, k, "refund", refund_params("E-REF", "R-1", "1.50")),
    "refund of too much": lambda s, k: _other(
        s, k, "refund", refund_params("E-RMUCH", "R-1", "1.50"), amount="1.00"
    ),
    "refund of no trade": lambda s, k: _other(
        s, k, "refund", refund_params("E-RNONE", "R-1", "1.50"), paid=False
    ),
    "refund of an unpaid trade": lambda s, k: _unpaid(
        s, k, "refund", refund_params("E-RUNPAID", "R-1", "1.50")
    ),
    "refund in another currency": lambda s, k: _other(
        s, k, "refund", {**refund_params("E-RCUR", "R-1", "1.50"), "currency": "HKD"}
    ),
    "refund id reused for another amount": _refund_twice,
    "refund declined": lambda s, k: _other(
        s,
        k,
        "refund",
        refund_params("E-RDECL", "R-1", "1.50"),
        FaultPlan(Fault.DECLINE, service="refund"),
    ),
    "refund SYSTEM_ERROR": lambda s, k: _other(
        s,
        k,
        "refund",
        refund_params("E-RSYS", "R-1", "1.50"),
        FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="refund"),
    ),
}
# The fields a client needs echoed, equal to its request (ALIPAY.md's answer fields).
ECHOES = {
    "pay": ("partner_trans_id", "trans_amount", "currency"),
    "query": ("partner_trans_id",),
    "cancel": ("out_trade_no",),
    "refund": ("partner_trans_id", "partner_refund_id", "refund_amount", "currency"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_signed_answer_echoes_what_its_request_asked(
    sim: GatewaySimulator, keys: Keys, scenario: str
) -> None:
    service, params, answer = SCENARIOS[scenario](sim, keys)
    assert answer.is_success == "T"
    assert verifies(sim, answer)
    for name in ECHOES[service]:
        assert answer.fields.get(name) == params[name], name


@pytest.mark.parametrize("scenario", ["query paid", "query SYSTEM_ERROR", "query declined"])
def test_a_query_about_an_existing_trade_names_its_amount_and_currency(
    sim: GatewaySimulator, keys: Keys, scenario: str
) -> None:
    _, params, answer = SCENARIOS[scenario](sim, keys)
    trade = sim.ledger.trade(PARTNER, params["partner_trans_id"])
    assert trade is not None
    assert (answer.fields["trans_amount"], answer.fields["currency"]) == ("1.50", "USD")


# The client's view of each fault: what it says on the tin -------------------------------------

FAULT_VERDICTS: dict[str, tuple[FaultPlan, Outcome, str | None, str]] = {
    # name: (the fault, on its service, what the client makes of it, its error, its detail)
    "decline": (
        FaultPlan(Fault.DECLINE, error="BUYER_BALANCE_NOT_ENOUGH"),
        Outcome.FAILED,
        "BUYER_BALANCE_NOT_ENOUGH",
        "FAILED BUYER_BALANCE_NOT_ENOUGH",
    ),
    "system_error_charged": (
        FaultPlan(Fault.SYSTEM_ERROR_CHARGED),
        Outcome.UNKNOWN,
        "SYSTEM_ERROR",
        "FAILED SYSTEM_ERROR",
    ),
    "system_error_not_charged": (
        FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED),
        Outcome.UNKNOWN,
        "SYSTEM_ERROR",
        "FAILED SYSTEM_ERROR",
    ),
    "http_500": (FaultPlan(Fault.HTTP_500), Outcome.UNKNOWN, None, "HTTP 500"),
    "http_500 not charged": (
        FaultPlan(Fault.HTTP_500, charge=False),
        Outcome.UNKNOWN,
        None,
        "HTTP 500",
    ),
    "forged_signature": (
        FaultPlan(Fault.FORGED_SIGNATURE),
        Outcome.UNKNOWN,
        None,
        "bad signature",
    ),
    "gbk": (FaultPlan(Fault.GBK), Outcome.SUCCESS, None, "SUCCESS"),
    "truncated": (FaultPlan(Fault.TRUNCATED), Outcome.UNKNOWN, None, "answer does not parse"),
    "drop_after_charge": (
        FaultPlan(Fault.DROP_AFTER_CHARGE),
        Outcome.UNKNOWN,
        None,
        "connection closed without an answer",
    ),
    "slow_after_charge": (
        FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=5.0),
        Outcome.UNKNOWN,
        None,
        "read timeout",
    ),
    "wait_buyer_pay": (
        FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None),
        Outcome.UNKNOWN,
        None,
        "UNKNOW",
    ),
    "query decline": (
        FaultPlan(Fault.DECLINE, service="query"),
        Outcome.FAILED,
        "PAYMENT_FAIL",
        "FAIL PAYMENT_FAIL",
    ),
    "query system_error": (
        FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="query"),
        Outcome.UNKNOWN,
        "SYSTEM_ERROR",
        "FAIL SYSTEM_ERROR",
    ),
    "query gbk": (FaultPlan(Fault.GBK, service="query"), Outcome.SUCCESS, None, "TRADE_SUCCESS"),
    "cancel_window_closed": (
        FaultPlan(Fault.CANCEL_WINDOW_CLOSED),
        Outcome.FAILED,
        "TRADE_CANCEL_TIME_OUT",
        "FAIL TRADE_CANCEL_TIME_OUT",
    ),
    "cancel decline": (
        FaultPlan(Fault.DECLINE, service="cancel"),
        Outcome.FAILED,
        "TRADE_STATUS_ERROR",
        "FAIL TRADE_STATUS_ERROR",
    ),
    "cancel system_error": (
        FaultPlan(Fault.SYSTEM_ERROR_CHARGED, service="cancel"),
        Outcome.UNKNOWN,
        "SYSTEM_ERROR",
        "UNKNOWN SYSTEM_ERROR",
    ),
    "cancel gbk": (FaultPlan(Fault.GBK, service="cancel"), Outcome.SUCCESS, None, "SUCCESS"),
    "refund decline": (
        FaultPlan(Fault.DECLINE, service="refund"),
        Outcome.FAILED,
        "TRADE_STATUS_ERROR",
        "FAILED TRADE_STATUS_ERROR",
    ),
    "refund system_error": (
        FaultPlan(Fault.SYSTEM_ERROR_NOT_CHARGED, service="refund"),
        Outcome.UNKNOWN,
        "SYSTEM_ERROR",
        "FAILED SYSTEM_ERROR",
    ),
    "refund forged_signature": (
        FaultPlan(Fault.FORGED_SIGNATURE, service="refund"),
        Outcome.UNKNOWN,
        None,
        "bad signature",
    ),
}
# Only what a signed answer says is verified; transport faults and forgeries are not.
_UNVERIFIED = {Fault.HTTP_500, Fault.FORGED_SIGNATURE, Fault.TRUNCATED, Fault.DROP_AFTER_CHARGE}


@pytest.mark.parametrize("name", list(FAULT_VERDICTS))
def test_the_client_sees_each_fault_as_its_name_says(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient], name: str
) -> None:
    plan, expected, error, detail = FAULT_VERDICTS[name]
    timed_out = plan.fault is Fault.SLOW_AFTER_CHARGE
    client = make_client(SignType.RSA2, pay_timeout_s=0.5 if timed_out else 5.0)
    trans_id = "F-" + name.replace(" ", "-")
    order = PayOrder(
        partner_trans_id=trans_id,
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code=payment_code("0001"),
        trans_name="Vending purchase",
        trans_create_time="20240601120000",
        extend_info={"secondary_merchant_id": "M-001", "store_id": "S-042"},
    )
    if plan.service != "pay":
        assert client.pay(order).outcome is Outcome.SUCCESS
    simulator.inject(plan, partner_trans_id=trans_id)
    result: PayResult | QueryResult | CancelResult | RefundResult
    if plan.service == "pay":
        result = client.pay(order)
    elif plan.service == "query":
        result = client.query(trans_id, amount=Decimal("1.50"), currency="USD")
    elif plan.service == "cancel":
        result = client.cancel(trans_id, int(time.time() * 1000))
    else:
        result = client.refund(trans_id, trans_id + "-R", Decimal("1.50"), "USD")
    assert (result.outcome, result.error, result.detail) == (expected, error, detail)
    assert result.verified is not (plan.fault in _UNVERIFIED or timed_out)
    if isinstance(result, CancelResult) and expected is Outcome.FAILED:
        assert result.retry_flag is False


def test_a_query_of_no_trade_is_a_verified_refusal(
    simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> None:
    # What the kiosk's gateway probe relies on: a signed "no such trade" proves the key works.
    result = make_client(SignType.RSA2).query("VM-0042-probe")
    assert (result.outcome, result.error, result.verified) == (
        Outcome.FAILED,
        "TRADE_NOT_EXIST",
        True,
    )


def test_a_request_with_the_wrong_key_is_rejected_unverified(
    simulator: GatewaySimulator,
) -> None:
    settings = GatewaySettings(
        gateway=simulator.url,
        partner=PARTNER,
        seller_id=PARTNER,
        signature=Md5Signature(b"f" * 32),
    )
    with AlipayClient(settings) as client:
        result = client.query("VM-0042-probe")
    assert (result.outcome, result.error, result.verified) == (
        Outcome.REJECTED,
        "ILLEGAL_SIGN",
        False,
    )


# Network and the control endpoint -----------------------------------------------------------


def test_go_offline_refuses_connections_and_go_online_keeps_the_port(
    sim: GatewaySimulator, keys: Keys
) -> None:
    url = sim.url
    sim.go_offline()
    with pytest.raises(requests.ConnectionError):
        call(sim, keys, "pay", pay_params("T-OFF"))
    sim.go_online()
    assert sim.url == url
    assert call(sim, keys, "pay", pay_params("T-OFF")).fields["result_code"] == "SUCCESS"


def test_control_endpoint_injects_a_fault_and_shows_the_ledger(
    sim: GatewaySimulator, keys: Keys
) -> None:
    base = sim.url.removesuffix("/gateway.do")
    plan = {"fault": "decline", "error": "PAYMENT_REQUEST_HAS_RISK", "partner_trans_id": "T-RIG"}
    assert requests.post(f"{base}/_sim/fault", json=plan, timeout=5).status_code == 200
    assert call(sim, keys, "pay", pay_params("T-RIG")).fields["error"] == (
        "PAYMENT_REQUEST_HAS_RISK"
    )
    call(sim, keys, "pay", pay_params("T-RIG-OK"))
    ledger = requests.get(f"{base}/_sim/ledger", timeout=5).json()
    assert [t["partner_trans_id"] for t in ledger["trades"]] == ["T-RIG-OK"]
    assert ledger["charged_total"] == "1.50"


def test_control_endpoint_rejects_a_bad_plan(sim: GatewaySimulator) -> None:
    base = sim.url.removesuffix("/gateway.do")
    answer = requests.post(f"{base}/_sim/fault", json={"fault": "nonsense"}, timeout=5)
    assert answer.status_code == 400


def test_control_endpoint_takes_the_gateway_offline_for_a_while(
    sim: GatewaySimulator, keys: Keys
) -> None:
    base = sim.url.removesuffix("/gateway.do")
    assert requests.post(f"{base}/_sim/offline", json={"seconds": 0.5}, timeout=5).ok

    def reachable() -> bool:
        try:
            requests.get(f"{base}/_sim/ledger", timeout=1)
        except requests.ConnectionError:
            return False
        return True

    deadline = time.monotonic() + 5
    while reachable() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not reachable()
    while not reachable() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert call(sim, keys, "pay", pay_params("T-BACK")).fields["result_code"] == "SUCCESS"


# HTTPS --------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiosk test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_gateway_serves_over_tls(keys: Keys, tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    with GatewaySimulator(_accounts(keys), keys.alipay, ssl_context=context) as sim:
        assert sim.url.startswith("https://127.0.0.1:")
        params = signed(keys, "pay", pay_params("T-TLS"))
        response = requests.post(sim.url, data=params, timeout=5, verify=str(cert_path))
        assert parse(response).fields["result_code"] == "SUCCESS"
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(sim.url, data=params, timeout=5)
