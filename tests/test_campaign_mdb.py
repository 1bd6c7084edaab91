"""The fault campaign with the kiosk as an MDB cashless device: `kiosk run` as a subprocess with
`[vend] driver = "mdb"` on the board emulator's pty and `[sale] mode = "vmc"`; the machine
selects before each scan and answers an approval with success, `c,ERR,VEND 3`, a dropped
request or silence at random, and now and then the customer cancels while the payment is in
flight. Faults are drawn from a few of the campaign's kinds; the daemon is SIGKILLed at random
moments. At the end the simulator's ledger, the machine's own log of what it dispensed and
`kiosk journal --json` must agree on every money rule (tests/campaign_checks.py), and no file
under the state directory nor log line may hold a whole payment code.

Shorter than tests/test_campaign.py: KIOSK_MDB_CAMPAIGN_TRANSACTIONS (60), one kill in ten.
The seed is printed; KIOSK_CAMPAIGN_SEED=<seed> replays a run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.mdb_board import MdbBoard
from kiosk.simulator import GatewaySimulator
from tests.campaign_checks import by_kind, codes_in_log, money_violations
from tests.campaign_kinds import KINDS
from tests.daemon_rig import DaemonRig
from tests.test_campaign import (
    TIMINGS,
    VEND_TIMEOUT_S,
    Campaign,
    _alive,
    _code,
    _codes_on_disk,
    _context,
    _note_refs,
    _wait_ready,
    _work_off,
)

pytestmark = pytest.mark.slow

TRANSACTIONS = int(os.environ.get("KIOSK_MDB_CAMPAIGN_TRANSACTIONS", "60"))
KILLS = max(1, TRANSACTIONS // 10)
FAULTS = (
    "none",
    "decline",
    "confirm_on_phone",
    "slow_after_charge",
    "drop_after_charge",
    "forged_signature",
    "offline",
)
# What the machine does once the kiosk approved (C,VEND); "cancel": the customer cancels on
# the machine while the payment is in flight (the request is dropped before any approval).
MACHINE = ("success", "success", "success", "fail", "drop", "silence", "cancel")
PRICE = "1.50"
WAIT_S = 15.0


@pytest.fixture
def board() -> Iterator[MdbBoard]:
    board = MdbBoard.on_pty().start()
    try:
        yield board
    finally:
        board.close()


def test_mdb_fault_campaign_keeps_every_money_rule(
    tmp_path: Path, simulator: GatewaySimulator, board: MdbBoard
) -> None:
    seed = int(os.environ.get("KIOSK_CAMPAIGN_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"MDB campaign seed {seed} ({TRANSACTIONS} transactions, {KILLS} kills)")
    assert board.device is not None
    rig = DaemonRig(
        tmp_path,
        simulator,
        declined_hold_s=0.2,
        extra_config={
            "sale": {"mode": "vmc", "price": None, "item": None, "scan_timeout_s": 5},
            "vend": {"driver": "mdb", "port": board.device, "timeout_s": VEND_TIMEOUT_S},
        },
        **TIMINGS,
    )
    c = Campaign(seed, rig, simulator, rng, clock=False)
    kills = set(rng.sample(range(3, TRANSACTIONS), KILLS))
    started = time.monotonic()
    try:
        rig.start()
        for i in range(TRANSACTIONS):
            kind = rng.choice(FAULTS)
            began = time.monotonic()
            try:
                _transaction(c, board, i, kind, killed=i in kills)
            except AssertionError as exc:
                raise AssertionError(
                    _context(c, f"{c.label}: {exc}; board: {board.status()}")
                ) from None
            c.seconds[kind] += time.monotonic() - began
        c.label = "end"
        simulator.clear_faults()
        simulator.go_online()
        left = _work_off(rig)
        status = rig.stop()
        if status != 0:
            c.find(f"kiosk run exited {status} on SIGTERM")
        if board.reader_on():
            c.find("the reader is still on after the kiosk stopped (no C,0)")
        _codes_on_disk(c, "end", "after a clean stop")
        rows = rig.journal()
    finally:
        rig.close()

    logged = codes_in_log(rig.raw_log, c.codes)
    if logged:
        c.findings.append(f"log: {len(logged)} whole payment codes in the daemon's log")
    violations = c.findings + money_violations(simulator, rows, c.vended, c.who)
    if left:
        violations.append(f"end: journal not worked off in 120 s ({left} unfinished)")
    elapsed = time.monotonic() - started
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    print("faults:", dict(sorted(c.kinds.items())))
    print("machine:", dict(sorted(c.events.items())))
    print("journal:", dict(sorted(states.items())))
    print(
        f"transactions {TRANSACTIONS}, kills {c.events['kills']}, vended {len(c.vended)}, "
        f"violations {len(violations)}, {elapsed:.0f} s"
    )
    for line in violations:
        print("  ", line[:300])
    assert not violations, _context(
        c,
        f"{len(violations)} violations, by kind {dict(sorted(by_kind(violations).items()))}:\n"
        + "\n".join(line[:300] for line in violations[:40]),
    )


def _transaction(c: Campaign, board: MdbBoard, i: int, kind: str, killed: bool) -> None:
    rig, sim, rng = c.rig, c.sim, c.rng
    setup = KINDS[kind](rng)
    code = _code(c, i, kind, setup)
    c.kinds[kind] += 1
    # The machine offers the cashless device only while the kiosk has it on (C,1).
    assert board.wait_reader(True, WAIT_S), "the reader never came back on"
    start = len(rig.logs)
    board.skip_to_end()
    assert board.select(PRICE, str(rng.randint(1, 60))), "the machine could not select"
    rig.wait_log_after(
        start,
        lambda e: e.get("event") in ("vend.selection", "mdb.request_refused"),
        WAIT_S,
        "vend.selection",
    )
    for plan in setup.general:
        sim.inject(plan)
    for plan in setup.for_code:
        sim.inject_for_code(code, plan)
    if setup.offline:
        sim.go_offline()
    answer = rng.choice(MACHINE)
    rig.scanner.write_line(code)
    if killed:
        # A random moment into the sale; the machine dispenses nothing the dead kiosk
        # approved (as the controller of tests/test_campaign.py), and the restarted kiosk
        # switches the reader off and on again, which ends the machine's request.
        board.next_line(rng.uniform(0.0, 0.6))  # a wait on the bus, not a sleep
        rig.signal(signal.SIGKILL)
        rig.wait_exit()
        c.events["kills"] += 1
        _codes_on_disk(c, f"#{i} sigkill", "right after SIGKILL")
        if setup.offline:
            sim.go_online()
        sim.clear_faults()
        _note_refs(c, start)
        rig.start()
        return
    _play_machine(c, board, answer, start)
    if setup.offline:
        sim.go_online()
    sim.clear_faults()
    _note_refs(c, start)
    _alive(c)
    _wait_ready(c, start)
    if board.request_open():  # after silence: the machine gives up on its request
        board.drop()


def _play_machine(c: Campaign, board: MdbBoard, answer: str, start: int) -> None:
    """The machine's side of one sale: wait for the kiosk's verdict on the bus and act."""
    rig = c.rig
    if answer == "cancel":
        # The customer cancels while the payment is in flight: nothing may be approved.
        rig.wait_log_after(start, lambda e: e.get("event") == "payment.start", WAIT_S, "start")
        board.drop()
        c.events["cancelled"] += 1
        return
    deadline = time.monotonic() + WAIT_S
    while (remaining := deadline - time.monotonic()) > 0:
        line = board.next_line(remaining)
        if line is None:
            break
        if line == "C,STOP":
            c.events["refused"] += 1
            return
        if line == "C,0":  # the kiosk went offline: the reader vanished, the request with it
            c.events["reader_off"] += 1
            return
        if line.startswith("C,VEND,"):
            approved = rig.logs[
                rig.wait_log_after(
                    start, lambda e: e.get("event") == "vend.approved", WAIT_S, "vend.approved"
                )
            ]
            ref = str(approved["ref"])
            if board.approved() is None:
                c.find(f"C,VEND the machine did not take: {line} ({ref})")
                return
            c.events[answer] += 1
            if answer == "success":
                board.success()
                c.vended.add(ref)
            elif answer == "fail":
                board.fail()
            elif answer == "drop":
                board.drop()
            return  # silence: the kiosk's vend.timeout_s runs out
    c.find("neither C,VEND, C,STOP nor C,0 within 15 s of the scan")
