"""Benchmark: start-up of `kiosk run` to READY=1, as systemd sees it: NOTIFY_SOCKET names an
AF_UNIX datagram socket bound in a temp dir; the clock runs from starting the process to the
READY=1 datagram. Also shows the bare interpreter's start for scale, and the SIGTERM stop time."""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import KioskRig, fmt_ms, report, start_simulator


def start_once(rig: KioskRig, sock: socket.socket, notify_path: Path) -> tuple[float, float]:
    """Seconds to READY=1, and seconds from SIGTERM to exit."""
    started = time.perf_counter()
    proc = rig.spawn(NOTIFY_SOCKET=str(notify_path))
    deadline = started + 60
    while True:
        sock.settimeout(max(deadline - time.perf_counter(), 0.001))
        try:
            datagram = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            raise RuntimeError(f"no READY=1 in 60 s; log: {rig.raw_log[-10:]}") from None
        if "READY=1" in datagram.splitlines():
            ready = time.perf_counter() - started
            break
    if "out of service" in datagram:
        raise RuntimeError(f"the kiosk started out of service: {datagram!r}")
    stopping = time.perf_counter()
    rig.stop()
    stopped = time.perf_counter() - stopping
    assert proc.returncode == 0, f"kiosk exited {proc.returncode}"
    while True:  # drain STOPPING=1 and anything else sent before exit
        sock.settimeout(0)
        try:
            sock.recv(4096)
        except (BlockingIOError, TimeoutError):
            break
    return ready, stopped


def bare_python(n: int) -> float:
    """Median seconds for `python -c pass` with this interpreter (its site imports included)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-B", "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int) -> dict[str, Any]:
    sim = start_simulator()
    try:
        with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp_name:
            tmp = Path(tmp_name)
            notify_path = tmp / "notify.sock"
            rig = KioskRig(tmp, sim)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(str(notify_path))
                try:
                    start_once(rig, sock, notify_path)  # warm-up: page cache, new journal
                    results = [start_once(rig, sock, notify_path) for _ in range(n)]
                finally:
                    rig.close()
    finally:
        sim.stop()
    ready = [r for r, _ in results]
    stops = [s for _, s in results]
    bare = bare_python(5)
    median = statistics.median(ready)
    print(f"start-up of `kiosk run` to READY=1 on NOTIFY_SOCKET, N={n} (after 1 warm-up)")
    print(
        f"  median {fmt_ms(median * 1000)}  min {fmt_ms(min(ready) * 1000)}  "
        f"max {fmt_ms(max(ready) * 1000)}"
    )
    print(f"  for scale: `python -c pass` median {fmt_ms(bare * 1000)}")
    print(f"  stop: SIGTERM to exit median {fmt_ms(statistics.median(stops) * 1000)}")
    return {
        "median_ms": median * 1000,
        "min_ms": min(ready) * 1000,
        "max_ms": max(ready) * 1000,
        "bare_python_ms": bare * 1000,
        "stop_median_ms": statistics.median(stops) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5, help="starts to time (default 5)")
    args = parser.parse_args(argv)
    report("startup", run(args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
