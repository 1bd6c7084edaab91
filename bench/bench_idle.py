"""Benchmark: what `kiosk run` costs while nobody buys anything: CPU over an idle window (from
/proc/PID/stat utime+stime, as % of one core), peak resident memory (VmHWM) and current RSS.
A few paid sales go first, so the peak includes everything a sale loads and holds. The peak is
also taken on a journal of a busy year (20,000 sales, about 10 MB), which a new kiosk's
journal hides: SQLite's page cache grows with the pages that start-up's check and the sales
read.

The window is 60 s by default; `--quick` (10 s), `--seconds S` or env KIOSK_BENCH_IDLE_S
shorten it."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from bench_recovery import build_journal
from bench_scan_to_approved import one_sale
from benchlib import bench_main, cpu_seconds, kiosk_rig, read_proc_status, start_kiosk

DEFAULT_S = 60.0
QUICK_S = 10.0
SETTLE_S = 2.0  # after ready: let start-up work (worker's first pass, port opens) finish
SALES_FIRST = 3
GOAL_MIB = 40.0
YEAR_OF_SALES = 20_000


def run(window_s: float, why: str) -> dict[str, Any]:
    with kiosk_rig() as rig:
        start_kiosk(rig)
        assert rig.proc is not None
        pid = rig.proc.pid
        at_ready = read_proc_status(pid)
        for n in range(SALES_FIRST):
            one_sale(rig, n + 1)
        pause = threading.Event()  # never set: a plain timed wait, no busy loop here
        pause.wait(SETTLE_S)
        cpu0, t0, switches0 = cpu_seconds(pid), time.monotonic(), _switches(pid)
        requests0 = len(rig.sim.requests_seen)
        pause.wait(window_s)
        cpu1, t1, switches1 = cpu_seconds(pid), time.monotonic(), _switches(pid)
        status = read_proc_status(pid)
        requests = len(rig.sim.requests_seen) - requests0
        rig.stop()
    year_kib, journal_mb = _peak_on_a_year_of_sales()
    elapsed = t1 - t0
    cpu_pct = (cpu1 - cpu0) / elapsed * 100
    hwm_kib = _kib(status["VmHWM"])
    ready_kib = _kib(at_ready["VmHWM"])
    rss_kib = _kib(status["VmRSS"])
    print(
        f"idle `kiosk run` (serial scanner and VMC on ptys, fake lights), window "
        f"{elapsed:.1f} s ({why})"
    )
    tick = 1 / os.sysconf("SC_CLK_TCK")
    print(
        f"  CPU      {cpu1 - cpu0:.3f} s over the window = {cpu_pct:.3f} % of one core "
        f"(resolution: one {tick * 1000:.0f} ms tick = {tick / elapsed * 100:.3f} %)"
    )
    print(
        f"  memory   VmHWM (peak RSS) {hwm_kib / 1024:.1f} MiB (goal <= {GOAL_MIB:.0f} MiB; "
        f"{ready_kib / 1024:.1f} MiB at ready, before {SALES_FIRST} sales), VmRSS now "
        f"{rss_kib / 1024:.1f} MiB, threads {status['Threads']}"
    )
    print(
        f"  memory   VmHWM {year_kib / 1024:.1f} MiB with {YEAR_OF_SALES:,} sales in the journal "
        f"({journal_mb:.1f} MB), after {SALES_FIRST} more"
    )
    print(f"  gateway  {requests} requests to the simulator during the window")
    print(
        f"  wake-ups {(switches1 - switches0) / elapsed:.1f} per second (voluntary context "
        f"switches, all threads; threads that ended in the window are not counted)"
    )
    return {
        "window_s": round(elapsed, 1),
        "cpu_pct": cpu_pct,
        "vmhwm_mib": hwm_kib / 1024,
        "vmhwm_ready_mib": ready_kib / 1024,
        "rss_mib": rss_kib / 1024,
        "vmhwm_year_mib": year_kib / 1024,
        "why": why,
    }


def _peak_on_a_year_of_sales() -> tuple[int, float]:
    """VmHWM (KiB) of a kiosk started on a journal of YEAR_OF_SALES finished sales, after a
    few more, and the journal's size (MB)."""
    with kiosk_rig() as rig:
        build_journal(rig.state_dir, rig.sim, YEAR_OF_SALES, 0, 0)
        journal_mb = sum(f.stat().st_size for f in rig.state_dir.iterdir()) / 1e6
        start_kiosk(rig)
        assert rig.proc is not None
        for n in range(SALES_FIRST):
            one_sale(rig, n + 1)
        hwm = _kib(read_proc_status(rig.proc.pid)["VmHWM"])
        rig.stop()
    return hwm, journal_mb


def _kib(value: str) -> int:
    return int(value.split()[0])


def _switches(pid: int) -> int:
    """Voluntary context switches summed over the kiosk's live threads: how often it wakes."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass  # the thread ended meanwhile
    return total


def window_from(args: argparse.Namespace) -> tuple[float, str]:
    if args.seconds is not None:
        return args.seconds, "--seconds"
    if args.quick:
        return QUICK_S, "--quick"
    env = os.environ.get("KIOSK_BENCH_IDLE_S")
    if env:
        return float(env), "KIOSK_BENCH_IDLE_S"
    return DEFAULT_S, "default"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_S:.0f} s window")
    parser.add_argument("--seconds", type=float, help="the window, in seconds")


def main(argv: list[str] | None = None) -> int:
    return bench_main("idle", __doc__, lambda args: run(*window_from(args)), argv, options)


if __name__ == "__main__":
    sys.exit(main())
