"""The kiosk's figures for Prometheus, as a file for node_exporter's textfile collector.

Every metric is declared once in `METRICS` (name, type, help, labels): the writer, the tests
and the Grafana dashboard's check read that table. The file is replaced atomically (a temp
file in the same directory, fsync, rename), so node_exporter never reads half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiosk.alarms import ALARM_KINDS
from kiosk.ports import KioskState

FINAL_OUTCOMES = ("vended", "declined", "cancelled", "refunded")


@dataclass(frozen=True)
class Metric:
    name: str
    type: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[Metric, ...] = (
    Metric("kiosk_up", "gauge", "1 while kiosk run is running; 0 after a clean stop."),
    Metric(
        "kiosk_info", "gauge", "Always 1; the labels name the kiosk.", ("terminal_id", "firmware")
    ),
    Metric(
        "kiosk_state",
        "gauge",
        "1 for the kiosk's current state (SPEC section 6), 0 for the others.",
        ("state",),
    ),
    Metric(
        "kiosk_state_since_timestamp_seconds",
        "gauge",
        "When the kiosk entered its current state (Unix time).",
    ),
    Metric(
        "kiosk_sales_total",
        "counter",
        "Transactions that became final since the kiosk started, by outcome.",
        ("outcome",),
    ),
    Metric("kiosk_sales_today", "gauge", "Sales vended since midnight, the kiosk's local time."),
    Metric(
        "kiosk_sales_today_amount",
        "gauge",
        "Amount of the sales vended since midnight, in the currency's units.",
        ("currency",),
    ),
    Metric(
        "kiosk_last_sale_timestamp_seconds",
        "gauge",
        "When the last vended sale was recorded (Unix time); absent before the first.",
    ),
    Metric(
        "kiosk_unfinished_transactions",
        "gauge",
        "Transactions the journal worker is still driving to a final state.",
    ),
    Metric("kiosk_attention_transactions", "gauge", "Transactions that need a person."),
    Metric("kiosk_alarm_active", "gauge", "Active alarms, by kind.", ("kind",)),
    Metric(
        "kiosk_telemetry_dropped_total",
        "counter",
        "Telemetry messages dropped because the queue was full (broker unreachable).",
    ),
    Metric("kiosk_telemetry_connected", "gauge", "1 while connected to the MQTT broker."),
    Metric(
        "kiosk_last_update_timestamp_seconds",
        "gauge",
        "When this file was last written (Unix time): a stale value means a stalled kiosk.",
    ),
)
METRIC_NAMES = frozenset(m.name for m in METRICS)

Sample = tuple[Mapping[str, str], float | int | str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(samples: Mapping[str, Iterable[Sample]]) -> str:
    """The text exposition format (version 0.0.4): HELP and TYPE for each declared metric,
    then its samples. `samples` maps a metric's name to (labels, value) pairs; a metric with
    no samples is left out. Raises KeyError for an undeclared name or label."""
    unknown = set(samples) - METRIC_NAMES
    if unknown:
        raise KeyError(f"undeclared metrics: {sorted(unknown)}")
    lines: list[str] = []
    for metric in METRICS:
        rows = list(samples.get(metric.name, ()))
        if not rows:
            continue
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for labels, value in rows:
            if set(labels) != set(metric.labels):
                raise KeyError(f"{metric.name} takes labels {metric.labels}, not {sorted(labels)}")
            text = ",".join(f'{k}="{_escape(str(labels[k]))}"' for k in metric.labels)
            lines.append(f"{metric.name}{{{text}}} {value}" if text else f"{metric.name} {value}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Figures:
    """Everything the textfile shows, gathered by the telemetry sink."""

    terminal_id: str
    firmware: str
    up: bool
    state: KioskState
    state_since: float
    sales_by_outcome: Mapping[str, int]
    sales_today: int
    amount_today: str
    currency: str
    last_sale_at: float | None
    unfinished: int | None
    attention: int | None
    alarms: Mapping[str, int]
    dropped: int
    connected: bool | None  # None: no MQTT configured
    written_at: float


def samples_of(f: Figures) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {
        "kiosk_up": [({}, int(f.up))],
        "kiosk_info": [({"terminal_id": f.terminal_id, "firmware": f.firmware}, 1)],
        "kiosk_state": [({"state": s.value}, int(s is f.state)) for s in KioskState],
        "kiosk_state_since_timestamp_seconds": [({}, round(f.state_since, 3))],
        "kiosk_sales_total": [
            ({"outcome": o}, int(f.sales_by_outcome.get(o, 0))) for o in FINAL_OUTCOMES
        ],
        "kiosk_sales_today": [({}, f.sales_today)],
        "kiosk_sales_today_amount": [({"currency": f.currency}, f.amount_today)],
        "kiosk_alarm_active": [({"kind": k}, int(f.alarms.get(k, 0))) for k in ALARM_KINDS],
        "kiosk_telemetry_dropped_total": [({}, f.dropped)],
        "kiosk_last_update_timestamp_seconds": [({}, round(f.written_at, 3))],
    }
    if f.last_sale_at is not None:
        out["kiosk_last_sale_timestamp_seconds"] = [({}, round(f.last_sale_at, 3))]
    if f.unfinished is not None:
        out["kiosk_unfinished_transactions"] = [({}, f.unfinished)]
    if f.attention is not None:
        out["kiosk_attention_transactions"] = [({}, f.attention)]
    if f.connected is not None:
        out["kiosk_telemetry_connected"] = [({}, int(f.connected))]
    return out


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: a temp file in the same directory (a name
    node_exporter skips: not *.prom), fsync, rename, then fsync the directory."""
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), 0o644)  # node_exporter runs as another user
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
