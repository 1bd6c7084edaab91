"""The fault campaign: many transactions through the real daemon (serial scanner and VMC on
ptys, the simulator on loopback) with a fault drawn at random for each, and SIGKILLs of the
daemon at random moments. At the end the faults stop, the journal is worked off, and the
simulator's ledger, the VMC's log and `kiosk journal --json` must agree on the money rules.

`make test` runs a short campaign; `make soak` a long one (KIOSK_SOAK_TRANSACTIONS=2000).
The seed is printed; KIOSK_CAMPAIGN_SEED=<seed> replays a run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from tests.conftest import PARTNER
from tests.daemon_rig import DaemonRig

pytestmark = pytest.mark.slow

TRANSACTIONS = int(os.environ.get("KIOSK_SOAK_TRANSACTIONS", "200"))
KILLS = max(20, TRANSACTIONS // 10)

# fault name -> (last 4 digits of the code, a plan to inject, what the VMC does when approved)
FAULTS: dict[str, tuple[str, FaultPlan | None]] = {
    "none": ("0001", None),
    "decline": ("2022", None),
    "decline_other": ("2031", None),
    "confirm_on_phone": ("0002", FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=0.3)),
    "slow_after_charge": ("0003", FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=1.0)),
    "drop_after_charge": ("3002", None),
    "system_error_charged": ("3003", None),
    "system_error_not_charged": ("3004", None),
    "forged_signature": ("3006", None),
    "http_500": ("3005", None),
    "cancel_window_closed": ("4001", None),
    "offline": ("0004", None),
}
VMC_ANSWERS = ("success", "success", "success", "failure", "silence")


def test_fault_campaign_keeps_every_money_rule(tmp_path: Path, simulator: GatewaySimulator) -> None:
    seed = int(os.environ.get("KIOSK_CAMPAIGN_SEED", random.randrange(1 << 30)))
    print(f"campaign seed {seed} ({TRANSACTIONS} transactions, {KILLS} kills)")
    rng = random.Random(seed)
    rig = DaemonRig(
        tmp_path,
        simulator,
        declined_hold_s=0.2,
        pay_timeout_s=0.5,
        query_interval_s=0.1,
        query_deadline_s=1.2,
    )
    kill_at = set(rng.sample(range(TRANSACTIONS), KILLS))
    vended: set[str] = set()  # refs the VMC dispensed (its own log)
    unacked: set[str] = set()  # dispensed, ACK not seen: re-reported after a restart
    counts: Counter[str] = Counter()
    try:
        rig.start()
        for i in range(TRANSACTIONS):
            fault = rng.choice(list(FAULTS))
            suffix, plan = FAULTS[fault]
            counts[fault] += 1
            if plan is not None:
                simulator.inject(plan)
            if fault == "offline":
                simulator.go_offline()
            answer = rng.choice(VMC_ANSWERS)
            code = f"28{seed % 1000:03d}{i:09d}{suffix}"
            start = len(rig.logs)
            rig.scanner.write_line(code)
            killed = i in kill_at and _kill_mid_sale(rig, rng)
            if not killed:
                _play_vmc(rig, answer, vended, unacked)
            if fault == "offline":
                simulator.go_online()
            simulator.clear_faults()
            if killed:
                counts["kills"] += 1
                rig.start()
                for ref in sorted(unacked):
                    rig.vmc.write_line(f"SUCCESS {ref}")
                unacked.clear()
            else:
                _wait_ready(rig, start)
        # Faults stop; the journal is worked off.
        simulator.clear_faults()
        _work_off(rig)
        assert rig.stop() == 0
        rows = rig.journal()
    finally:
        rig.close()

    print("faults:", dict(sorted(counts.items())))
    unfinished = [r for r in rows if not r["final"]]
    assert unfinished == [], f"seed {seed}: unfinished {unfinished}"
    journal_vended = {r["ref"] for r in rows if r["state"] == "vended"}
    holding = {t.partner_trans_id for t in simulator.ledger.trades() if t.holds_money}
    # No vend without money, no money without a vend.
    assert vended - holding == set(), f"seed {seed}: vended without money"
    assert holding - vended == set(), f"seed {seed}: money without a vend"
    assert journal_vended == vended, f"seed {seed}: journal disagrees with the VMC"
    # No code charged twice.
    charged = Counter(t.buyer_code_hash for t in simulator.ledger.trades() if t.charged)
    assert max(charged.values(), default=0) <= 1, f"seed {seed}: a code charged twice"
    assert all(t.partner == PARTNER for t in simulator.ledger.trades())
    print(
        f"transactions {TRANSACTIONS}, kills {counts['kills']}, vended {len(vended)}, violations 0"
    )


def _kill_mid_sale(rig: DaemonRig, rng: random.Random) -> bool:
    """SIGKILL the daemon a random moment into the sale."""
    pause = rng.uniform(0.0, 0.6)
    deadline = time.monotonic() + pause
    while (remaining := deadline - time.monotonic()) > 0:
        line = rig.vmc.read_line(remaining)  # the VMC stays silent: the vend is interrupted
        if line is None:
            break
    rig.signal(signal.SIGKILL)
    rig.wait_exit()
    return True


def _play_vmc(rig: DaemonRig, answer: str, vended: set[str], unacked: set[str]) -> None:
    """Read the kiosk's verdict for this scan; act as the controller when approved."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = rig.vmc.read_line(deadline - time.monotonic())
        if line is None:
            return
        if line.startswith("DENIED"):
            return
        if line.startswith("APPROVED "):
            ref = line.split(" ")[1]
            if answer == "success":
                rig.vmc.write_line(f"SUCCESS {ref}")
                vended.add(ref)
                unacked.add(ref)
                if rig.vmc.expect("ACK ", 5) == f"ACK {ref}":
                    unacked.discard(ref)
            elif answer == "failure":
                rig.vmc.write_line(f"FAILURE {ref}")
                rig.vmc.expect("ACK ", 5)
            return


def _wait_ready(rig: DaemonRig, start: int) -> None:
    """The sale that began at log line `start` has ended, and the red light (if any) is over."""
    done = rig.wait_log_after(
        start,
        lambda e: e.get("event") in ("payment.result", "scan.rejected", "scan.ignored"),
        20,
        "payment.result",
    )
    rig.wait_log_after(
        done + 1,
        lambda e: e.get("event") == "indicator" and e.get("state") in ("ready", "offline"),
        10,
        "ready",
    )


def _work_off(rig: DaemonRig) -> None:
    deadline = time.monotonic() + 120
    pause = __import__("threading").Event()
    while time.monotonic() < deadline:
        if all(r["final"] for r in rig.journal()):
            return
        pause.wait(0.5)  # the worker retries with backoff; poll the journal export
    raise AssertionError("journal not worked off in 120 s")
