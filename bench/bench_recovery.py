"""Benchmark: recovery on start with 10,000 finished and 100 unfinished transactions in the
journal. Times opening the journal (its integrity check) and the journal worker's passes that
make all 100 final against the gateway simulator on loopback."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import (
    PRICE,
    bench_main,
    fmt_ms,
    gateway_settings,
    pay_order,
    payment_flow,
    quiet_json_logging,
    simulator_running,
    unique_code,
)

from kiosk.alipay.client import AlipayClient, Outcome
from kiosk.journal import Journal, TxnState
from kiosk.simulator import GatewaySimulator
from kiosk.worker import JournalWorker

MAX_PASSES = 5


def build_journal(
    state_dir: Path, sim: GatewaySimulator, finished: int, unfinished: int, cancelling: int
) -> dict[str, int]:
    """Fill a journal as a busy kiosk would leave it after a crash. Each transaction is written
    with the journal's own calls; fsync is off while building (only the reading is timed)."""
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S")
    journal = Journal(state_dir)
    journal._conn.execute("PRAGMA synchronous=OFF")  # building is not what is measured
    for i in range(finished):
        txn = journal.open_transaction(
            ref=f"VM-BENCH-{stamp}-{i:08x}",
            amount=PRICE,
            currency="USD",
            item="coffee",
            code_last4=unique_code(i + 1)[-4:],
            trans_create_time=stamp,
        )
        txn = journal.before_request(txn, "pay", {"partner_trans_id": txn.ref})
        journal.after_request(txn, "success", "SUCCESS")
        journal.update(txn, state=TxnState.VENDED, alipay_trans_id=f"2025{i:024d}")

    # The unfinished ones were paid at the gateway before the crash.
    client = AlipayClient(gateway_settings(sim))
    kinds = {"cancelling": 0, "paying": 0}
    for j in range(unfinished):
        code = unique_code(10_000_000 + j)
        txn = journal.open_transaction(
            ref=f"VM-BENCH-{stamp}-u{j:07x}",
            amount=PRICE,
            currency="USD",
            item="coffee",
            code_last4=code[-4:],
            trans_create_time=stamp,
        )
        txn = journal.before_request(txn, "pay", {"partner_trans_id": txn.ref})
        result = client.pay(pay_order(txn.ref, code, stamp))
        if result.outcome is not Outcome.SUCCESS:
            raise RuntimeError(f"the simulator did not take pay {j}: {result.detail}")
        if j < cancelling:  # the vend failed; the cancel was journaled, never answered
            journal.after_request(txn, "success", "SUCCESS")
            txn = journal.update(txn, state=TxnState.PAID, alipay_trans_id=result.alipay_trans_id)
            journal.update(txn, state=TxnState.CANCELLING, note="vend failed")
            kinds["cancelling"] += 1
        else:  # killed while the pay was in flight
            kinds["paying"] += 1
    client.close()
    journal.close()
    return kinds


def run(finished: int, unfinished: int) -> dict[str, Any]:
    quiet_json_logging()
    with (
        simulator_running() as sim,
        tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp_name,
    ):
        return _run(Path(tmp_name) / "state", sim, finished, unfinished)


def _run(state_dir: Path, sim: GatewaySimulator, finished: int, unfinished: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    kinds = build_journal(state_dir, sim, finished, unfinished, cancelling=unfinished * 3 // 5)
    build_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in state_dir.iterdir())

    # -- timed: what a restart does --------------------------------------------------------
    t_open = time.perf_counter()
    journal = Journal(state_dir)
    open_s = time.perf_counter() - t_open
    t_list = time.perf_counter()
    pending = journal.unfinished()
    list_s = time.perf_counter() - t_list
    if len(pending) != unfinished:
        raise RuntimeError(f"expected {unfinished} unfinished, found {len(pending)}")

    flow = payment_flow(sim, journal)
    worker = JournalWorker(flow, journal)  # driven pass by pass here, not on its thread
    requests_before = len(sim.requests_seen)
    passes: list[tuple[float, int]] = []
    t_settle = time.perf_counter()
    left = unfinished
    while left and len(passes) < MAX_PASSES:
        # Each pass takes every unfinished one at once, as on start or when the gateway is
        # back, instead of waiting out the retry backoff (a policy, not a cost).
        worker.wake(resume_all=True)
        t_pass = time.perf_counter()
        worker.work_off_due()
        left = worker.backlog
        passes.append((time.perf_counter() - t_pass, left))
    settle_s = time.perf_counter() - t_settle
    requests = len(sim.requests_seen) - requests_before
    flow.client.close()
    states: dict[str, int] = {}
    for txn in journal.listing(include_all=True):
        if txn.ref.split("-")[-1].startswith("u"):
            states[txn.state.value] = states.get(txn.state.value, 0) + 1
    journal.close()
    held = sum(1 for t in sim.ledger.trades() if t.holds_money)
    if left:
        raise RuntimeError(f"{left} transactions still unfinished after {MAX_PASSES} passes")

    print(
        f"recovery with {finished:,} finished + {unfinished} unfinished transactions "
        f"({kinds['cancelling']} CANCELLING, {kinds['paying']} PAYING; all paid at the "
        f"simulator); journal {size / 1e6:.1f} MB, built in {build_s:.1f} s"
    )
    print(
        f"  open    Journal(...) incl. quick_check    {fmt_ms(open_s * 1000)}  "
        f"(journal file in the page cache)"
    )
    print(f"  list    journal.unfinished()              {fmt_ms(list_s * 1000)}")
    print(
        f"  settle  all {unfinished} made final            {fmt_ms(settle_s * 1000)}  "
        f"= {settle_s / unfinished * 1000:.1f} ms per transaction, {requests} gateway requests"
    )
    for i, (seconds, remaining) in enumerate(passes, 1):
        print(f"          pass {i}: {fmt_ms(seconds * 1000)}, {remaining} left unfinished")
    print(
        f"  result  {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}; "
        f"simulator holds money for {held} trades"
    )
    return {
        "open_ms": open_s * 1000,
        "list_ms": list_s * 1000,
        "settle_ms": settle_s * 1000,
        "passes": len(passes),
        "requests": requests,
        "journal_mb": size / 1e6,
    }


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--unfinished", type=int, default=100)


def main(argv: list[str] | None = None) -> int:
    return bench_main(
        "recovery", __doc__, lambda args: run(args.finished, args.unfinished), argv, options
    )


if __name__ == "__main__":
    sys.exit(main())
