"""Benchmark: does telemetry slow a sale? In-process paid sales (`PaymentFlow.sell`, RSA2,
simulator on loopback) with the daemon's telemetry wiring (the journal's watcher feeding a
TelemetrySink, and the state changes a sale makes) in three set-ups, run in alternating
rounds: no telemetry, the broker up (a real Mosquitto on loopback), the broker down (nothing
listens: the sink keeps failing to connect and queues). The sale path must never wait on
telemetry: the broker-down p50 should stay within 10 % of the broker-up p50."""

from __future__ import annotations

import argparse
import socket
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import (
    PRICE,
    bench_main,
    count_option,
    fmt_summary,
    payment_flow,
    quiet_json_logging,
    simulator_running,
    summary,
    time_calls,
    unique_code,
)

from kiosk.alarms import AlarmBoard
from kiosk.config import TelemetrySection
from kiosk.demo import demo_config
from kiosk.figures import FiguresReader
from kiosk.journal import Journal
from kiosk.payment import PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.ports import KioskState
from kiosk.telemetry import KioskSnapshot, TelemetrySink
from tests.mosquitto import Broker, mosquitto_problem

ROUNDS = 6
WARMUP = 5
WITHIN = 0.10


def refused_url() -> str:
    """An mqtt:// URL where nothing listens (a port bound, never listened on, then freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"mqtt://127.0.0.1:{sock.getsockname()[1]}"


class Setup:
    """A journal, a flow, and (for "up" and "down") a sink fed like the daemon feeds it."""

    def __init__(self, name: str, folder: Path, sim: Any, mqtt_url: str | None) -> None:
        self.name = name
        self.journal = Journal(folder / "state")
        self.flow: PaymentFlow = payment_flow(sim, self.journal)
        self.sink: TelemetrySink | None = None
        if mqtt_url is not None:
            config = demo_config(folder / "state", sim.url)
            config = replace(
                config, telemetry=TelemetrySection(mqtt_url=mqtt_url, heartbeat_s=3600)
            )
            alarms = AlarmBoard()
            self.sink = TelemetrySink(config, FiguresReader(folder / "state"), alarms)
            alarms.listen(self.sink.alarm)
            self.journal.watch(self.sink.transaction_changed)
            self.sink.start()
        self.samples: list[float] = []

    def sell(self, n: int) -> None:
        sink = self.sink
        now = datetime.now(UTC)
        if sink is not None:  # the lights' changes during a sale, as the daemon reports them
            sink.state_changed(KioskSnapshot(KioskState.PAYING, None, now))
        sale = self.flow.sell(PaymentCode.parse(unique_code(n)), PRICE, "coffee")
        if sink is not None:
            sink.state_changed(KioskSnapshot(KioskState.VENDING, None, now))
            sink.state_changed(KioskSnapshot(KioskState.READY, None, now))
        assert sale.result is SaleResult.VENDED, sale

    def close(self) -> None:
        if self.sink is not None:
            self.sink.stop()
        self.flow.client.close()
        self.journal.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_json_logging()
    per_round = max(args.n // ROUNDS, 1)
    problem = mosquitto_problem()
    with (
        tempfile.TemporaryDirectory(prefix="kiosk-bench-telemetry-") as tmp,
        simulator_running() as sim,
    ):
        root = Path(tmp)
        broker: Broker | None = None
        if problem is None:
            broker = Broker(root / "broker")
            broker.start()
        setups = [Setup("off", root / "off", sim, None)]
        if broker is not None:
            setups.append(Setup("up", root / "up", sim, broker.url))
        setups.append(Setup("down", root / "down", sim, refused_url()))
        try:
            up = next((s for s in setups if s.name == "up"), None)
            if up is not None and up.sink is not None and not up.sink.connected.wait(10):
                raise RuntimeError("the sink did not connect to the broker")
            counter = iter(range(1, 1_000_000))
            for s in setups:  # warm-up: connections, caches, the journal's first pages
                for _ in range(WARMUP):
                    s.sell(next(counter))
            for _ in range(ROUNDS):
                for s in setups:
                    sell: Callable[[], None] = lambda s=s: s.sell(next(counter))  # noqa: E731
                    s.samples += time_calls(sell, per_round)
            stats = {s.name: summary(s.samples) for s in setups}
            down = setups[-1].sink
            assert down is not None and not down.connected.is_set()
            figures: dict[str, Any] = {
                f"{name}_{k}": v for name, st in stats.items() for k, v in st.items()
            }
            figures["sales_each"] = len(setups[0].samples)
            for name, st in stats.items():
                print(f"paid sale, telemetry {name:>4}: {fmt_summary(st)}")
            if up is not None:
                ratio = stats["down"]["p50_ms"] / stats["up"]["p50_ms"]
                figures["down_over_up"] = ratio
                # Only slower counts: a broker that is down must not cost the sale time.
                verdict = "within" if ratio <= 1 + WITHIN else "NOT within"
                print(f"broker down / broker up (p50): {ratio:.3f} ({verdict} {WITHIN:.0%})")
            else:
                print(f"broker up: not measured ({problem})")
            print(f"sales queued while the broker was down: {down.dropped} dropped")
        finally:
            for s in setups:
                s.close()
            if broker is not None:
                broker.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    return bench_main("telemetry", __doc__, run, argv, count_option(120, "sales per set-up"))


if __name__ == "__main__":
    raise SystemExit(main())
