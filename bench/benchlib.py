"""Shared pieces of the kiosk's benchmarks: statistics, result hand-off to run_all.py, and the
set-ups several benches share, built on the tests' keys, simulator account and daemon rig."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient, GatewaySettings, PayOrder
from kiosk.alipay.signing import SignType
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
from tests.daemon_rig import DaemonRig  # noqa: E402

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


def is_ready_light(entry: dict[str, Any]) -> bool:
    """The log line of the lights going to ready."""
    return entry.get("event") == "indicator" and entry.get("state") == "ready"


def start_kiosk(rig: DaemonRig, wait_ready: bool = True, **env: str) -> None:
    """Start `kiosk run` with `env` added; with `wait_ready`, wait until it is ready, both
    serial ports are open and the lights show ready."""
    rig.start(wait_ready=wait_ready, extra_env={"PYTHONDONTWRITEBYTECODE": "1", **env})
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
