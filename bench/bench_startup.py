"""Benchmark: start-up of `kiosk run` to READY=1, as systemd sees it: NOTIFY_SOCKET names an
AF_UNIX datagram socket bound in a temp dir; the clock runs from starting the process to the
READY=1 datagram. Also the CPU time the kiosk used to get there (steadier than the wall time on
a machine busy with other work), the bare interpreter's start for scale, and the SIGTERM stop
time."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    DaemonRig,
    after_warmup,
    bench_main,
    count_option,
    cpu_seconds,
    fmt_ms,
    kiosk_rig,
    start_kiosk,
    time_calls,
)


def start_once(
    rig: DaemonRig, sock: socket.socket, notify_path: Path
) -> tuple[float, float, float]:
    """Seconds to READY=1, CPU seconds the kiosk used until then, seconds from SIGTERM to
    exit."""
    started = time.perf_counter()
    start_kiosk(rig, wait_ready=False, NOTIFY_SOCKET=str(notify_path))
    deadline = started + 60
    while True:
        sock.settimeout(max(deadline - time.perf_counter(), 0.001))
        try:
            datagram = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            raise RuntimeError(f"no READY=1 in 60 s; log: {rig.raw_log[-10:]}") from None
        if "READY=1" in datagram.splitlines():
            ready = time.perf_counter() - started
            assert rig.proc is not None
            cpu = cpu_seconds(rig.proc.pid)
            break
    if "out of service" in datagram:
        raise RuntimeError(f"the kiosk started out of service: {datagram!r}")
    stopping = time.perf_counter()
    status = rig.stop()
    stopped = time.perf_counter() - stopping
    assert status == 0, f"kiosk exited {status}"
    while True:  # drain STOPPING=1 and anything else sent before exit
        sock.settimeout(0)
        try:
            sock.recv(4096)
        except (BlockingIOError, TimeoutError):
            break
    return ready, cpu, stopped


def bare_python(n: int) -> float:
    """Median seconds for `python -c pass` with this interpreter (its site imports included)."""
    command = [sys.executable, "-B", "-c", "pass"]
    return statistics.median(time_calls(lambda: subprocess.run(command, check=True), n))


def run(n: int) -> dict[str, Any]:
    with kiosk_rig() as rig, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        notify_path = rig.tmp / "notify.sock"
        sock.bind(str(notify_path))
        # One warm-up start: page cache, new journal.
        results = after_warmup(lambda: start_once(rig, sock, notify_path), n, 1)
    ready = [r for r, _, _ in results]
    cpu = [c for _, c, _ in results]
    stops = [s for _, _, s in results]
    bare = bare_python(5)
    median = statistics.median(ready)
    print(f"start-up of `kiosk run` to READY=1 on NOTIFY_SOCKET, N={n} (after 1 warm-up)")
    print(
        f"  median {fmt_ms(median * 1000)}  min {fmt_ms(min(ready) * 1000)}  "
        f"max {fmt_ms(max(ready) * 1000)}"
    )
    print(
        f"  CPU time to READY=1 (user+system): median {fmt_ms(statistics.median(cpu) * 1000)}  "
        f"min {fmt_ms(min(cpu) * 1000)}"
    )
    print(f"  for scale: `python -c pass` median {fmt_ms(bare * 1000)}")
    print(f"  stop: SIGTERM to exit median {fmt_ms(statistics.median(stops) * 1000)}")
    return {
        "median_ms": median * 1000,
        "min_ms": min(ready) * 1000,
        "max_ms": max(ready) * 1000,
        "cpu_median_ms": statistics.median(cpu) * 1000,
        "bare_python_ms": bare * 1000,
        "stop_median_ms": statistics.median(stops) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    count = count_option(5, "starts to time")
    return bench_main("startup", __doc__, lambda args: run(args.n), argv, count)


if __name__ == "__main__":
    sys.exit(main())
