"""The MAPI client: build, sign, send and verify pay, query, cancel and refund calls.

Every call ends in a typed result whose `outcome` is SUCCESS, FAILED, REJECTED or UNKNOWN.
Only an answer that proves itself decides: its signature verifies against the configured key,
and it echoes the request's identifying fields (`REQUIRED_ECHOES`), present and equal. Such an
answer gives SUCCESS or FAILED; a refusal that does not prove itself (a gateway rejection,
`is_success=F`, which is unsigned by design, or a signed refusal that names no trade) is
REJECTED; anything else is UNKNOWN, never success. Error codes are normalised where they enter
(`UNRECOGNISED_ERROR`). Only a request that provably never reached a gateway raises
`GatewayUnreachable`. It knows nothing of kiosks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from http.client import RemoteDisconnected
from typing import TypeVar
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)

from kiosk.alipay.pinning import PinMismatch, PinnedAdapter
from kiosk.alipay.signing import Signature, SignType, presign_string
from kiosk.alipay.xml import MAX_ANSWER_BYTES, Answer, AnswerUnreadable, parse_answer, verify_answer
from kiosk.errors import GatewayUnreachable
from kiosk.log import event, mask_codes
from kiosk.money import format_amount

log = logging.getLogger("kiosk.alipay")

INPUT_CHARSET = "UTF-8"
SERVICE_PAY = "alipay.acquire.overseas.spot.pay"
SERVICE_QUERY = "alipay.acquire.overseas.query"
SERVICE_CANCEL = "alipay.acquire.cancel"
SERVICE_REFUND = "alipay.acquire.overseas.spot.refund"


class Outcome(enum.StrEnum):
    SUCCESS = "success"  # proven: verified, and names this very request
    FAILED = "failed"  # a proven refusal: verified, and names this very request
    # A refusal that does not prove itself: a gateway rejection (unsigned by design), or a
    # signed refusal without the echoes that tie it to this request. `error` says what was
    # claimed, but the transaction stays open (resolve it as an unknown outcome).
    REJECTED = "rejected"
    UNKNOWN = "unknown"  # nothing certain came back


# An error code as Alipay spells them; anything else entering from an answer is replaced by
# UNRECOGNISED_ERROR, and its text (printable, cut short) goes into `detail` only.
ERROR_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
UNRECOGNISED_ERROR = "UNRECOGNISED_ERROR"
_RAW_ERROR_CHARS = 40

# The answer fields that tie an answer to its request, per service: a SUCCESS or FAILED counts
# only when each is present and equal to what was asked. A query also needs `trans_amount` and
# `currency` when the caller gave them, except in a FAIL answer (no such trade has no amount).
REQUIRED_ECHOES: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "pay": ("partner_trans_id", "trans_amount", "currency"),
        "query": ("partner_trans_id",),
        "cancel": ("out_trade_no",),
        "refund": ("partner_trans_id", "partner_refund_id", "refund_amount"),
    }
)


class TradeStatus(enum.StrEnum):
    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
    TRADE_SUCCESS = "TRADE_SUCCESS"
    TRADE_CLOSED = "TRADE_CLOSED"
    TRADE_FINISHED = "TRADE_FINISHED"


# Paid, and still refundable or past that: the statuses that mean Alipay holds the money.
PAID_STATUSES = (TradeStatus.TRADE_SUCCESS, TradeStatus.TRADE_FINISHED)


@dataclass(frozen=True)
class GatewaySettings:
    gateway: str
    partner: str
    seller_id: str
    # Signs requests and verifies answers: an Md5Signature, or an RsaSignature holding the
    # merchant private key and Alipay's public key.
    signature: Signature
    backup_gateway: str | None = None
    # requests' `verify`: a CA bundle path, or True for the system's trust store (OpenSSL's
    # own default file, not certifi's copy and not whatever the environment names)
    verify_tls: bool | str = True
    # Base64 SHA-256 SubjectPublicKeyInfo pins (kiosk.alipay.pinning): when given, a TLS
    # connection whose verified chain holds none of these keys is closed before it is used.
    pin_sha256: tuple[str, ...] = ()
    connect_timeout_s: float = 3.0
    pay_timeout_s: float = 10.0  # read timeout of pay
    read_timeout_s: float = 10.0  # read timeout of query, cancel and refund
    # A kept-alive connection carries the next request only this soon after the last answer:
    # servers close idle ones (some after 5 s), and a request sent into one being closed is
    # lost with its outcome unknown. Later, a new connection is made.
    reuse_connection_s: float = 4.0


@dataclass(frozen=True)
class PayOrder:
    partner_trans_id: str
    amount: Decimal
    currency: str
    buyer_identity_code: str
    trans_name: str
    trans_create_time: str  # yyyyMMddHHmmss, Beijing time (UTC+8)
    extend_info: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # the buyer's code stays out of tracebacks and logs
        return (
            f"PayOrder(partner_trans_id={self.partner_trans_id!r}, amount={self.amount}, "
            f"currency={self.currency!r}, buyer_identity_code=<hidden>)"
        )


# Every result: `error` is a normalised code (or None); `detail` a short reason for the log;
# `verified` is True only when the answer's signature verified against the configured key
# (whatever it then said: a signed "no such trade" still proves the key and partner work).
@dataclass(frozen=True)
class PayResult:
    outcome: Outcome
    error: str | None
    alipay_trans_id: str | None  # set only from an answer that names this request (FAILED too)
    detail: str
    verified: bool = False


@dataclass(frozen=True)
class QueryResult:
    outcome: Outcome
    trade_status: TradeStatus | None
    error: str | None
    alipay_trans_id: str | None
    detail: str
    verified: bool = False


@dataclass(frozen=True)
class CancelResult:
    outcome: Outcome
    retry_flag: bool | None  # None unless the answer names this cancel
    error: str | None
    detail: str
    verified: bool = False


@dataclass(frozen=True)
class RefundResult:
    outcome: Outcome
    error: str | None
    detail: str
    verified: bool = False


Result = TypeVar("Result", PayResult, QueryResult, CancelResult, RefundResult)


@dataclass(frozen=True)
class _Checked:
    """An answer that may be believed (or a rejection, to be called REJECTED), or None and why."""

    answer: Answer | None
    verified: bool  # the signature verified against the configured key
    why: str


@dataclass(frozen=True)
class _Reply:
    """What came back for one call: a verified answer, or why the outcome is unknown."""

    answer: Answer | None
    unknown: str | None  # set when the outcome cannot be known
    gateway: str


class AlipayClient:
    """One merchant's MAPI client. `close()` releases its connections; safe to call twice."""

    def __init__(self, settings: GatewaySettings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            # Where requests go is the config's to say, never the environment's: no proxy
            # (HTTPS_PROXY, ALL_PROXY), no netrc credentials, no REQUESTS_CA_BUNDLE.
            session.trust_env = False
            # No silent retries below us: a resent pay must be a decision, not a side effect.
            session.mount("https://", PinnedAdapter(settings.pin_sha256, max_retries=0))
            session.mount("http://", HTTPAdapter(max_retries=0))
        self._session = session
        self._verify = system_trust_store() if settings.verify_tls is True else settings.verify_tls
        self._routes: dict[str, _Route] = {}  # per gateway, made at its first request
        self._last_answer: float | None = None  # monotonic; when a connection was last used
        self._guard = _AnswerGuard()
        self._ahead = _SigningAhead(self.pay_params)

    # -- request builders -------------------------------------------------------------------

    def _signed(self, params: dict[str, str]) -> dict[str, str]:
        params = {key: value for key, value in params.items() if value}
        params["sign"] = self.settings.signature.sign(presign_string(params))
        params["sign_type"] = self.settings.signature.sign_type.value
        return params

    def _base(self, service: str) -> dict[str, str]:
        return {
            "service": service,
            "partner": self.settings.partner,
            "_input_charset": INPUT_CHARSET,
        }

    def pay_params(self, order: PayOrder) -> dict[str, str]:
        """The signed parameters of a pay request, `sign` and `sign_type` included."""
        params = self._base(SERVICE_PAY)
        params.update(
            alipay_seller_id=self.settings.seller_id,
            trans_name=order.trans_name,
            partner_trans_id=order.partner_trans_id,
            currency=order.currency,
            trans_amount=format_amount(order.amount, order.currency),
            buyer_identity_code=order.buyer_identity_code,
            identity_code_type="barcode",
            trans_create_time=order.trans_create_time,
            biz_product="OVERSEAS_MBARCODE_PAY",
        )
        if order.extend_info:
            params["extend_info"] = json.dumps(
                dict(order.extend_info), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        return self._signed(params)

    def query_params(
        self, partner_trans_id: str, alipay_trans_id: str | None = None
    ) -> dict[str, str]:
        params = self._base(SERVICE_QUERY)
        params["partner_trans_id"] = partner_trans_id
        if alipay_trans_id:
            params["alipay_trans_id"] = alipay_trans_id
        return self._signed(params)

    def cancel_params(
        self, partner_trans_id: str, timestamp_ms: int, alipay_trans_id: str | None = None
    ) -> dict[str, str]:
        params = self._base(SERVICE_CANCEL)
        params["out_trade_no"] = partner_trans_id
        params["timestamp"] = str(int(timestamp_ms))
        if alipay_trans_id:
            params["trade_no"] = alipay_trans_id
        return self._signed(params)

    def refund_params(
        self,
        partner_trans_id: str,
        partner_refund_id: str,
        amount: Decimal,
        currency: str,
        reason: str | None = None,
    ) -> dict[str, str]:
        params = self._base(SERVICE_REFUND)
        params.update(
            partner_trans_id=partner_trans_id,
            partner_refund_id=partner_refund_id,
            refund_amount=format_amount(amount, currency),
            currency=currency,
            is_sync="Y",
        )
        if reason:
            params["refund_reason"] = reason
        return self._signed(params)

    # -- calls ------------------------------------------------------------------------------

    def sign_ahead(self, order: PayOrder) -> None:
        """Start signing `order`'s pay request on the client's own thread, while the caller
        journals the sale; `pay(order)` then takes that signature instead of signing again."""
        self._ahead.start(order)

    def pay(self, order: PayOrder) -> PayResult:
        """Charge the buyer's code. UNKNOW, timeouts and doubtful answers give UNKNOWN."""
        params = self._ahead.take(order) or self.pay_params(order)
        return self._exchange(
            SERVICE_PAY,
            order.partner_trans_id,
            lambda: self._pay_result(self._call(params, self.settings.pay_timeout_s), params),
        )

    def query(
        self,
        partner_trans_id: str,
        alipay_trans_id: str | None = None,
        *,
        amount: Decimal | None = None,
        currency: str | None = None,
    ) -> QueryResult:
        """The trade's state. Give `amount` and `currency` to have only an answer that names
        that amount and currency count (a query request carries neither)."""
        params = self.query_params(partner_trans_id, alipay_trans_id)
        expect = dict(params)
        required = list(REQUIRED_ECHOES["query"])
        if amount is not None and currency is not None:
            expect["trans_amount"] = format_amount(amount, currency)
            required.append("trans_amount")
        if currency is not None:
            expect["currency"] = currency
            required.append("currency")
        return self._exchange(
            SERVICE_QUERY,
            partner_trans_id,
            lambda: self._query_result(
                self._call(params, self.settings.read_timeout_s), expect, tuple(required)
            ),
        )

    def cancel(
        self, partner_trans_id: str, timestamp_ms: int, alipay_trans_id: str | None = None
    ) -> CancelResult:
        """Close or reverse the trade. `timestamp_ms` is epoch milliseconds, the moment this
        request is sent: pass a fresh value on every send (idempotency rests on `out_trade_no`,
        which is the `partner_trans_id`)."""
        params = self.cancel_params(partner_trans_id, timestamp_ms, alipay_trans_id)
        return self._exchange(
            SERVICE_CANCEL,
            partner_trans_id,
            lambda: self._cancel_result(self._call(params, self.settings.read_timeout_s), params),
        )

    def refund(
        self,
        partner_trans_id: str,
        partner_refund_id: str,
        amount: Decimal,
        currency: str,
        reason: str | None = None,
    ) -> RefundResult:
        """Refund part or all of a paid trade, synchronously. `partner_refund_id` is the
        idempotency key: retry with the same one."""
        params = self.refund_params(partner_trans_id, partner_refund_id, amount, currency, reason)
        return self._exchange(
            SERVICE_REFUND,
            partner_trans_id,
            lambda: self._refund_result(self._call(params, self.settings.read_timeout_s), params),
        )

    def close(self) -> None:
        self._guard.close()
        self._ahead.close()
        if self._own_session:
            self._session.close()

    def __enter__(self) -> AlipayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    def _call(self, params: Mapping[str, str], read_timeout_s: float) -> _Reply:
        """Send to the primary gateway, or to the backup when the primary was never reached.
        Raises GatewayUnreachable only when neither gateway took the connection."""
        body = urlencode(params).encode("ascii")
        gateways = [self.settings.gateway]
        if self.settings.backup_gateway:
            gateways.append(self.settings.backup_gateway)
        reasons: list[str] = []
        for gateway in gateways:
            try:
                return self._send(gateway, body, read_timeout_s)
            except _NotSent as exc:
                reasons.append(f"{_host(gateway)}: {exc}")
                event(
                    log,
                    "alipay.not_sent",
                    logging.WARNING,
                    service=params.get("service"),
                    gateway=_host(gateway),
                    detail=str(exc),
                )
        raise GatewayUnreachable("no gateway took the connection (" + "; ".join(reasons) + ")")

    def _send(self, gateway: str, body: bytes, read_timeout_s: float) -> _Reply:
        timeout = (self.settings.connect_timeout_s, read_timeout_s)
        # The read timeout bounds each socket read, not the answer: a gateway (or anything in
        # its place) trickling bytes just inside it could hold the call for as long as it
        # liked. The whole exchange gets the connect timeout plus the read timeout.
        now = time.monotonic()
        deadline = now + self.settings.connect_timeout_s + read_timeout_s
        if self._last_answer is not None and now - self._last_answer > (
            self.settings.reuse_connection_s
        ):
            self._forget_connections()
        self._last_answer = None
        if self.settings.pin_sha256 and not gateway.lower().startswith("https://"):
            raise _NotSent("pinned keys need an https gateway")
        try:
            route = self._routes.get(gateway) or self._route(gateway)
            request = route.request.copy()
            request.prepare_body(body, None)
            response = self._session.send(
                request,
                timeout=timeout,
                proxies=route.proxies,
                verify=route.verify,
                cert=route.cert,
                allow_redirects=False,
                stream=True,
            )
        except (PinMismatch, requests.RequestException) as exc:
            # Raised in connect(), before a byte of the request (as it is or wrapped).
            mismatch = next((c for c in _causes(exc) if isinstance(c, PinMismatch)), None)
            if mismatch is not None:
                event(
                    log,
                    "alipay.pin_mismatch",
                    logging.ERROR,
                    gateway=mismatch.host,
                    expected=",".join(mismatch.expected),
                    seen=",".join(mismatch.seen),
                )
                raise _NotSent("TLS key pin mismatch") from None
            assert isinstance(exc, requests.RequestException)
            not_sent = _never_sent(exc)
            if not_sent is not None:
                raise _NotSent(not_sent) from None
            return _Reply(None, _after_connect(exc), gateway)
        except LocationParseError:  # a host no resolver takes: nothing was sent
            raise _NotSent("gateway URL not usable") from None
        with response:
            if response.status_code != 200:
                return _Reply(None, f"HTTP {response.status_code}", gateway)
            try:
                # A read that blocks inside one chunk is ended at the deadline from outside.
                with self._guard.watching(response, deadline):
                    raw = _read_capped(response, deadline)
            except _TooLong:
                return _Reply(None, f"answer over {MAX_ANSWER_BYTES // 1024} KiB", gateway)
            except _TooSlow:
                return _Reply(None, "answer too slow", gateway)
            except requests.RequestException as exc:
                if time.monotonic() >= deadline:
                    return _Reply(None, "answer too slow", gateway)
                return _Reply(None, _after_connect(exc), gateway)
        # A whole answer read: its connection went back to the pool, for the next request.
        self._last_answer = time.monotonic()
        try:
            answer = parse_answer(raw)
        except AnswerUnreadable as exc:
            return _Reply(None, str(exc), gateway)
        return _Reply(answer, None, gateway)

    def _route(self, gateway: str) -> _Route:
        """What every request to `gateway` shares, worked out once: the request prepared up to
        its body (URL, headers), and the trust store, which do not change while the kiosk runs.
        Its own session reads nothing from the environment (trust_env off). Preparing each
        request whole costs more than signing it."""
        url = _url(gateway)
        settings = self._session.merge_environment_settings(url, {}, None, self._verify, None)
        headers = {"Content-Type": f"application/x-www-form-urlencoded; charset={INPUT_CHARSET}"}
        request = self._session.prepare_request(requests.Request("POST", url, headers=headers))
        route = _Route(request, settings["proxies"], settings["verify"], settings["cert"])
        self._routes[gateway] = route
        return route

    def _forget_connections(self) -> None:
        """Close the kept-alive connections: the next request makes a new one."""
        for adapter in self._session.adapters.values():
            adapter.close()

    # -- judging answers --------------------------------------------------------------------

    def _checked(self, reply: _Reply, expect: Mapping[str, str]) -> _Checked:
        """Whether the answer can be believed at all: a sound signature, and no echoed field
        that differs from the request. A gateway rejection (`is_success=F`) is unsigned by
        design and is passed on, unverified, for the caller to call REJECTED."""
        answer = reply.answer
        if answer is None:
            return _Checked(None, False, reply.unknown or "no answer")
        if not answer.is_success:
            return _Checked(answer, False, "")
        if not answer.has_response:
            return _Checked(None, False, "answer has no response")
        ours = self.settings.signature.sign_type
        if answer.sign_type is not None and answer.sign_type != ours.value:
            why = f"answer sign_type {answer.sign_type[:10]}, expected {ours.value}"
            return _Checked(None, False, why)
        if answer.sign is None:
            return _Checked(None, False, "answer is not signed")
        if not verify_answer(answer, self.settings.signature):
            return _Checked(None, False, "bad signature")
        mismatch = _mismatch(answer.fields, expect)
        if mismatch is not None:
            return _Checked(None, True, f"{mismatch} differs")
        return _Checked(answer, True, "")

    def _pay_result(self, reply: _Reply, params: Mapping[str, str]) -> PayResult:
        checked = self._checked(reply, params)
        answer = checked.answer
        if answer is None:
            return PayResult(Outcome.UNKNOWN, None, None, checked.why, checked.verified)
        if not answer.is_success:
            outcome, error, detail = _rejection(answer)
            return PayResult(outcome, error, None, detail)
        fields = answer.fields
        code = fields.get("result_code", "")
        error, raw = normalise_error(fields.get("error"))
        missing = _missing(fields, REQUIRED_ECHOES["pay"])
        # Alipay's trade id only from an answer that names this very payment.
        trans_id = None if missing else fields.get("alipay_trans_id") or None
        if error == "SYSTEM_ERROR":
            return PayResult(Outcome.UNKNOWN, error, trans_id, _said(code, error), True)
        if code == "SUCCESS":
            if missing:
                return PayResult(Outcome.UNKNOWN, error, None, f"SUCCESS without {missing}", True)
            # A query's answer carries a trade status, a pay answer none: a replayed query
            # answer of a trade still waiting for the buyer is not a payment.
            status = fields.get("alipay_trans_status")
            if status is not None and status not in PAID_STATUSES:
                detail = _said("SUCCESS with trade status", status[:30])
                return PayResult(Outcome.UNKNOWN, error, trans_id, detail, True)
            return PayResult(Outcome.SUCCESS, None, trans_id, "SUCCESS", True)
        if code == "FAILED":
            detail = _said("FAILED", error, raw)
            if missing:
                return PayResult(Outcome.REJECTED, error, None, f"{detail} without {missing}", True)
            return PayResult(Outcome.FAILED, error, trans_id, detail, True)
        if code == "UNKNOW":
            return PayResult(Outcome.UNKNOWN, error, trans_id, "UNKNOW", True)
        return PayResult(Outcome.UNKNOWN, error, trans_id, _odd_code(code), True)

    def _query_result(
        self, reply: _Reply, expect: Mapping[str, str], required: tuple[str, ...]
    ) -> QueryResult:
        checked = self._checked(reply, expect)
        answer = checked.answer
        if answer is None:
            return QueryResult(Outcome.UNKNOWN, None, None, None, checked.why, checked.verified)
        if not answer.is_success:
            outcome, error, detail = _rejection(answer)
            return QueryResult(outcome, None, error, None, detail)
        fields = answer.fields
        code = fields.get("result_code", "")
        error, raw = normalise_error(fields.get("error"))
        missing = _missing(fields, required)
        trans_id = None if missing else fields.get("alipay_trans_id") or None
        if error == "SYSTEM_ERROR":
            return QueryResult(Outcome.UNKNOWN, None, error, trans_id, _said(code, error), True)
        if code == "SUCCESS":
            status_text = fields.get("alipay_trans_status", "")
            try:
                status = TradeStatus(status_text)
            except ValueError:
                detail = _said("trade status", status_text[:30] or "missing")
                return QueryResult(Outcome.UNKNOWN, None, error, trans_id, detail, True)
            if missing:
                detail = f"{status.value} without {missing}"
                return QueryResult(Outcome.UNKNOWN, None, error, None, detail, True)
            return QueryResult(Outcome.SUCCESS, status, None, trans_id, status.value, True)
        if code == "FAIL":
            detail = _said("FAIL", error, raw)
            # "No such trade" cannot name an amount: the trade's id is all it can echo.
            missing = _missing(fields, REQUIRED_ECHOES["query"])
            if missing:
                detail = f"{detail} without {missing}"
                return QueryResult(Outcome.REJECTED, None, error, None, detail, True)
            trans_id = fields.get("alipay_trans_id") or None
            return QueryResult(Outcome.FAILED, None, error, trans_id, detail, True)
        return QueryResult(Outcome.UNKNOWN, None, error, trans_id, _odd_code(code), True)

    def _cancel_result(self, reply: _Reply, params: Mapping[str, str]) -> CancelResult:
        # A cancel answer names the trade as out_trade_no (which it must), sometimes also as
        # partner_trans_id, and Alipay's id as trade_no or alipay_trans_id: all must agree.
        expect = dict(params, partner_trans_id=params["out_trade_no"])
        if "trade_no" in params:
            expect["alipay_trans_id"] = params["trade_no"]
        checked = self._checked(reply, expect)
        answer = checked.answer
        if answer is None:
            return CancelResult(Outcome.UNKNOWN, None, None, checked.why, checked.verified)
        if not answer.is_success:
            outcome, error, detail = _rejection(answer)
            return CancelResult(outcome, None, error, detail)
        fields = answer.fields
        code = fields.get("result_code", "")
        error, raw = normalise_error(fields.get("detail_error_code") or fields.get("error"))
        missing = _missing(fields, REQUIRED_ECHOES["cancel"])
        # retry_flag is believed only from an answer that names this cancel.
        retry = None if missing else {"Y": True, "N": False}.get(fields.get("retry_flag", ""))
        if code == "SUCCESS":
            if missing:
                detail = f"SUCCESS without {missing}"
                return CancelResult(Outcome.UNKNOWN, None, error, detail, True)
            return CancelResult(Outcome.SUCCESS, retry, None, "SUCCESS", True)
        if code == "FAIL" and error != "SYSTEM_ERROR":
            detail = _said("FAIL", error, raw)
            if missing:
                detail = f"{detail} without {missing}"
                return CancelResult(Outcome.REJECTED, None, error, detail, True)
            return CancelResult(Outcome.FAILED, retry, error, detail, True)
        if code in ("FAIL", "UNKNOWN"):
            return CancelResult(Outcome.UNKNOWN, retry, error, _said(code, error, raw), True)
        return CancelResult(Outcome.UNKNOWN, retry, error, _odd_code(code), True)

    def _refund_result(self, reply: _Reply, params: Mapping[str, str]) -> RefundResult:
        checked = self._checked(reply, params)
        answer = checked.answer
        if answer is None:
            return RefundResult(Outcome.UNKNOWN, None, checked.why, checked.verified)
        if not answer.is_success:
            outcome, error, detail = _rejection(answer)
            return RefundResult(outcome, error, detail)
        fields = answer.fields
        code = fields.get("result_code", "")
        error, raw = normalise_error(fields.get("error"))
        missing = _missing(fields, REQUIRED_ECHOES["refund"])
        if error == "SYSTEM_ERROR":
            return RefundResult(Outcome.UNKNOWN, error, _said(code, error), True)
        if code == "SUCCESS":
            if missing:
                return RefundResult(Outcome.UNKNOWN, error, f"SUCCESS without {missing}", True)
            return RefundResult(Outcome.SUCCESS, None, "SUCCESS", True)
        if code == "FAILED":
            detail = _said("FAILED", error, raw)
            if missing:
                return RefundResult(Outcome.REJECTED, error, f"{detail} without {missing}", True)
            return RefundResult(Outcome.FAILED, error, detail, True)
        if code == "UNKNOW":
            return RefundResult(Outcome.UNKNOWN, error, "UNKNOW", True)
        return RefundResult(Outcome.UNKNOWN, error, _odd_code(code), True)

    def _exchange(self, service: str, partner_trans_id: str, call: Callable[[], Result]) -> Result:
        """Send one call and judge its answer; log the outcome (never the request itself)."""
        started = time.monotonic()
        result = call()
        # No detail carries a payment code an answer may have echoed (SPEC rule 6).
        result = dataclasses.replace(result, detail=mask_codes(result.detail))
        self._log(service, partner_trans_id, result, started)
        return result

    def _log(
        self,
        service: str,
        partner_trans_id: str,
        result: PayResult | QueryResult | CancelResult | RefundResult,
        started: float,
    ) -> None:
        outcome = result.outcome
        event(
            log,
            "alipay.call",
            logging.WARNING if outcome in (Outcome.UNKNOWN, Outcome.REJECTED) else logging.INFO,
            service=service,
            partner_trans_id=partner_trans_id,
            outcome=outcome.value,
            verified=result.verified,
            detail=result.detail,
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )


# Fields an answer may echo, and the request parameter each must equal when present.
_ECHOED = {
    "partner_trans_id": "partner_trans_id",
    "out_trade_no": "out_trade_no",
    "partner_refund_id": "partner_refund_id",
    "currency": "currency",
    "alipay_trans_id": "alipay_trans_id",
    "trade_no": "trade_no",
}
_AMOUNTS = {"trans_amount": "trans_amount", "refund_amount": "refund_amount"}


def _mismatch(fields: Mapping[str, str], expect: Mapping[str, str]) -> str | None:
    """The first echoed field that differs from what was asked, or None."""
    for name, param in _ECHOED.items():
        if name in fields and param in expect and fields[name] != expect[param]:
            return name
    for name, param in _AMOUNTS.items():
        if name in fields and param in expect and not _same_amount(fields[name], expect[param]):
            return name
    return None


def _same_amount(answered: str, asked: str) -> bool:
    try:
        return Decimal(answered) == Decimal(asked)
    except InvalidOperation:
        return False


def _missing(fields: Mapping[str, str], required: tuple[str, ...]) -> str | None:
    """The first required echo the answer leaves out (or leaves empty), or None."""
    return next((name for name in required if not fields.get(name)), None)


def normalise_error(text: str | None) -> tuple[str | None, str]:
    """An error code as it entered from an answer: (code, shown). A well-formed code is kept
    and `shown` is empty; anything else becomes UNRECOGNISED_ERROR, and `shown` holds the raw
    text, made printable and cut short, in brackets, for a `detail` and nothing else."""
    if not text:
        return None, ""
    masked = mask_codes(text)  # an answer echoing the buyer's code keeps only its last 4
    if ERROR_CODE_RE.fullmatch(text) and masked == text:
        return text, ""
    return UNRECOGNISED_ERROR, "(" + _printable(masked)[:_RAW_ERROR_CHARS] + ")"


def _printable(text: str) -> str:
    """Printable ASCII only: control characters and other scripts become escapes."""
    return "".join(
        char if " " <= char <= "~" else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _rejection(answer: Answer) -> tuple[Outcome, str | None, str]:
    """A gateway rejection (`is_success=F`, unsigned by design) proves nothing about the trade:
    REJECTED with its code, or UNKNOWN for SYSTEM_ERROR (the trade may exist)."""
    error, raw = normalise_error(answer.error)
    outcome = Outcome.UNKNOWN if error == "SYSTEM_ERROR" else Outcome.REJECTED
    return outcome, error, _said("rejected", error or "without a code", raw)


def _said(*parts: str | None) -> str:
    """A detail from the parts an answer gave: blanks left out, each printable and short."""
    return " ".join(_printable(part)[:64] for part in parts if part)


def _odd_code(code: str) -> str:
    return (
        f"result_code '{_printable(code)[:20]}' not known" if code else "answer has no result_code"
    )


def system_trust_store() -> str | bool:
    """The system's CA bundle as OpenSSL was built to find it (Debian: /usr/lib/ssl/cert.pem,
    which is /etc/ssl/certs/ca-certificates.crt); SSL_CERT_FILE and the like are not asked.
    True (requests' own bundle) where the system has none."""
    default = ssl.get_default_verify_paths().openssl_cafile
    return default if default and os.path.isfile(default) else True


def _url(gateway: str) -> str:
    """The URL a request goes to: the gateway's, with the charset the signature covers."""
    return gateway + ("&" if "?" in gateway else "?") + f"_input_charset={INPUT_CHARSET}"


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


@dataclass(frozen=True)
class _Route:
    request: requests.PreparedRequest  # URL and headers; each request adds its body
    proxies: MutableMapping[str, str]
    verify: bool | str | None
    cert: str | tuple[str, str] | None


class _NotSent(Exception):
    """The request never reached this gateway."""


class _TooLong(Exception):
    pass


class _TooSlow(Exception):
    pass


@dataclass
class _Signing:
    order: PayOrder  # its repr hides the buyer's code
    done: threading.Event = field(default_factory=threading.Event)
    params: dict[str, str] | None = field(default=None, repr=False)  # the code, signed
    error: BaseException | None = None


# How long a sale waits for the signing thread before it signs in place. A sign takes
# milliseconds; a thread that has not answered by then is stuck, and the sale must not be.
SIGN_AHEAD_WAIT_S = 5.0


class _SigningAhead:
    """Signs a pay request on a thread of its own while the sale's thread waits for the
    journal's fsync, which lets the interpreter go (the RSA operation does not: the sale's
    thread resumes once both are done); the request still leaves only after its commit.
    One order at a time, from one caller thread; the thread starts with its first order."""

    def __init__(self, sign: Callable[[PayOrder], dict[str, str]]) -> None:
        self._sign = sign
        self._orders: queue.SimpleQueue[_Signing | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: _Signing | None = None

    def start(self, order: PayOrder) -> None:
        """Hand `order` to the thread. Never raises: without a thread (none could be started:
        a task limit, no memory) the order is signed in place, as `take` finds nothing."""
        self._pending = None
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="alipay-signer", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:
                event(log, "alipay.signer_not_started", logging.WARNING, error=str(exc))
                return
            self._thread = thread
        self._pending = signing = _Signing(order)
        self._orders.put(signing)

    def take(self, order: PayOrder) -> dict[str, str] | None:
        """The signed parameters of `order`, once signed; None if it was not handed over here
        (or the thread took too long: the caller signs in place, as if it never was)."""
        signing, self._pending = self._pending, None
        if signing is None or signing.order != order:
            return None
        if not signing.done.wait(SIGN_AHEAD_WAIT_S):  # milliseconds, unless the thread is stuck
            event(log, "alipay.signer_stuck", logging.ERROR, waited_s=SIGN_AHEAD_WAIT_S)
            self._thread = None  # the next order starts a new one
            return None
        if signing.error is not None:
            raise signing.error
        return signing.params

    def close(self) -> None:
        """End the thread once it has signed what it holds (a later order starts one)."""
        self._pending = None
        if self._thread is not None:
            self._orders.put(None)
            self._thread = None

    def _run(self) -> None:
        while True:
            signing = self._orders.get()
            if signing is None:
                return
            try:
                signing.params = self._sign(signing.order)
            except BaseException as exc:  # the caller's to raise, as if it had signed itself
                signing.error = exc
            signing.done.set()
            del signing  # the code it holds is not kept here until the next sale


class _AnswerGuard:
    """Cuts an answer still being read at its deadline, from a thread of its own. One thread
    per client, started with its first exchange and asleep until the deadline it watches, so
    an exchange costs no thread start and an idle client no wake-up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watched: tuple[float, requests.Response] | None = None
        self._wakes_at: float | None = None  # when the thread looks next; None: when told
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, response: requests.Response, deadline: float) -> Iterator[None]:
        with self._cond:
            self._watched = (deadline, response)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="alipay-answer-guard", daemon=True
                )
                self._thread.start()
            elif self._wakes_at is None or self._wakes_at > deadline:
                self._cond.notify()
            # else: it wakes at an earlier deadline, and then sees this one.
        try:
            yield
        finally:
            with self._cond:
                self._watched = None

    def close(self) -> None:
        """End the thread (a later exchange starts a new one)."""
        with self._cond:
            self._thread = None
            self._watched = None
            self._cond.notify()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                watched = self._watched
                if watched is None:
                    self._wakes_at = None
                    self._cond.wait()
                    continue
                deadline, response = watched
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._cond.wait(remaining)
                    continue
                self._watched = None
                _cut(response)


def _cut(response: requests.Response) -> None:
    """Close a connection whose answer is past its deadline (from the guard's thread)."""
    shutdown = getattr(response.raw, "shutdown", None)
    with contextlib.suppress(Exception):
        if shutdown is not None:
            shutdown()  # urllib3 2.3+: unblocks a read in another thread
        else:
            response.close()


def _read_capped(response: requests.Response, deadline: float) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES, read before `deadline` (monotonic)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_ANSWER_BYTES:
        raise _TooLong
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=8192):
        if time.monotonic() >= deadline:
            raise _TooSlow
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooLong
        chunks.append(chunk)
    return b"".join(chunks)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (args, urllib3's `reason`, cause, context)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [*current.args, getattr(current, "reason", None)]
        linked += [current.__cause__, current.__context__]
        todo.extend(item for item in linked if isinstance(item, BaseException))


def _never_sent(exc: requests.RequestException) -> str | None:
    """Why the request provably never left for the gateway, or None if it may have."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed" if _in_handshake(exc) else None
    if isinstance(exc, requests.ConnectionError):
        causes = list(_causes(exc))
        if any(isinstance(c, NameResolutionError) for c in causes):
            return "DNS failure"
        if any(isinstance(c, NewConnectionError) for c in causes):
            if any(isinstance(c, ConnectionRefusedError) for c in causes):
                return "connection refused"
            return "cannot connect"
    return None


def _in_handshake(exc: BaseException) -> bool:
    """True when a TLS error came from the handshake, before any request byte was sent."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError):
            return True
        if isinstance(cause, ssl.SSLError) and _raised_in(cause.__traceback__, "do_handshake"):
            return True
    return False


def _raised_in(tb: types.TracebackType | None, function: str) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _after_connect(exc: requests.RequestException) -> str:
    """A short reason for a failure after the connection was made (the outcome is unknown)."""
    causes = list(_causes(exc))
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(
        isinstance(c, ReadTimeoutError | TimeoutError) for c in causes
    ):
        return "read timeout"
    if any(isinstance(c, RemoteDisconnected) for c in causes):
        return "connection closed without an answer"
    if any(isinstance(c, ConnectionResetError) for c in causes):
        return "connection reset"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "answer cut off"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "answer does not decode"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error after connecting"
    if isinstance(exc, requests.ConnectionError):
        return "connection aborted"
    return f"request failed ({type(exc).__name__})"


__all__ = [
    "ERROR_CODE_RE",
    "REQUIRED_ECHOES",
    "UNRECOGNISED_ERROR",
    "AlipayClient",
    "CancelResult",
    "GatewaySettings",
    "Outcome",
    "PayOrder",
    "PayResult",
    "QueryResult",
    "RefundResult",
    "SignType",
    "TradeStatus",
    "normalise_error",
]
