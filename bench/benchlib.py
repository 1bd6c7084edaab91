"""Shared pieces of the kiosk's benchmarks: statistics, result hand-off to run_all.py, and the
set-ups several benches share, built on the tests' keys, simulator account and daemon rig."""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from requests.adapters import HTTPAdapter

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient, GatewaySettings, PayOrder
from kiosk.alipay.signing import SignType, presign_string
from kiosk.config import AlipaySection
from kiosk.journal import Journal
from kiosk.log import JsonFormatter
from kiosk.payment import FlowSettings, PaymentFlow
from kiosk.simulator import GatewaySimulator, MerchantAccount

ROOT = Path(__file__).resolve().parents[1]
# `python bench/x.py` puts bench/ on the path, not the checkout: the tests' helpers live there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import MD5_KEY, PARTNER, named_key, payment_code, signature_for  # noqa: E402
from tests.daemon_rig import DaemonRig, service_python_env  # noqa: E402

RESULT_ENV = "KIOSK_BENCH_RESULT"  # run_all.py names a file here to collect each bench's figures
T = TypeVar("T")


# -- figures -------------------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: with N samples, p99 is the max once N < 100."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


def summary(samples_s: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, mean, min and max of durations in seconds, as milliseconds."""
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def fmt_ms(value: float) -> str:
    return f"{value:8.3f} ms" if value < 100 else f"{value:8.1f} ms"


def fmt_summary(s: dict[str, float]) -> str:
    """`p50 … p99 … mean … min … max …` of a `summary`."""
    return (
        f"p50 {fmt_ms(s['p50_ms'])}  p99 {fmt_ms(s['p99_ms'])}  mean {fmt_ms(s['mean_ms'])}  "
        f"min {fmt_ms(s['min_ms'])}  max {fmt_ms(s['max_ms'])}"
    )


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds each of n calls of `fn` took."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def after_warmup(once: Callable[[], T], n: int, warmup: int) -> list[T]:
    """What n calls of `once` measured, after `warmup` calls whose results are dropped."""
    for _ in range(warmup):
        once()
    return [once() for _ in range(n)]


def report(name: str, figures: dict[str, Any]) -> None:
    """Hand the bench's headline figures to run_all.py (a no-op when run alone)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps({"bench": name, **figures}, default=str))


def bench_main(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """A bench's command line: parse `options`, run, report the figures to run_all.py."""
    parser = argparse.ArgumentParser(description=doc)
    if options is not None:
        options(parser)
    report(name, run(parser.parse_args(argv)))
    return 0


def count_option(default: int, what: str) -> Callable[[argparse.ArgumentParser], None]:
    """`-n`: how many of `what` (e.g. "scans to time")."""

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", type=int, default=default, help=f"{what} (default {default})")

    return add


def quiet_json_logging() -> None:
    """Log as `kiosk run --log-format json` does, into /dev/null: the formatting cost is real,
    the output is not wanted. The simulator stands in for Alipay; its own lines are dropped."""
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (lives with the bench)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("kiosk.simulator").setLevel(logging.WARNING)


# -- the simulated gateway and the payment flow against it ---------------------------------

PRICE = Decimal("1.50")
FLOW_SETTINGS = FlowSettings(
    terminal_id="VM-BENCH",
    currency="USD",
    trans_name="Vending purchase",
    extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1", "terminal_id": "VM-BENCH"},
)


def unique_code(n: int) -> str:
    """The n-th distinct 18-digit payment code the simulator pays at once (last 4: 0001)."""
    return payment_code("0001", n)


@contextlib.contextmanager
def simulator_running() -> Iterator[GatewaySimulator]:
    """The gateway simulator on 127.0.0.1 with the tests' merchant account and keys."""
    account = MerchantAccount(
        PARTNER, md5_key=MD5_KEY, merchant_public_key=named_key("merchant").public_key()
    )
    sim = GatewaySimulator([account], alipay_private_key=named_key("alipay"))
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def gateway_settings(sim: GatewaySimulator) -> GatewaySettings:
    """The client's settings for the simulator: RSA2 with the merchant's key."""
    return GatewaySettings(
        gateway=sim.url,
        partner=PARTNER,
        seller_id=PARTNER,
        signature=signature_for(SignType.RSA2, sim),
    )


def payment_flow(
    sim: GatewaySimulator, journal: Journal, client: AlipayClient | None = None
) -> PaymentFlow:
    """The payment flow against the simulator, vending through a fake that always dispenses."""
    client = client or AlipayClient(gateway_settings(sim))
    return PaymentFlow(client, journal, FakeVendOutput(), FLOW_SETTINGS)


def pay_order(ref: str, code: str, stamp: str) -> PayOrder:
    """The pay of one item at PRICE, as the flow sends it."""
    return PayOrder(
        partner_trans_id=ref,
        amount=PRICE,
        currency=FLOW_SETTINGS.currency,
        buyer_identity_code=code,
        trans_name=FLOW_SETTINGS.trans_name,
        trans_create_time=stamp,
        extend_info=FLOW_SETTINGS.extend_info,
    )


# -- `kiosk run` on ptys -------------------------------------------------------------------

# The kiosk's own alipay timings: the rig's defaults are shortened for the tests.
KIOSK_TIMINGS = {
    name: getattr(AlipaySection, name)
    for name in ("pay_timeout_s", "query_interval_s", "query_deadline_s", "probe_interval_s")
}


@contextlib.contextmanager
def kiosk_rig() -> Iterator[DaemonRig]:
    """A rig for `kiosk run` (serial scanner and VMC on ptys, fake lights, state in a temp dir)
    against the simulator; not started. On a failure the kiosk's last log lines go to stderr."""
    # The kiosk must not ping a watchdog of whatever service runs the bench.
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    with simulator_running() as sim, tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:
        rig = DaemonRig(Path(tmp), sim, **KIOSK_TIMINGS)
        try:
            yield rig
        except Exception:
            print("kiosk log, last lines:", *rig.raw_log[-15:], sep="\n  ", file=sys.stderr)
            raise
        finally:
            rig.close()


# What `kiosk run` imports, compiled once per bench (with the service's PYTHONOPTIMIZE) into a
# cache of the bench's own: the kiosk runs from bytecode, as the image has it compiled
# (kiosk-layer.sh), not compiling its modules at every start (which costs start-up time and
# shows in its peak RSS). The checkout gets no __pycache__.
_DAEMON_IMPORTS = (
    "import kiosk.cli, kiosk.config, kiosk.daemon, kiosk.journal, kiosk.scanner_hold, "
    "kiosk.systemd, drivers, drivers.scanner_serial, drivers.vend_serial, drivers.indicator_fake"
)


@functools.cache
def bytecode_env() -> dict[str, str]:
    cache = tempfile.mkdtemp(prefix="kiosk-bench-pyc-")
    atexit.register(shutil.rmtree, cache, True)
    env = {**os.environ, **service_python_env(), "PYTHONPYCACHEPREFIX": cache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", _DAEMON_IMPORTS], env=env, cwd=ROOT, check=True)
    return {"PYTHONPYCACHEPREFIX": cache}


def is_ready_light(entry: dict[str, Any]) -> bool:
    """The log line of the lights going to ready."""
    return entry.get("event") == "indicator" and entry.get("state") == "ready"


def start_kiosk(
    rig: DaemonRig, wait_ready: bool = True, wrap: list[str] | None = None, **env: str
) -> None:
    """Start `kiosk run` with `env` added (and its command prefixed by `wrap`); with
    `wait_ready`, wait until it is ready, both serial ports are open and the lights show
    ready."""
    rig.start(
        wait_ready=wait_ready,
        wrap=wrap,
        extra_env={**bytecode_env(), **service_python_env(), **env},
    )
    if wait_ready:
        rig.wait_log(is_ready_light, 10, "indicator ready")


def read_proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmRSS, VmHWM, Threads, ...)."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Fields after the command name (which may hold spaces) start at state, field 3.
    after = stat.rsplit(")", 1)[1].split()
    utime, stime = int(after[11]), int(after[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# -- the floor: the unavoidable work of one paid sale -------------------------------------

ANSWER = b"<?xml version='1.0' encoding='UTF-8'?><alipay><is_success>T</is_success></alipay>"


class _Canned(BaseHTTPRequestHandler):
    """Reads the request and answers a fixed body at once, over HTTP/1.1 with keep-alive, as
    the simulator does: the floor's exchange is transport only, no gateway work."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/xml; charset=UTF-8")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def floor_texts(client: AlipayClient) -> tuple[str, str]:
    """A pay's pre-sign string and a pay answer's, of the real sizes, for the floor."""
    stamp = f"{datetime.now(UTC):%Y%m%d%H%M%S}"
    ref = f"VM-BENCH-{stamp}-0a1b2c3d"
    presign = presign_string(client.pay_params(pay_order(ref, unique_code(1), stamp)))
    answer = presign_string(
        {
            "result_code": "SUCCESS",
            "alipay_trans_id": "2026010122001400000000000001",
            "partner_trans_id": ref,
            "trans_amount": "1.50",
            "currency": "USD",
            "exchange_rate": "7.10000000",
            "trans_amount_cny": "10.65",
            "alipay_buyer_login_id": "138****1234",
            "alipay_buyer_user_id": "2088000000001234",
            "alipay_pay_time": "20260101120000",
        }
    )
    return presign, answer


class Floor:
    """The unavoidable work of one paid sale, step by step: one RSA2 sign, one verify, `commits`
    fsync'd commits (SQLite WAL, synchronous=FULL, like the journal) and one loopback HTTP
    exchange through a kept-alive requests.Session, as the Alipay client makes it."""

    STEPS = ("sign", "verify", "journal", "http")

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
        self.db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, state TEXT)")
        self.row = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gateway.do"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=0)
        self.session.mount("http://", adapter)
        self.commit_s: list[float] = []  # each commit on its own
        self.template: requests.PreparedRequest | None = None

    def sign(self) -> None:
        raw = self.private.sign(self.presign, padding.PKCS1v15(), hashes.SHA256())
        base64.b64encode(raw)

    def verify(self) -> None:
        self.public.verify(self.answer_sig, self.answer_text, padding.PKCS1v15(), hashes.SHA256())

    def journal(self) -> None:
        self.row += 1
        for i in range(self.commits):
            t0 = time.perf_counter()
            self.db.execute("BEGIN IMMEDIATE")
            if i == 0:
                self.db.execute("INSERT INTO t (id, state) VALUES (?, 'paying')", (self.row,))
            else:
                self.db.execute("UPDATE t SET state=? WHERE id=?", (f"s{i}", self.row))
            self.db.execute("COMMIT")
            self.commit_s.append(time.perf_counter() - t0)

    def http(self) -> None:
        """A request prepared up to its body once, sent on the kept connection, as the
        client does."""
        if self.template is None:
            headers = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
            self.template = self.session.prepare_request(
                requests.Request("POST", self.url, headers=headers)
            )
        request = self.template.copy()
        request.prepare_body(self.body, None)
        with self.session.send(
            request, timeout=(3.0, 10.0), stream=True, allow_redirects=False, proxies={}
        ) as response:
            response.content  # noqa: B018 (read the body)

    def once(self) -> dict[str, float]:
        steps: dict[str, float] = {}
        started = time.perf_counter()
        for name in self.STEPS:
            t0 = time.perf_counter()
            getattr(self, name)()
            steps[name] = time.perf_counter() - t0
        steps["total"] = time.perf_counter() - started
        return steps

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.session.close()
        self.db.close()


def floor_summary(floors: Sequence[dict[str, float]], floor: Floor) -> dict[str, Any]:
    """p50/p99 of the floor's total, p50 of each step and of one commit, in milliseconds."""
    total = summary([f["total"] for f in floors])
    steps = {k: summary([f[k] for f in floors])["p50_ms"] for k in Floor.STEPS}
    steps["commit"] = summary(floor.commit_s)["p50_ms"]
    return {"p50_ms": total["p50_ms"], "p99_ms": total["p99_ms"], "steps_ms": steps}


class GatewayClock:
    """The simulator's own time answering each request (parsing it, verifying it, the ledger,
    signing the answer: Alipay's work in the field, not the kiosk's), as (start, end) in
    time.monotonic(). Install on a running simulator; `within(a, b)` sums what fell between."""

    def __init__(self, sim: GatewaySimulator) -> None:
        self.spans: list[tuple[float, float]] = []
        serve = sim._serve_gateway

        def timed(query: str, body: bytes) -> Any:
            started = time.monotonic()
            try:
                return serve(query, body)
            finally:
                self.spans.append((started, time.monotonic()))

        sim._serve_gateway = timed  # type: ignore[method-assign]

    def within(self, start: float, end: float) -> float:
        return sum(b - a for a, b in self.spans if a >= start and b <= end)
