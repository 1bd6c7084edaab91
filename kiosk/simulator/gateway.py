"""A faithful Alipay MAPI gateway on loopback, for tests, `kiosk demo` and technicians' rigs.

It verifies every request's signature, keeps a ledger of what it charged and gave back, signs
its XML answers, and can misbehave on purpose: inject a `FaultPlan`, or scan a magic payment
code whose last 4 digits choose a behaviour when no fault is injected:

    0000-0999  pay at once                    3001  slow answer (30 s) after charging
    1001       buyer confirms after 2 s       3002  connection dropped after charging
    1002       buyer never confirms           3003  SYSTEM_ERROR, charged
    2NNN       decline with seed code NNN     3004  SYSTEM_ERROR, not charged
               (faults.SEED_ERROR_CODES,      3005  HTTP 500, charged
               1-based; 2022 = BUYER_         3006  forged answer signature
               BALANCE_NOT_ENOUGH)            3007  answer in GBK
    4001       pays; its cancels fail         3008  answer truncated after charging
               (window closed: refund)        3009  HTTP 500, not charged

Anything else pays at once. A rig on the same port may use `POST /_sim/fault` (a JSON
`FaultPlan`, optional `partner_trans_id`), `POST /_sim/clear`, `POST /_sim/offline` (seconds),
`GET /_sim/ledger` and `GET /_sim/requests`, from loopback only. See docs/simulator.md.
"""

from __future__ import annotations

import codecs
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from kiosk.alipay.signing import (
    Md5Signature,
    RsaSignature,
    Signature,
    SignType,
    presign_string,
)
from kiosk.log import event, mask_code
from kiosk.simulator import services
from kiosk.simulator.faults import (
    DEFAULT_UNSIGNED_ERROR,
    SLOW_DEFAULT_S,
    Fault,
    FaultBook,
    FaultPlan,
)
from kiosk.simulator.ledger import Ledger, Trade

log = logging.getLogger(__name__)

SERVICES = {
    "alipay.acquire.overseas.spot.pay": "pay",
    "alipay.acquire.overseas.query": "query",
    "alipay.acquire.cancel": "cancel",
    "alipay.acquire.overseas.spot.refund": "refund",
}
GATEWAY_PATH = "/gateway.do"
GBK_TEXT = "支付宝用户"  # Chinese text for the GBK fault: a buyer's nickname
HTTP_500_BODY = b"<html><body><h1>500 Internal Server Error</h1></body></html>"


@dataclass
class MerchantAccount:
    """One partner the simulator knows, with the keys its requests are verified with."""

    partner: str
    md5_key: bytes | None = None
    merchant_public_key: RSAPublicKey | None = None  # verifies RSA and RSA2 requests


@dataclass(frozen=True)
class SeenRequest:
    """A request as the gateway saw it; the buyer's code is masked."""

    number: int
    service: str  # pay | query | cancel | refund, or the raw `service` value if unknown
    params: dict[str, str]
    verified: bool  # the signature was checked and good
    time: float  # time.monotonic() when it arrived
    gateway_error: str | None = None  # is_success=F code, if rejected at the gateway


@dataclass(frozen=True)
class SentAnswer:
    """What the gateway answered to one request (`number` as in `requests_seen`)."""

    number: int
    service: str
    trade: str | None  # the partner_trans_id the request was about
    about: str | None  # the trade the answer's fields describe (another one under a replay)
    signed: bool  # the answer carries a signature that verifies over its fields
    fields: dict[str, str]  # <response><alipay>, as sent
    error: str | None = None  # the <error> of an is_success=F answer
    fault: str | None = None


# Answers that carry no good signature over their fields.
_UNSIGNED_FAULTS = frozenset(
    {
        Fault.HTTP_500,
        Fault.DROP_AFTER_CHARGE,
        Fault.FORGED_SIGNATURE,
        Fault.TRUNCATED,
        Fault.UNSIGNED_REJECT,
    }
)


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/xml; charset=UTF-8"
    delay_s: float = 0.0  # answer only after this long
    drop: bool = False  # close the connection without an answer
    truncate: bool = False  # send only the first half of the body


