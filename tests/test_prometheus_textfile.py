"""The Prometheus textfile (SPEC section 8): written atomically for node_exporter's textfile
collector, in Prometheus naming with HELP and TYPE, read back with prometheus_client's own
parser; and the Grafana dashboard asks only for metrics (and labels) the kiosk writes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiosk.config import TelemetrySection
from kiosk.metrics import METRIC_NAMES, METRICS, render, write_textfile
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Rig, rig_config

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 20.0


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, by (sample name, labels); the parser raises on a malformed file."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_the_textfile_follows_sales_and_says_down_after_a_clean_stop(
    make_rig: Callable[..., Rig], simulator: GatewaySimulator, tmp_path: Path
) -> None:
    collector = tmp_path / "node-exporter"
    collector.mkdir()
    path = collector / "kiosk.prom"
    config = rig_config(tmp_path / "state", simulator.url)
    config = replace(config, telemetry=TelemetrySection(prometheus_textfile=str(path)))
    rig = make_rig(config)
    assert rig.kiosk.telemetry is not None
    rig.scanner.scan(payment_code("0999", 1))
    assert rig.lights.wait_for(KioskState.VENDING, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)

    def current() -> dict[Any, float]:
        try:
            return parse(path.read_text())
        except FileNotFoundError:
            return {}

    def sold() -> bool:
        found = current()
        return (
            value(found, "kiosk_sales_total", outcome="vended") == 1
            and value(found, "kiosk_state", state="ready") == 1
        )

    assert rig.log.wait_until(sold, WAIT_S), path.read_text() if path.exists() else "no file"
    samples = current()
    assert value(samples, "kiosk_up") == 1
    assert value(samples, "kiosk_sales_today") == 1
    assert value(samples, "kiosk_sales_today_amount", currency="USD") == 1.5
    assert value(samples, "kiosk_unfinished_transactions") == 0
    assert value(samples, "kiosk_attention_transactions") == 0
    assert value(samples, "kiosk_alarm_active", kind="attention") == 0
    assert value(samples, "kiosk_telemetry_dropped_total") == 0
    assert value(samples, "kiosk_info", terminal_id="DEMO-01", firmware="0.1.0") == 1
    assert sum(v for (n, _), v in samples.items() if n == "kiosk_state") == 1
    assert value(samples, "kiosk_telemetry_connected") is None  # no MQTT configured
    names = {name for name, _ in samples}
    declared = METRIC_NAMES
    assert names <= declared, names - declared
    # Only the file itself in the collector's folder: no temp file left behind.
    assert sorted(p.name for p in collector.iterdir()) == ["kiosk.prom"]
    assert path.stat().st_mode & 0o044 == 0o044  # node_exporter, another user, reads it

    rig.stop()
    assert value(current(), "kiosk_up") == 0


def test_every_metric_has_help_and_type_and_counters_end_in_total() -> None:
    text = render(
        {
            "kiosk_up": [({}, 1)],
            "kiosk_sales_total": [({"outcome": "vended"}, 3)],
            "kiosk_info": [({"terminal_id": 'odd "name"\\', "firmware": "1"}, 1)],
        }
    )
    lines = text.splitlines()
    assert "# TYPE kiosk_sales_total counter" in lines
    assert "# HELP kiosk_up 1 while kiosk run is running; 0 after a clean stop." in lines
    samples = parse(text)
    assert value(samples, "kiosk_info", terminal_id='odd "name"\\', firmware="1") == 1
    for metric in METRICS:
        assert re.fullmatch(r"kiosk_[a-z_]+", metric.name)
        assert metric.name.endswith("_total") == (metric.type == "counter"), metric.name
        assert metric.help.endswith(".")
    with pytest.raises(KeyError):
        render({"kiosk_nonsense": [({}, 1)]})
    with pytest.raises(KeyError):
        render({"kiosk_sales_total": [({"kind": "x"}, 1)]})


def test_the_textfile_is_replaced_by_a_rename_within_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kiosk.prom"
    path.write_text("kiosk_up 1\n")
    renames: list[tuple[str, str]] = []
    fsyncs: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src: Any, dst: Any) -> None:
        renames.append((str(src), str(dst)))
        assert path.read_text() == "kiosk_up 1\n"  # the old file whole until the rename
        real_replace(src, dst)

    def spy_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    write_textfile(path, "kiosk_up 0\n")
    [(src, dst)] = renames
    assert Path(src).parent == tmp_path and dst == str(path)
    assert not src.endswith(".prom")  # node_exporter skips the temp file
    assert fsyncs  # the data reached the disk before the rename
    assert path.read_text() == "kiosk_up 0\n"


# -- the Grafana dashboard ---------------------------------------------------------------------


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "docs/grafana-kiosk.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [
        v["query"]
        for v in dashboard["templating"]["list"]
        if v.get("type") == "query" and isinstance(v.get("query"), str)
    ]
    assert queries
    return queries


LABELS = {m.name: set(m.labels) for m in METRICS}
NODE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes node_exporter


@pytest.mark.parametrize("query", dashboard_queries())
def test_each_dashboard_query_asks_for_metrics_and_labels_the_kiosk_writes(query: str) -> None:
    names = re.findall(r"\bkiosk_[a-z_]+\b", query)
    assert names, f"no kiosk metric in {query!r}"
    for name in names:
        assert name in METRIC_NAMES, f"{name} is not written by the kiosk ({query!r})"
    for name, selector in re.findall(r"\b(kiosk_[a-z_]+)\{([^}]*)\}", query):
        used = set(re.findall(r"([a-z_]+)\s*[=!]~?", selector))
        assert used <= LABELS[name] | NODE_LABELS, (name, used)
    for grouping in re.findall(r"\bby \(([^)]*)\)", query):
        labels = {g.strip() for g in grouping.split(",")}
        allowed = set().union(*(LABELS[n] for n in names)) | NODE_LABELS
        assert labels <= allowed, (query, labels - allowed)


def test_the_dashboard_shows_the_headline_figures() -> None:
    used = {n for q in dashboard_queries() for n in re.findall(r"\bkiosk_[a-z_]+\b", q)}
    assert {
        "kiosk_up",
        "kiosk_state",
        "kiosk_sales_total",
        "kiosk_unfinished_transactions",
        "kiosk_attention_transactions",
        "kiosk_alarm_active",
        "kiosk_telemetry_dropped_total",
    } <= used
