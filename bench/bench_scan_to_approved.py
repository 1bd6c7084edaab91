"""Benchmark: scan-to-APPROVED latency through the whole daemon. `kiosk run` runs as a
subprocess with a serial scanner and a vending controller on ptys and the gateway simulator on
loopback; each distinct code is written to the scanner, timed until `APPROVED` on the VMC line,
then confirmed (`SUCCESS` → `ACK`) and the kiosk is let back to ready before the next."""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from benchlib import (
    DaemonRig,
    after_warmup,
    bench_main,
    count_option,
    fmt_summary,
    is_ready_light,
    kiosk_rig,
    start_kiosk,
    summary,
    unique_code,
)

WARMUP = 3


def one_sale(rig: DaemonRig, n: int) -> float:
    """Scan code n, return seconds until APPROVED; finish the vend and wait for ready."""
    mark = len(rig.logs)
    started = time.perf_counter()
    rig.scanner.write_line(unique_code(n))
    approved = rig.vmc.expect("APPROVED ", timeout=15)
    elapsed = time.perf_counter() - started
    _, ref, _amount = approved.split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}", end="\n")
    ack = rig.vmc.expect("ACK ", timeout=10)
    if ack != f"ACK {ref}":
        raise RuntimeError(f"expected ACK {ref}, got {ack!r}")
    done = rig.wait_log_after(
        mark,
        lambda e: e.get("event") == "payment.result" and e.get("ref") == ref,
        10,
        "payment.result",
    )
    # Back to ready only after the sale's result: a scan before that is ignored as busy.
    rig.wait_log_after(done, is_ready_light, 10, "indicator ready")
    return elapsed


def run(n: int) -> dict[str, Any]:
    codes = itertools.count(1)
    with kiosk_rig() as rig:
        start_kiosk(rig)
        samples = after_warmup(lambda: one_sale(rig, next(codes)), n, WARMUP)
        status = rig.stop()
    s = summary(samples)
    print(
        f"scan-to-APPROVED through `kiosk run` (serial scanner and VMC on ptys, simulator on "
        f"loopback), N={s['n']} (after {WARMUP} warm-up)"
    )
    print(f"  {fmt_summary(s)}" + ("  (p99 = max at this N)" if s["n"] < 100 else ""))
    print(f"  kiosk exit status after SIGTERM: {status}")
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "mean_ms": s["mean_ms"]}


def main(argv: list[str] | None = None) -> int:
    count = count_option(30, "scans to time")
    return bench_main("scan_to_approved", __doc__, lambda args: run(args.n), argv, count)


if __name__ == "__main__":
    sys.exit(main())