class GatewaySimulator:
    """The simulated Alipay gateway: `start()`, point a client at `url`, read `ledger`."""

    def __init__(
        self,
        accounts: Iterable[MerchantAccount],
        alipay_private_key: RSAPrivateKey,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        close_unpaid_after_s: float = 180.0,
    ) -> None:
        self._accounts = {account.partner: account for account in accounts}
        self._alipay_private_key = alipay_private_key
        self.alipay_public_key: RSAPublicKey = alipay_private_key.public_key()
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self.close_unpaid_after_s = close_unpaid_after_s
        self.ledger = Ledger()
        self._faults = FaultBook()
        self._seen: list[SeenRequest] = []
        self._seen_lock = threading.Lock()
        self._answers: list[SentAnswer] = []
        # Plans waiting for the first pay that carries a payment code (by the code's hash).
        self._code_plans: dict[str, list[FaultPlan]] = {}
        self._life = threading.Lock()  # start/stop/offline/online, one at a time
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Set when the server stops listening: held answers give up and drop their connection.
        self._interrupt = threading.Event()
        self._stopped = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._connections_opened = 0

    # Life ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self._port}{GATEWAY_PATH}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        with self._life:
            self._stopped.clear()
            self._listen()
        event(log, "simulator.started", url=self.url)

    def stop(self) -> None:
        """Stop serving; held (slow) answers are dropped at once. Safe to call twice."""
        self._stopped.set()
        with self._life:
            self._unlisten()

    def go_offline(self) -> None:
        """Stop listening: new connections are refused, open ones are cut. The port is kept."""
        with self._life:
            self._unlisten()
        event(log, "simulator.offline", port=self._port)

    def go_online(self) -> None:
        """Listen again on the same port."""
        with self._life:
            if not self._stopped.is_set():
                self._listen()
        event(log, "simulator.online", port=self._port)

    def __enter__(self) -> GatewaySimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        if self._server is not None:
            return
        server = _Server((self._host, self._port), self)
        if self._ssl_context is not None:
            # The handshake happens in the handler's thread, so a slow client can't stall accept.
            server.socket = self._ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._port = server.server_address[1]
        self._interrupt = threading.Event()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"alipay-simulator-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _unlisten(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        self._interrupt.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            _cut(connection)

    @property
    def connections_opened(self) -> int:
        """How many connections clients have opened to the gateway so far (a kept-alive
        client opens one for many requests)."""
        with self._connections_lock:
            return self._connections_opened

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
                self._connections_opened += 1
            else:
                self._connections.discard(connection)

    # Faults and records -------------------------------------------------------------------

    def inject(self, plan: FaultPlan, partner_trans_id: str | None = None) -> None:
        """With `partner_trans_id`, the plan applies to requests for that trade; without, to
        the next matching requests."""
        self._faults.add(plan, partner_trans_id)
        event(
            log,
            "simulator.fault",
            fault=str(plan.fault),
            service=plan.service,
            ref=partner_trans_id,
            times=plan.times,
        )

    def inject_for_code(self, code: str, plan: FaultPlan) -> None:
        """Arm `plan` for the trade that payment code `code` starts: the first pay carrying
        the code binds it to that pay's `partner_trans_id`, as `inject(plan, partner_trans_id)`
        would. For rigs that cannot know the kiosk's trade id before the scan."""
        with self._seen_lock:
            self._code_plans.setdefault(services.code_hash(code), []).append(plan)

    def _arm_code_plans(self, params: dict[str, str]) -> None:
        code = params.get("buyer_identity_code", "")
        trans_id = params.get("partner_trans_id", "")
        if not code or not trans_id:
            return
        with self._seen_lock:
            plans = self._code_plans.pop(services.code_hash(code), [])
        for plan in plans:
            self.inject(plan, trans_id)

    def clear_faults(self) -> None:
        self._faults.clear()
        with self._seen_lock:
            self._code_plans.clear()

    def shift_clock(self, seconds: float) -> None:
        """Move the simulated Alipay's clocks by `seconds` (forward, to play a kiosk that comes
        back a day later): unpaid trades past their time close, the Beijing-day cancel window
        of older trades shuts, pay times and trade ids carry the new date."""
        self.ledger.shift_clock(seconds)
        event(log, "simulator.clock", shift_s=seconds, offset_s=self.ledger.clock_offset_s)

    @property
    def requests_seen(self) -> list[SeenRequest]:
        with self._seen_lock:
            return list(self._seen)

    @property
    def answers_sent(self) -> list[SentAnswer]:
        """Every answer, with the trade it described and whether it was signed."""
        with self._seen_lock:
            return list(self._answers)

    def _note_answer(self, answer: SentAnswer) -> None:
        with self._seen_lock:
            self._answers.append(answer)

    def _record(
        self, service: str, params: dict[str, str], verified: bool, error: str | None
    ) -> SeenRequest:
        shown = dict(params)
        if "buyer_identity_code" in shown:
            shown["buyer_identity_code"] = mask_code(shown["buyer_identity_code"]) or ""
        with self._seen_lock:
            seen = SeenRequest(
                len(self._seen) + 1, service, shown, verified, time.monotonic(), error
            )
            self._seen.append(seen)
        return seen

    # The gateway --------------------------------------------------------------------------

    def _serve_gateway(self, query: str, body: bytes) -> _Reply:
        charset = _input_charset(query, body)
        params = dict(parse_qsl(query, keep_blank_values=True, encoding=charset, errors="replace"))
        params.update(
            parse_qsl(
                body.decode(charset, errors="replace"),
                keep_blank_values=True,
                encoding=charset,
                errors="replace",
            )
        )
        raw_service = params.get("service", "")
        service = SERVICES.get(raw_service, raw_service)
        account = self._accounts.get(params.get("partner", ""))
        error: str | None = None
        signer: Signature | None = None
        answer_signer: Signature | None = None
        if account is None:
            error = "ILLEGAL_PARTNER"
        elif raw_service not in SERVICES:
            error = "ILLEGAL_EXTERFACE"
        elif params.get("sign_type") not in tuple(SignType):
            error = "ILLEGAL_SIGN_TYPE"
        else:
            signer, answer_signer = self._signers(account, SignType(params["sign_type"]))
            if signer is None:
                error = "ILLEGAL_SECURITY_PROFILE"  # no key of that type on file
            elif not signer.verify(presign_string(params), params.get("sign", ""), charset):
                error = "ILLEGAL_SIGN"
        seen = self._record(service, params, error is None, error)
        if error is not None or account is None or answer_signer is None:
            event(log, "simulator.rejected", number=seen.number, service=raw_service, error=error)
            self._note_answer(
                SentAnswer(seen.number, service, None, None, False, {}, error or "ILLEGAL_SIGN")
            )
            return _Reply(body=_gateway_error(error or "ILLEGAL_SIGN"))

        ref = f"{service}#{seen.number}"
        partner = account.partner
        if service == "pay":
            self._arm_code_plans(params)
        trade_id = self._trade_id(service, partner, params)
        plan = self._faults.take(service, trade_id)
        if service == "pay":
            fields, plan = services.pay(
                self.ledger,
                partner,
                params,
                plan,
                ref,
                self.close_unpaid_after_s,
                self._faults.add,
            )
        elif service == "query":
            fields = services.query(self.ledger, partner, params, plan)
        elif service == "cancel":
            fields = services.cancel(self.ledger, partner, params, plan, ref)
        else:
            fields = services.refund(self.ledger, partner, params, plan, ref)
        event(
            log,
            "simulator.answer",
            number=seen.number,
            service=service,
            result=fields.get("result_code"),
            error=fields.get("error"),
            fault=None if plan is None else str(plan.fault),
        )
        fields, about = self._misdirect(service, partner, trade_id, fields, plan)
        fault = None if plan is None else plan.fault
        unsigned_error = None
        if plan is not None and fault is Fault.UNSIGNED_REJECT:
            unsigned_error = plan.error or DEFAULT_UNSIGNED_ERROR
        self._note_answer(
            SentAnswer(
                seen.number,
                service,
                trade_id,
                about,
                fault not in _UNSIGNED_FAULTS,
                {key: value for key, value in fields.items() if value},
                unsigned_error,
                None if fault is None else str(fault),
            )
        )
        return self._answer(params, fields, answer_signer, charset, plan)

    def _misdirect(
        self,
        service: str,
        partner: str,
        trade_id: str | None,
        fields: dict[str, str],
        plan: FaultPlan | None,
    ) -> tuple[dict[str, str], str | None]:
        """The replay faults: put another trade's answer in place of this one, leave fields
        out. Returns the fields to sign and the trade they describe."""
        about = trade_id
        if plan is None:
            return fields, about
        if plan.fault in (Fault.OTHER_TRADE, Fault.CANCEL_ANSWER):
            other = self._other_trade(partner, trade_id)
            if other is not None:
                kind = "cancel" if plan.fault is Fault.CANCEL_ANSWER else service
                fields = services.answer_about(self.ledger, other, kind)
                about = other.partner_trans_id
            elif plan.fault is Fault.CANCEL_ANSWER and trade_id is not None:
                # No other trade yet: this trade's own cancel answer, not that it was cancelled.
                fields = {
                    "result_code": "SUCCESS",
                    "retry_flag": "N",
                    "out_trade_no": trade_id,
                }
        if plan.omit:
            fields = {key: value for key, value in fields.items() if key not in plan.omit}
        return fields, about

    def _other_trade(self, partner: str, trade_id: str | None) -> Trade | None:
        """The newest other trade of this partner, one that holds money if there is one."""
        others = [
            trade
            for trade in self.ledger.trades()
            if trade.partner == partner and trade.partner_trans_id != trade_id
        ]
        paying = [trade for trade in others if trade.holds_money]
        pool = paying or others
        return pool[-1] if pool else None

    def _signers(
        self, account: MerchantAccount, sign_type: SignType
    ) -> tuple[Signature | None, Signature | None]:
        """(verifies the request, signs the answer) for this partner and sign type."""
        if sign_type is SignType.MD5:
            if account.md5_key is None:
                return None, None
            md5 = Md5Signature(account.md5_key)
            return md5, md5
        if account.merchant_public_key is None:
            return None, None
        return (
            RsaSignature(sign_type, public_key=account.merchant_public_key),
            RsaSignature(sign_type, private_key=self._alipay_private_key),
        )

    def _trade_id(self, service: str, partner: str, params: dict[str, str]) -> str | None:
        if service == "cancel":
            return params.get("out_trade_no")
        if service == "query" and params.get("alipay_trans_id"):
            trade = services.find_trade(self.ledger, partner, params)
            return trade.partner_trans_id if trade is not None else None
        return params.get("partner_trans_id")

    def _answer(
        self,
        params: dict[str, str],
        fields: dict[str, str],
        signer: Signature,
        charset: str,
        plan: FaultPlan | None,
    ) -> _Reply:
        fault = None if plan is None else plan.fault
        if plan is not None and fault is Fault.UNSIGNED_REJECT:
            return _Reply(body=_gateway_error(plan.error or DEFAULT_UNSIGNED_ERROR))
        if fault is Fault.HTTP_500:
            return _Reply(status=500, body=HTTP_500_BODY, content_type="text/html")
        if fault is Fault.DROP_AFTER_CHARGE:
            return _Reply(drop=True)
        fields = {key: value for key, value in fields.items() if value}
        encoding = "UTF-8"
        if fault is Fault.GBK:
            encoding = "GBK"
            login = fields.get("alipay_buyer_login_id")
            if login is not None:
                fields["alipay_buyer_login_id"] = GBK_TEXT + login[-4:]
            else:
                fields["memo"] = GBK_TEXT
        presign = presign_string(fields)
        if fault is Fault.FORGED_SIGNATURE:
            # Well-formed but over other text: only verifying catches it.
            presign += "&forged=T"
        sign = signer.sign(presign, charset)
        body = _envelope(params, fields, sign, str(signer.sign_type), encoding)
        return _Reply(
            body=body,
            content_type=f"text/xml; charset={encoding}",
            delay_s=(plan.delay_s if plan.delay_s is not None else SLOW_DEFAULT_S)
            if plan is not None and fault is Fault.SLOW_AFTER_CHARGE
            else 0.0,
            truncate=fault is Fault.TRUNCATED,
        )

    # The control endpoint -----------------------------------------------------------------

    def _serve_control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        try:
            if method == "GET" and path == "/_sim/ledger":
                return 200, self.ledger.to_json()
            if method == "GET" and path == "/_sim/requests":
                return 200, [_seen_json(seen) for seen in self.requests_seen]
            if method == "POST" and path == "/_sim/fault":
                obj = json.loads(body or b"{}")
                if not isinstance(obj, dict):
                    raise ValueError("a FaultPlan is a JSON object")
                plan = FaultPlan.from_json(obj)
                trans_id = obj.get("partner_trans_id")
                self.inject(plan, None if trans_id is None else str(trans_id))
                return 200, {"ok": True}
            if method == "POST" and path == "/_sim/clock":
                obj = json.loads(body or b"{}")
                seconds = float(obj["shift_s"] if isinstance(obj, dict) else obj)
                self.shift_clock(seconds)
                return 200, {"ok": True, "offset_s": self.ledger.clock_offset_s}
            if method == "POST" and path == "/_sim/clear":
                self.clear_faults()
                return 200, {"ok": True}
            if method == "POST" and path == "/_sim/offline":
                obj = json.loads(body or b"0")
                seconds = float(obj["seconds"] if isinstance(obj, dict) else obj)
                if not 0 <= seconds <= 3600:
                    raise ValueError("seconds must be between 0 and 3600")
                return 200, {"ok": True, "offline_s": seconds}
        except (ValueError, KeyError, TypeError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no such control: {method} {path}"}

    def _offline_for(self, seconds: float) -> None:
        self.go_offline()
        if not self._stopped.wait(seconds):
            self.go_online()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: GatewaySimulator) -> None:
        self.simulator = simulator
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that go away (timeouts, TLS refusals) are normal here; no tracebacks.
        log.debug("simulator connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as a real gateway: a client may send request after request
    on one connection. An answer a fault spoils (dropped, cut short, HTTP 500, held) closes
    its connection, so nothing of it is left for the next request to read."""

    server: _Server
    server_version = "AlipayGatewaySimulator/1"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that sends nothing (or keeps a connection idle) frees its thread

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
        # Small answers go out at once, not after Nagle waits for the client's ACK.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.simulator._track(self.request, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.simulator._track(self.request, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator http: " + format, *args)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        simulator = self.server.simulator
        interrupt = simulator._interrupt
        url = urlsplit(self.path)
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body not framed by length is never read ahead
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if url.path == GATEWAY_PATH:
            self._send(simulator._serve_gateway(url.query, body), interrupt)
        elif url.path.startswith("/_sim/"):
            if not ipaddress.ip_address(self.client_address[0].split("%")[0]).is_loopback:
                self._send_json(403, {"error": "the control endpoint is for loopback only"})
                return
            status, answer = simulator._serve_control(method, url.path, body)
            self._send_json(status, answer)
            if status == 200 and url.path == "/_sim/offline":
                # This connection is answered; now take the whole gateway off the network.
                simulator._track(self.request, False)
                seconds = float(answer["offline_s"])
                threading.Thread(
                    target=simulator._offline_for, args=(seconds,), daemon=True
                ).start()
        else:
            self._send_json(404, {"error": f"no such path: {url.path}"})

    def _send(self, reply: _Reply, interrupt: threading.Event) -> None:
        if reply.delay_s > 0 and interrupt.wait(reply.delay_s):
            reply = _Reply(drop=True)  # stopped or offline while holding the answer
        if reply.drop:
            self.close_connection = True
            _cut(self.request)
            return
        body = reply.body[: len(reply.body) // 2] if reply.truncate else reply.body
        # A spoiled answer ends its connection; a sound one leaves it open for the next.
        spoiled = reply.truncate or reply.delay_s > 0 or reply.status != 200
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(body)))
            if spoiled:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            spoiled = True  # the client gave up (timed out) before the answer: what slow is for
        if spoiled:
            self.close_connection = True

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


def _cut(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _input_charset(query: str, body: bytes) -> str:
    """The request's `_input_charset` (query string or body); UTF-8 when absent or unknown."""
    for text in (query, body.decode("latin-1")):
        for key, value in parse_qsl(text, keep_blank_values=True, encoding="latin-1"):
            if key == "_input_charset" and value:
                try:
                    return codecs.lookup(value).name
                except LookupError:
                    return "utf-8"
    return "utf-8"


def _gateway_error(error: str) -> bytes:
    root = ET.Element("alipay")
    ET.SubElement(root, "is_success").text = "F"
    ET.SubElement(root, "error").text = error
    return _serialize(root, "UTF-8")


def _envelope(
    params: dict[str, str], fields: dict[str, str], sign: str, sign_type: str, encoding: str
) -> bytes:
    root = ET.Element("alipay")
    ET.SubElement(root, "is_success").text = "T"
    request = ET.SubElement(root, "request")
    for key, value in sorted(params.items()):
        if key == "sign":
            continue
        if key == "buyer_identity_code":
            value = mask_code(value) or ""
        ET.SubElement(request, "param", name=key).text = value
    inner = ET.SubElement(ET.SubElement(root, "response"), "alipay")
    for key, value in fields.items():
        ET.SubElement(inner, key).text = value
    ET.SubElement(root, "sign").text = sign
    ET.SubElement(root, "sign_type").text = sign_type
    return _serialize(root, encoding)


def _serialize(root: ET.Element, encoding: str) -> bytes:
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>\n'
    text = declaration + ET.tostring(root, encoding="unicode")
    return text.encode(encoding, errors="xmlcharrefreplace")


def _seen_json(seen: SeenRequest) -> dict[str, Any]:
    return {
        "number": seen.number,
        "service": seen.service,
        "params": seen.params,
        "verified": seen.verified,
        "gateway_error": seen.gateway_error,
    }
