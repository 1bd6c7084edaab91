"""Benchmark: scan-to-APPROVED latency through the whole daemon. `kiosk run` runs as a
subprocess with a serial scanner and a vending controller on ptys and the gateway simulator on
loopback; each distinct code is written to the scanner, timed until `APPROVED` on the VMC line,
then confirmed (`SUCCESS` → `ACK`) and the kiosk is let back to ready before the next."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import KioskRig, fmt_ms, report, start_simulator, summary, unique_code

WARMUP = 3


def one_sale(rig: KioskRig, n: int) -> float:
    """Scan code n, return seconds until APPROVED; finish the vend and wait for ready."""
    mark = rig.log_mark()
    started = time.perf_counter()
    rig.scanner.write_line(unique_code(n))
    approved = rig.vmc.expect("APPROVED ", timeout=15)
    elapsed = time.perf_counter() - started
    _, ref, _amount = approved.split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}", end="\n")
    ack = rig.vmc.expect("ACK ", timeout=10)
    if ack != f"ACK {ref}":
        raise RuntimeError(f"expected ACK {ref}, got {ack!r}")
    done = rig.wait_log(
        mark,
        lambda e: e.get("event") == "payment.result" and e.get("ref") == ref,
        10,
        "payment.result",
    )
    # Back to ready only after the sale's result: a scan before that is ignored as busy.
    rig.wait_log(
        done,
        lambda e: e.get("event") == "indicator" and e.get("state") == "ready",
        10,
        "indicator ready",
    )
    return elapsed


def run(n: int) -> dict[str, Any]:
    sim = start_simulator()
    try:
        with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:
            rig = KioskRig(Path(tmp), sim)
            try:
                rig.start()
                for i in range(WARMUP):
                    one_sale(rig, 900_000 + i)
                samples = [one_sale(rig, i + 1) for i in range(n)]
                status = rig.stop()
            except Exception:
                print("kiosk log, last lines:", *rig.raw_log[-15:], sep="\n  ", file=sys.stderr)
                raise
            finally:
                rig.close()
    finally:
        sim.stop()
    s = summary(samples)
    print(
        f"scan-to-APPROVED through `kiosk run` (serial scanner and VMC on ptys, simulator on "
        f"loopback), N={s['n']} (after {WARMUP} warm-up)"
    )
    print(
        f"  p50 {fmt_ms(s['p50_ms'])}  p99 {fmt_ms(s['p99_ms'])}  mean {fmt_ms(s['mean_ms'])}"
        f"  min {fmt_ms(s['min_ms'])}  max {fmt_ms(s['max_ms'])}"
        + ("  (p99 = max at this N)" if s["n"] < 100 else "")
    )
    print(f"  kiosk exit status after SIGTERM: {status}")
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "mean_ms": s["mean_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=30, help="scans to time (default 30)")
    args = parser.parse_args(argv)
    report("scan_to_approved", run(args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
