"""Benchmark: one paid sale through `PaymentFlow.sell` (RSA2, simulator on loopback) against a
floor doing only the unavoidable work: one sign, one verify, the journal's fsync'd commits and
one loopback HTTP round trip. Prints p50/p99/mean, the ratio, and where the time goes."""

from __future__ import annotations

import base64
import http.client
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from benchlib import (
    PARTNER,
    PRICE,
    bench_main,
    count_option,
    fmt_ms,
    fmt_summary,
    gateway_settings,
    named_key,
    pay_order,
    payment_flow,
    quiet_json_logging,
    simulator_running,
    summary,
    time_calls,
    unique_code,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from kiosk.alipay.client import AlipayClient
from kiosk.alipay.signing import RsaSignature, Signature, SignType, presign_string
from kiosk.journal import Journal
from kiosk.payment import PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.simulator import GatewaySimulator

ROUNDS = 4  # sales and floor alternate in rounds, so drift of the machine hits both alike
WARMUP = 10


# -- the measured code ---------------------------------------------------------------------


class Breakdown:
    """Seconds spent per step, summed over the instrumented sales."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    @contextmanager
    def timing(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.total[step] += time.perf_counter() - started
            self.count[step] += 1


class TimedSignature:
    """A Signature that books its time to `sign` and `verify`."""

    def __init__(self, inner: Signature, book: Breakdown) -> None:
        self._inner = inner
        self._book = book
        self.sign_type = inner.sign_type

    def sign(self, text: str, encoding: str = "utf-8") -> str:
        with self._book.timing("sign"):
            return self._inner.sign(text, encoding)

    def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool:
        with self._book.timing("verify"):
            return self._inner.verify(text, signature, encoding)


class TimedJournal(Journal):
    """A Journal that books each durable write to `journal`."""

    book: Breakdown

    def open_transaction(self, **kwargs: Any) -> Any:
        with self.book.timing("journal"):
            return super().open_transaction(**kwargs)

    def before_request(self, *args: Any, **kwargs: Any) -> Any:
        with self.book.timing("journal"):
            return super().before_request(*args, **kwargs)

    def after_request(self, *args: Any, **kwargs: Any) -> None:
        with self.book.timing("journal"):
            super().after_request(*args, **kwargs)

    def update(self, *args: Any, **kwargs: Any) -> Any:
        with self.book.timing("journal"):
            return super().update(*args, **kwargs)


class TimedClient(AlipayClient):
    """An AlipayClient that books the HTTP exchange (connect, send, read the answer)."""

    book: Breakdown

    def _send(self, gateway: str, body: bytes, read_timeout_s: float) -> Any:
        with self.book.timing("http"):
            return super()._send(gateway, body, read_timeout_s)


def make_flow(sim: GatewaySimulator, state_dir: Path, book: Breakdown | None = None) -> PaymentFlow:
    if book is None:
        return payment_flow(sim, Journal(state_dir))
    settings = gateway_settings(sim)
    client = TimedClient(replace(settings, signature=TimedSignature(settings.signature, book)))
    client.book = book
    journal = TimedJournal(state_dir)
    journal.book = book
    return payment_flow(sim, journal, client)


class Codes:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> PaymentCode:
        self.n += 1
        return PaymentCode.parse(unique_code(self.n))


def sell_once(flow: PaymentFlow, codes: Codes) -> float:
    code = codes.next()
    started = time.perf_counter()
    sale = flow.sell(code, PRICE, "coffee")
    elapsed = time.perf_counter() - started
    if sale.result is not SaleResult.VENDED:
        raise RuntimeError(f"a paid sale ended {sale.result} ({sale.reason})")
    return elapsed


def commits_per_sale(flow: PaymentFlow, codes: Codes) -> int:
    """How many COMMITs (each an fsync under synchronous=FULL) one paid sale makes."""
    seen: list[str] = []
    conn = flow.journal._conn
    conn.set_trace_callback(seen.append)
    try:
        sell_once(flow, codes)
    finally:
        conn.set_trace_callback(None)
    return sum(1 for sql in seen if sql.strip().upper() == "COMMIT")


# -- the floor -----------------------------------------------------------------------------

ANSWER = b"<?xml version='1.0' encoding='UTF-8'?><alipay><is_success>T</is_success></alipay>"


class _Trivial(BaseHTTPRequestHandler):
    """Reads the request and answers a fixed body, closing like the simulator (HTTP/1.0)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/xml; charset=UTF-8")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Floor:
    """The unavoidable work of one paid sale, step by step."""

    def __init__(self, tmp: Path, commits: int, presign: str, answer_text: str) -> None:
        self.commits = commits
        self.private = named_key("merchant")
        alipay = named_key("alipay")
        self.public = alipay.public_key()
        self.presign = presign.encode()
        self.answer_text = answer_text.encode()
        self.answer_sig = alipay.sign(self.answer_text, padding.PKCS1v15(), hashes.SHA256())
        self.body = ("x" * len(presign)).encode()  # a request body of the pay's size
        self.db = sqlite3.connect(tmp / "floor.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT)")
        self.row = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Trivial)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.session = requests.Session()

    def sign(self) -> None:
        raw = self.private.sign(self.presign, padding.PKCS1v15(), hashes.SHA256())
        base64.b64encode(raw)

    def verify(self) -> None:
        self.public.verify(self.answer_sig, self.answer_text, padding.PKCS1v15(), hashes.SHA256())

    def journal(self) -> None:
        self.row += 1
        for i in range(self.commits):
            self.db.execute("BEGIN IMMEDIATE")
            if i == 0:
                self.db.execute("INSERT INTO t (id, state) VALUES (?, 'paying')", (self.row,))
            else:
                self.db.execute("UPDATE t SET state=? WHERE id=?", (f"s{i}", self.row))
            self.db.execute("COMMIT")

    def http(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request(
            "POST",
            "/gateway.do",
            body=self.body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        conn.getresponse().read()
        conn.close()

    def http_requests(self) -> None:
        """The same round trip through requests (the client's library), for comparison."""
        with self.session.post(
            f"http://127.0.0.1:{self.port}/gateway.do", data=self.body, timeout=5
        ) as response:
            response.content  # noqa: B018 (read the body)

    def once(self) -> dict[str, float]:
        steps: dict[str, float] = {}
        started = time.perf_counter()
        for name, step in (
            ("sign", self.sign),
            ("verify", self.verify),
            ("journal", self.journal),
            ("http", self.http),
        ):
            t0 = time.perf_counter()
            step()
            steps[name] = time.perf_counter() - t0
        steps["total"] = time.perf_counter() - started
        return steps

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.session.close()
        self.db.close()


def simulator_crypto(presign: str, answer_text: str, n: int) -> float:
    """p50 of what the simulator adds per pay on this machine: verify the request, sign the
    answer (Alipay's cost in the field, not the kiosk's)."""
    merchant = RsaSignature(SignType.RSA2, private_key=named_key("merchant"))
    request_sig = merchant.sign(presign)
    checker = RsaSignature(SignType.RSA2, public_key=named_key("merchant").public_key())
    signer = RsaSignature(SignType.RSA2, private_key=named_key("alipay"))

    def both() -> None:
        checker.verify(presign, request_sig)
        signer.sign(answer_text)

    return summary(time_calls(both, n))["p50_ms"]


# -- the run -------------------------------------------------------------------------------


def run(n: int) -> dict[str, Any]:
    quiet_json_logging()
    with (
        tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp_name,
        simulator_running() as sim,
    ):
        return _run(Path(tmp_name), sim, n)


def _run(tmp: Path, sim: GatewaySimulator, n: int) -> dict[str, Any]:
    codes = Codes()
    flow = make_flow(sim, tmp / "state")
    for _ in range(WARMUP):
        sell_once(flow, codes)
    commits = commits_per_sale(flow, codes)

    # Texts of the real size for the floor: a pay's pre-sign string and a pay answer's.
    stamp = f"{datetime.now(UTC):%Y%m%d%H%M%S}"
    order = pay_order(f"VM-BENCH-{stamp}-0a1b2c3d", unique_code(1), stamp)
    pay_params = flow.client.pay_params(order)
    presign = presign_string(pay_params)
    last_ref = flow.journal.listing(recent=1)[0].ref
    answer = sim.ledger.trade(PARTNER, last_ref)
    assert answer is not None
    answer_text = presign_string(
        {
            "result_code": "SUCCESS",
            "alipay_trans_id": answer.alipay_trans_id,
            "partner_trans_id": last_ref,
            "trans_amount": "1.50",
            "currency": "USD",
            "exchange_rate": "7.1234567",
            "trans_amount_cny": "10.69",
            "alipay_buyer_login_id": "15****1234",
            "alipay_buyer_user_id": "2088************",
            "alipay_pay_time": "20250101120000",
        }
    )
    floor = Floor(tmp, commits, presign, answer_text)
    for _ in range(WARMUP):
        floor.once()

    sales: list[float] = []
    floors: list[dict[str, float]] = []
    per_round = max(1, n // ROUNDS)
    for _ in range(ROUNDS):
        sales += [sell_once(flow, codes) for _ in range(per_round)]
        floors += [floor.once() for _ in range(per_round)]
    http_requests = time_calls(floor.http_requests, per_round)
    sim_crypto_ms = simulator_crypto(presign, answer_text, 50)
    floor.close()
    flow.client.close()
    flow.journal.close()

    # Where a sale's time goes: the same sale with timers around each step.
    book = Breakdown()
    timed = make_flow(sim, tmp / "state-timed", book)
    serve = sim._serve_gateway

    def timed_serve(query: str, body: bytes) -> Any:
        with book.timing("simulator"):
            return serve(query, body)

    sim._serve_gateway = timed_serve  # type: ignore[method-assign]
    for _ in range(WARMUP):
        sell_once(timed, codes)
    book.total.clear()
    book.count.clear()
    instrumented = [sell_once(timed, codes) for _ in range(per_round)]
    sim._serve_gateway = serve  # type: ignore[method-assign]
    timed.client.close()
    timed.journal.close()

    sale = summary(sales)
    floor_total = summary([f["total"] for f in floors])
    floor_steps = {
        k: summary([f[k] for f in floors])["p50_ms"] for k in ("sign", "verify", "journal", "http")
    }
    ratio = sale["p50_ms"] / floor_total["p50_ms"]
    sale_steps = {
        k: book.total[k] / len(instrumented) * 1000 for k in ("sign", "verify", "journal", "http")
    }
    sale_steps["other"] = sum(instrumented) / len(instrumented) * 1000 - sum(sale_steps.values())
    sale_steps["simulator"] = book.total["simulator"] / len(instrumented) * 1000

    print(
        f"paid sale through PaymentFlow.sell, RSA2, simulator on loopback, N={sale['n']} "
        f"(after {WARMUP} warm-up)"
    )
    print(f"  sale   {fmt_summary(sale)}")
    print(
        f"  floor  p50 {fmt_ms(floor_total['p50_ms'])}  p99 {fmt_ms(floor_total['p99_ms'])}  "
        f"mean {fmt_ms(floor_total['mean_ms'])}  (1 sign + 1 verify + {commits} fsync'd "
        f"WAL/FULL commits + 1 loopback HTTP round trip)"
    )
    print(f"  ratio  sale p50 / floor p50 = {ratio:.2f}x")
    print(f"  commits per paid sale: {commits} (each an fsync, synchronous=FULL)")
    print("  floor breakdown (p50 per step):")
    for name, label in (
        ("sign", "RSA2 sign, 2048-bit"),
        ("verify", "RSA2 verify"),
        ("journal", f"{commits} journal commits"),
        ("http", "HTTP round trip, http.client, new connection"),
    ):
        print(f"    {label:<46} {fmt_ms(floor_steps[name])}")
    print(
        f"    {'(same round trip through requests.Session)':<46} "
        f"{fmt_ms(summary(http_requests)['p50_ms'])}"
    )
    print(
        f"  sale breakdown (mean per sale over {len(instrumented)} instrumented sales, "
        f"{fmt_ms(sum(instrumented) / len(instrumented) * 1000).strip()} each):"
    )
    for name, label in (
        ("sign", "sign (1 per sale)"),
        ("verify", "verify (1 per sale)"),
        ("journal", f"journal writes ({commits} commits)"),
        ("http", "HTTP exchange (incl. the simulator's work)"),
        ("other", "everything else (XML, logging, flow)"),
    ):
        print(f"    {label:<46} {fmt_ms(sale_steps[name])}")
    print(f"    {'of HTTP: the simulator answering the pay':<46} {fmt_ms(sale_steps['simulator'])}")
    print(f"    {'of which its RSA2 verify + sign (p50)':<46} {fmt_ms(sim_crypto_ms)}")
    slowest = max(floor_steps, key=lambda k: floor_steps[k])
    print(
        f"  slowest floor step: {slowest} ({floor_steps[slowest]:.3f} ms of "
        f"{floor_total['p50_ms']:.3f} ms)"
    )
    return {
        "sale_p50_ms": sale["p50_ms"],
        "sale_p99_ms": sale["p99_ms"],
        "sale_mean_ms": sale["mean_ms"],
        "floor_p50_ms": floor_total["p50_ms"],
        "ratio": ratio,
        "commits": commits,
        "slowest_floor_step": slowest,
        "floor_steps_ms": floor_steps,
        "sale_steps_ms": sale_steps,
    }


def main(argv: list[str] | None = None) -> int:
    count = count_option(200, "paid sales to time")
    return bench_main("paid_transaction", __doc__, lambda args: run(args.n), argv, count)


if __name__ == "__main__":
    sys.exit(main())
