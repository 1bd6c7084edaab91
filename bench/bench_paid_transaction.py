"""Benchmark: one paid sale through `PaymentFlow.sell` (RSA2, simulator on loopback) against a
floor doing only the unavoidable work: one sign, one verify, the journal's fsync'd commits and
one loopback HTTP round trip. Prints p50/p99/mean, the ratio, and where the time goes."""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchlib import (
    PRICE,
    Floor,
    GatewayClock,
    bench_main,
    count_option,
    floor_summary,
    floor_texts,
    fmt_ms,
    fmt_summary,
    gateway_settings,
    named_key,
    payment_flow,
    quiet_json_logging,
    simulator_running,
    summary,
    time_calls,
    unique_code,
)

from kiosk.alipay.client import AlipayClient
from kiosk.alipay.signing import RsaSignature, Signature, SignType
from kiosk.journal import Journal
from kiosk.log import logging_in_background
from kiosk.payment import PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.simulator import GatewaySimulator

ROUNDS = 4  # sales and floor alternate in rounds, so drift of the machine hits both alike
WARMUP = 10
GOAL = 1.3  # the flow's own time at p50, against the floor's


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


def sell_timed(flow: PaymentFlow, codes: Codes) -> tuple[float, float]:
    """One paid sale: (start, end) in time.monotonic()."""
    code = codes.next()
    started = time.monotonic()
    sale = flow.sell(code, PRICE, "coffee")
    ended = time.monotonic()
    if sale.result is not SaleResult.VENDED:
        raise RuntimeError(f"a paid sale ended {sale.result} ({sale.reason})")
    return started, ended


def sell_once(flow: PaymentFlow, codes: Codes) -> float:
    started, ended = sell_timed(flow, codes)
    return ended - started


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


# -- the simulator's share -------------------------------------------------------------


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
        logging_in_background(),  # as `kiosk run` writes its lines
    ):
        return _run(Path(tmp_name), sim, n)


def _run(tmp: Path, sim: GatewaySimulator, n: int) -> dict[str, Any]:
    codes = Codes()
    flow = make_flow(sim, tmp / "state")
    for _ in range(WARMUP):
        sell_once(flow, codes)
    commits = commits_per_sale(flow, codes)
    presign, answer_text = floor_texts(flow.client)
    floor = Floor(tmp, commits, presign, answer_text)
    for _ in range(WARMUP):
        floor.once()
    floor.commit_s.clear()

    gateway = GatewayClock(sim)
    spans: list[tuple[float, float]] = []
    floors: list[dict[str, float]] = []
    per_round = max(1, n // ROUNDS)
    cpu_s = 0.0
    for _ in range(ROUNDS):
        for _ in range(per_round):
            cpu0 = time.thread_time()
            spans.append(sell_timed(flow, codes))
            cpu_s += time.thread_time() - cpu0
            floors.append(floor.once())  # one after each sale: the same machine for both
    cpu_ms = cpu_s / len(spans) * 1000
    sales = [end - start for start, end in spans]
    own = [end - start - gateway.within(start, end) for start, end in spans]
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
    mine = summary(own)
    fl = floor_summary(floors, floor)
    floor_steps = fl["steps_ms"]
    ratio = mine["p50_ms"] / fl["p50_ms"]
    sale_steps = {
        k: book.total[k] / len(instrumented) * 1000 for k in ("sign", "verify", "journal", "http")
    }
    # The sign runs on the client's own thread beside the first commit: not on the path.
    on_path = ("verify", "journal", "http")
    sale_steps["other"] = sum(instrumented) / len(instrumented) * 1000 - sum(
        sale_steps[k] for k in on_path
    )
    sale_steps["simulator"] = book.total["simulator"] / len(instrumented) * 1000

    print(
        f"paid sale through PaymentFlow.sell, RSA2, simulator on loopback (HTTP/1.1 kept "
        f"alive), N={sale['n']} (after {WARMUP} warm-up)"
    )
    print(f"  sale         {fmt_summary(sale)}")
    print(f"  flow's own   {fmt_summary(mine)}  (less the simulator answering)")
    print(
        f"  floor        p50 {fmt_ms(fl['p50_ms'])}  p99 {fmt_ms(fl['p99_ms'])}  (1 sign + "
        f"1 verify + {commits} fsync'd WAL/FULL commits + 1 kept-alive HTTP exchange)"
    )
    print(f"  ratio  flow's own p50 / floor p50 = {ratio:.2f}x (goal <= {GOAL}x)")
    raw = sale["p50_ms"] / fl["p50_ms"]
    print(f"  ratio  sale p50 / floor p50, simulator included = {raw:.2f}x")
    print(f"  commits per paid sale: {commits} (each an fsync, synchronous=FULL)")
    print(
        f"  the sale's own CPU time (its thread only, not the simulator's): {cpu_ms:.3f} ms "
        "per sale (steadier than wall time on a busy machine)"
    )
    print("  floor breakdown (p50 per step):")
    for name, label in (
        ("sign", "RSA2 sign, 2048-bit"),
        ("verify", "RSA2 verify"),
        ("journal", f"{commits} journal commits"),
        ("http", "HTTP exchange, kept-alive requests.Session"),
    ):
        print(f"    {label:<46} {fmt_ms(floor_steps[name])}")
    print(
        f"  sale breakdown (mean per sale over {len(instrumented)} instrumented sales, "
        f"{fmt_ms(sum(instrumented) / len(instrumented) * 1000).strip()} each):"
    )
    for name, label in (
        ("sign", "sign (1, on its own thread, beside commit 1)"),
        ("verify", "verify (1 per sale)"),
        ("journal", f"journal writes ({commits} commits)"),
        ("http", "HTTP exchange (incl. the simulator's work)"),
        ("other", "the rest (XML, flow, waiting for the sign)"),
    ):
        print(f"    {label:<46} {fmt_ms(sale_steps[name])}")
    print(f"    {'of HTTP: the simulator answering the pay':<46} {fmt_ms(sale_steps['simulator'])}")
    print(f"    {'of which its RSA2 verify + sign (p50)':<46} {fmt_ms(sim_crypto_ms)}")
    slowest = max(("sign", "verify", "journal", "http"), key=lambda k: floor_steps[k])
    print(
        f"  slowest floor step: {slowest} ({floor_steps[slowest]:.3f} ms of {fl['p50_ms']:.3f} ms)"
    )
    return {
        "sale_p50_ms": sale["p50_ms"],
        "sale_p99_ms": sale["p99_ms"],
        "sale_mean_ms": sale["mean_ms"],
        "own_p50_ms": mine["p50_ms"],
        "cpu_per_sale_ms": cpu_ms,
        "floor_p50_ms": fl["p50_ms"],
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
