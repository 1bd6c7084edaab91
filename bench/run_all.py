"""Run every kiosk benchmark in order, each in its own interpreter, print what each prints and
then a summary table (`make bench`). Writes only into a temp dir; uses only loopback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IDLE_S_IN_RUN_ALL = 20.0  # of the 60 s default, to keep the whole run near a minute and a half

BENCHES = (
    "bench_paid_transaction.py",
    "bench_scan_to_approved.py",
    "bench_idle.py",
    "bench_startup.py",
    "bench_recovery.py",
    "bench_decoder.py",
    "bench_telemetry.py",
)


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


# One row per headline figure: (label, how to render it from the bench's figures).
ROWS: dict[str, list[tuple[str, Callable[[dict[str, Any]], str]]]] = {
    "paid_transaction": [
        (
            "in-process sale p50 / p99",
            lambda r: f"{_ms(r['sale_p50_ms'])} / {_ms(r['sale_p99_ms'])}",
        ),
        (
            "  its floor p50 (sign+verify+commits+HTTP)",
            lambda r: f"{_ms(r['floor_p50_ms'])} ({r['commits']} commits)",
        ),
        ("  the sale's CPU time (its thread)", lambda r: _ms(r["cpu_per_sale_ms"])),
        (
            "  flow's own / floor, p50",
            lambda r: f"{r['ratio']:.2f}x{_goal(r['ratio'], 1.3, 'x')}",
        ),
    ],
    "scan_to_approved": [
        ("scan-to-APPROVED p50 / p99", lambda r: f"{_ms(r['p50_ms'])} / {_ms(r['p99_ms'])}"),
        (
            "  kiosk's own (less the simulator) p50 / p99",
            lambda r: f"{_ms(r['own_p50_ms'])} / {_ms(r['own_p99_ms'])}",
        ),
        (
            "  floor p50 / p99 (sign+verify+2 commits+HTTP)",
            lambda r: f"{_ms(r['floor_p50_ms'])} / {_ms(r['floor_p99_ms'])}",
        ),
        (
            "  kiosk's own / floor, p50",
            lambda r: f"{r['ratio_p50']:.2f}x{_goal(r['ratio_p50'], 1.5, 'x')}",
        ),
        (
            "  kiosk's own / floor, p99",
            lambda r: f"{r['ratio_p99']:.2f}x{_goal(r['ratio_p99'], 2.0, 'x')}",
        ),
        ("  kiosk's CPU time per sale", lambda r: _ms(r["cpu_per_sale_ms"])),
        (
            "  step most above its floor share",
            lambda r: f"{r['slowest_step']} (+{_ms(r['slowest_over_ms'])} at p50)",
        ),
    ],
    "idle": [
        (
            "peak RSS (VmHWM) of kiosk run",
            lambda r: f"{r['vmhwm_mib']:.1f} MiB{_goal(r['vmhwm_mib'], 40.0, ' MiB')}",
        ),
        (
            "  with a busy year's journal (20,000 sales)",
            lambda r: f"{r['vmhwm_year_mib']:.1f} MiB{_goal(r['vmhwm_year_mib'], 40.0, ' MiB')}",
        ),
        (
            "idle CPU",
            lambda r: (
                f"{r['cpu_pct']:.3f} % of a core over {r['window_s']} s"
                f"{_goal(r['cpu_pct'], 0.1, ' %')}"
            ),
        ),
    ],
    "startup": [
        (
            "start-up to READY=1, median",
            lambda r: f"{_ms(r['median_ms'])}{_goal(r['median_ms'] / 1000, 0.3, ' s')}",
        ),
        ("  its CPU time, median", lambda r: _ms(r["cpu_median_ms"])),
    ],
    "recovery": [
        ("journal open (10k + 100 rows)", lambda r: _ms(r["open_ms"])),
        ("settle 100 unfinished", lambda r: f"{_ms(r['settle_ms'])} in {r['passes']} passes"),
    ],
    "telemetry": [
        (
            "paid sale p50, broker up / down",
            lambda r: (
                f"{_ms(r['up_p50_ms'])} / {_ms(r['down_p50_ms'])} "
                f"({r['down_over_up']:.2f}x; within 10 % wanted)"
                if "down_over_up" in r
                else f"- / {_ms(r['down_p50_ms'])} (no mosquitto)"
            ),
        ),
    ],
    "decoder": [
        ("ScanDecoder throughput", lambda r: f"{r['codes_per_s']:,.0f} codes/s"),
    ],
}


def _goal(value: float, goal: float, unit: str) -> str:
    """`  (goal <= G: met)`; a report, never a failure: this machine is shared and noisy."""
    return f"  (goal <= {goal:g}{unit}: {'met' if value <= goal else 'NOT met'})"


def run_one(script: str, tmp: Path, env: dict[str, str]) -> tuple[int, float, dict[str, Any]]:
    result_file = tmp / f"{script}.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-B", str(HERE / script)],
        env={**env, "KIOSK_BENCH_RESULT": str(result_file)},
        cwd=tmp,
        check=False,
    )
    elapsed = time.monotonic() - started
    figures = json.loads(result_file.read_text()) if result_file.exists() else {}
    return proc.returncode, elapsed, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--idle-s",
        type=float,
        help=f"idle window (default: $KIOSK_BENCH_IDLE_S, else {IDLE_S_IN_RUN_ALL:.0f} s)",
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if args.idle_s is not None:
        env["KIOSK_BENCH_IDLE_S"] = str(args.idle_s)
        idle_why = "--idle-s"
    elif "KIOSK_BENCH_IDLE_S" in os.environ:
        idle_why = "KIOSK_BENCH_IDLE_S from the environment"
    else:
        env["KIOSK_BENCH_IDLE_S"] = str(IDLE_S_IN_RUN_ALL)
        idle_why = "run_all's shortened window; bench_idle.py alone uses 60 s"
    print(
        f"kiosk benchmarks: {len(BENCHES)} scripts, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; idle window {env['KIOSK_BENCH_IDLE_S']} s "
        f"({idle_why})",
        flush=True,
    )

    started = time.monotonic()
    outcomes: list[tuple[str, int, float, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-all-") as tmp_name:
        for script in BENCHES:
            print(f"\n== {script} ==", flush=True)
            code, elapsed, figures = run_one(script, Path(tmp_name), env)
            if code != 0:
                print(f"!! {script} failed with exit status {code}", flush=True)
            outcomes.append((script, code, elapsed, figures))
    total = time.monotonic() - started

    print("\n== summary ==")
    table: list[tuple[str, str]] = []
    for script, code, _elapsed, figures in outcomes:
        name = figures.get("bench", script)
        if code != 0 or not figures:
            table.append((f"{script}", f"FAILED (exit {code})"))
            continue
        for label, render in ROWS.get(name, []):
            table.append((label, render(figures)))
    width = max(len(label) for label, _ in table)
    for label, value in table:
        print(f"  {label:<{width}}  {value}")
    times = ", ".join(
        f"{s.removeprefix('bench_').removesuffix('.py')} {e:.0f} s" for s, _, e, _ in outcomes
    )
    print(f"  wall time {total:.0f} s ({times})")
    return 0 if all(code == 0 for _, code, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
