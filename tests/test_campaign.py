"""The fault campaign: many transactions through the real daemon (serial scanner and VMC on
ptys, the simulator on loopback) with a fault drawn at random for each, SIGKILLs and SIGHUPs of
the daemon at random moments, restarts a day and a half later and a long outage. At the end the
faults stop, the journal is worked off, and the simulator's ledger, the VMC's log and
`kiosk journal --json` must agree on the money rules; no file under the state directory (and no
log line) may hold a whole payment code.

Fault kinds (tests/campaign_kinds.py): the magic codes and plans of the first campaign, and
unsigned `is_success=F` answers (also after the effect), another trade's signed answers and
answers without the fields that say which trade, odd error strings, wall-clock jumps. Events
scheduled at random transactions: SIGKILL mid-sale, SIGHUP mid-sale (the config rewritten, now
and then with another `trans_name`), `late_restart` (killed with a pay open, both clocks ~30 h
on, restarted), `long_outage` (HTTP 500 or refused connections until one transaction was retried
over 1,000 times with `alipay.retry_max_s` tiny, then back).

`make test` runs a short campaign; `make soak` a long one (KIOSK_SOAK_TRANSACTIONS=2000).
The seed is printed; KIOSK_CAMPAIGN_SEED=<seed> replays a run. KIOSK_CAMPAIGN_FAULTS=a,b draws
only those kinds; KIOSK_CAMPAIGN_EVENTS=kill,reload,late_restart,long_outage schedules only those
events (empty: none); KIOSK_CAMPAIGN_OUTAGE=http_500|refused picks the outage's kind. The clock
faults (clock_jump, late_restart) need libfaketime (Debian package `faketime`); without it they
are left out, with a warning that says so (KIOSK_RIG_NO_FAKETIME=1 plays that).

The rig's controller dispenses at once when it reads APPROVED; when its thread was starved, or it
read APPROVED while waiting for a fault's moment, its SUCCESS can come after the kiosk's
vend.timeout_s. The kiosk logs that as vend.report_late and reverses the charge, as SPEC section 4
says: counted ("dispensed after the vend timeout"), not a violation, unless the rig wrote it
promptly. The long outage has no wall-clock window: the count goes on while retries keep coming.

Every violation is reported with the transaction and fault kind it belongs to
(`#17 unsigned_pay[ILLEGAL_SIGN charged]: ...`); the run prints the count per fault kind, kills,
reloads, clock jumps (and how many the daemon's log stamps showed), and seconds per kind.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from kiosk.simulator.services import code_hash
from tests.campaign_checks import (
    Attribution,
    by_kind,
    codes_in_log,
    codes_on_disk,
    money_violations,
)
from tests.campaign_kinds import CLOCK_KINDS, KINDS, VMC_ANSWERS, Setup, late_restart
from tests.daemon_rig import DaemonRig, faketime_problem

pytestmark = pytest.mark.slow

TRANSACTIONS = int(os.environ.get("KIOSK_SOAK_TRANSACTIONS", "200"))
KILLS = max(20, TRANSACTIONS // 10)
RELOADS = max(20, TRANSACTIONS // 10)
LATE_RESTARTS = max(2, TRANSACTIONS // 100)
OUTAGES = max(1, TRANSACTIONS // 500)
EVENTS = ("long_outage", "late_restart", "reload", "kill")  # the rarer first
LATE_SHIFT_S = 30 * 3600.0  # past the Beijing-day cancel window, whatever the hour
OUTAGE_RETRIES = 1000
# While retries keep coming (none STALL_S apart), the worker is not wedged, however loaded the
# machine: the count goes on. This cap only ends a run that crawls (a retry per 1.8 s).
OUTAGE_WAIT_S = 1800.0
STALL_S = 15.0  # no retry for this long: the worker stopped trying
SETTLE_WAIT_S = 30.0  # for the outage's transactions to settle once the gateway is back
# The compressed clock for the outage: the worker's backoff ceiling, and queries
# (`alipay.retry_max_s` is new in the config; a daemon that does not know it refuses the reload).
OUTAGE_CONFIG = {"retry_max_s": 0.002, "query_interval_s": 0.05}
TIMINGS = {"pay_timeout_s": 0.4, "query_interval_s": 0.1, "query_deadline_s": 0.8}
VEND_TIMEOUT_S = 1.2  # the controller's silence counts as FAILURE after this
# A SUCCESS the rig wrote this soon after reading APPROVED is on time, however loaded the
# machine: a kiosk that takes it as late has a vend timer that fires early.
PROMPT_REPORT_S = VEND_TIMEOUT_S / 4


@dataclass
class Jump:
    seconds: float  # on top of the base offset
    since: float  # real wall clock when it was set
    until: float  # monotonic: when it is taken back (at the next transaction after this)


@dataclass
class Campaign:
    seed: int
    rig: DaemonRig
    sim: GatewaySimulator
    rng: random.Random
    clock: bool  # the daemon runs under libfaketime
    who: Attribution = field(default_factory=Attribution)
    codes: set[str] = field(default_factory=set)
    vended: set[str] = field(default_factory=set)  # refs the VMC dispensed (its own log)
    unacked: set[str] = field(default_factory=set)  # dispensed, ACK not seen: re-reported
    # Dispensed after the kiosk's vend.timeout_s (it logged vend.report_late): the controller
    # broke SPEC section 4, the kiosk reversed the charge as it must. Counted, not a violation.
    late: set[str] = field(default_factory=set)
    kinds: Counter[str] = field(default_factory=Counter)  # transactions per fault kind
    events: Counter[str] = field(default_factory=Counter)  # kills, reloads, ...
    seconds: Counter[str] = field(default_factory=Counter)  # time spent per fault kind
    findings: list[str] = field(default_factory=list)  # violations seen during the run
    base_offset_s: float = 0.0  # the daemon's wall clock (and the simulator's) moved this far
    jump: Jump | None = None  # a wall-clock jump of the daemon in force
    label: str = ""  # the transaction in hand, for messages

    def find(self, what: str) -> None:
        self.findings.append(f"{self.label}: {what}")


def test_fault_campaign_keeps_every_money_rule(tmp_path: Path, simulator: GatewaySimulator) -> None:
    seed = int(os.environ.get("KIOSK_CAMPAIGN_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    problem = faketime_problem()
    clock = problem is None
    kinds = _kinds(clock)
    events = _events()
    print(
        f"campaign seed {seed} ({TRANSACTIONS} transactions, kinds: {len(kinds)}, events: "
        f"{','.join(events) or 'none'})"
    )
    if not clock:
        message = f"clock fault kinds {', '.join(CLOCK_KINDS)} left out: {problem}"
        print(message)
        warnings.warn(message, stacklevel=1)
    rig = DaemonRig(
        tmp_path,
        simulator,
        declined_hold_s=0.2,
        faketime=clock,
        extra_config={"vend": {"timeout_s": VEND_TIMEOUT_S}},
        **TIMINGS,
    )
    c = Campaign(seed, rig, simulator, rng, clock)
    schedule = _schedule(rng, events, clock)
    started = time.monotonic()
    try:
        rig.start()
        for i in range(TRANSACTIONS):
            event = schedule.get(i)
            if event == "long_outage":
                kind = "long_outage"
            elif event == "late_restart":
                kind = "late_restart"
            else:
                kind = rng.choice(kinds)
            began = time.monotonic()
            try:
                _transaction(c, i, kind, event)
                c.seconds[kind] += time.monotonic() - began
            except AssertionError as exc:
                raise AssertionError(_context(c, f"{c.label}: {exc}")) from None
        # Faults stop; the clocks agree again; the journal is worked off.
        c.label = "end"
        simulator.clear_faults()
        _end_jump(c, now=True)
        left = _work_off(rig)
        status = rig.stop()
        if status != 0:
            c.find(f"kiosk run exited {status} on SIGTERM")
        _codes_on_disk(c, "end", "after a clean stop")
        rows = rig.journal()
    finally:
        rig.close()

    logged = codes_in_log(rig.raw_log, c.codes)
    if logged:
        c.findings.append(
            f"log: {len(logged)} whole payment codes in the daemon's log {logged[:3]}"
        )
    violations = c.findings + money_violations(simulator, rows, c.vended, c.who)
    if left:
        violations.append(f"end: journal not worked off in 120 s ({left} unfinished)")
    elapsed = time.monotonic() - started
    print("faults:", dict(sorted(c.kinds.items())))
    print(
        "seconds per transaction:",
        {k: round(c.seconds[k] / n, 1) for k, n in sorted(c.kinds.items())},
    )
    print("events:", dict(sorted(c.events.items())))
    print(
        f"transactions {TRANSACTIONS}, kills {c.events['kills']}, reloads {c.events['reloads']}, "
        f"vended {len(c.vended)}, dispensed after the vend timeout {len(c.late)}, "
        f"violations {len(violations)}, {elapsed:.0f} s"
    )
    if violations:
        print("violations by fault kind:", dict(sorted(by_kind(violations).items())))
        for line in violations:
            print("  ", line[:300])
    assert not violations, _context(
        c,
        f"{len(violations)} violations, by kind {dict(sorted(by_kind(violations).items()))}:\n"
        + "\n".join(line[:300] for line in violations[:40]),
    )


# One transaction -------------------------------------------------------------------------------


def _transaction(c: Campaign, i: int, kind: str, event: str | None) -> None:
    rig, sim, rng = c.rig, c.sim, c.rng
    if kind == "long_outage":
        _long_outage(c, i)
        return
    _end_jump(c)
    setup = late_restart(rng) if kind == "late_restart" else KINDS[kind](rng)
    code = _code(c, i, kind, setup)
    c.kinds[kind] += 1
    for plan in setup.general:
        sim.inject(plan)
    for plan in setup.for_code:
        sim.inject_for_code(code, plan)
    if setup.offline:
        sim.go_offline()
    answer = setup.answer or rng.choice(VMC_ANSWERS)
    start = len(rig.logs)
    rig.scanner.write_line(code)
    killed = event in ("kill", "late_restart")
    # Things that happen a random moment into the sale; the VMC's lines meanwhile are kept.
    actions: list[tuple[float, str]] = []
    if event == "reload":
        actions.append((rng.uniform(0.0, 0.8), "reload"))
    if setup.clock_jump_s is not None:
        actions.append((rng.uniform(0.0, 0.8), "jump"))
    if killed:
        actions.append(
            (rng.uniform(0.1, 0.7) if event == "late_restart" else rng.uniform(0, 0.6), "kill")
        )
    pending: list[str] = []
    reload_marks: list[int] = []
    began = time.monotonic()
    for at, action in sorted(actions, key=lambda a: (a[1] == "kill", a[0])):
        _read_until(rig, began + at, pending)
        if action == "reload":
            reload_marks.append(_reload(c, i, rng))
        elif action == "jump":
            assert setup.clock_jump_s is not None
            _start_jump(c, setup.clock_jump_s)
        else:
            rig.signal(signal.SIGKILL)
            rig.wait_exit()
    if not killed:
        _play_vmc(c, answer, pending)
    if setup.offline:
        sim.go_online()
    sim.clear_faults()
    _note_refs(c, start)
    if killed:
        c.events["kills"] += 1
        if event == "late_restart":
            c.events["late_restarts"] += 1
        _codes_on_disk(c, f"#{i} sigkill", "right after SIGKILL")
        if event == "late_restart":
            _end_jump(c, now=True)
            sim.shift_clock(LATE_SHIFT_S + rng.uniform(0, 3600))
            c.base_offset_s = sim.ledger.clock_offset_s
            rig.set_wall_offset(c.base_offset_s)
        _restart(c)  # under a jump in force, if any
        return
    _alive(c)
    _wait_ready(c, start)
    for mark in reload_marks:
        _reload_outcome(c, mark)


# Wall-clock jumps ---------------------------------------------------------------------------


def _start_jump(c: Campaign, seconds: float) -> None:
    """The daemon's wall clock jumps (its monotonic clock does not), for 3 to 8 s: long
    enough for libfaketime to pass it on, and for transactions to be open across it."""
    _end_jump(c, now=True)
    c.rig.set_wall_offset(c.base_offset_s + seconds)
    c.jump = Jump(seconds, time.time(), time.monotonic() + c.rng.uniform(3.0, 8.0))
    c.events["clock_jumps"] += 1


def _end_jump(c: Campaign, now: bool = False) -> None:
    """Take a jump back once its time is up (or `now`); count it as seen when the daemon's
    log stamps showed the jumped clock."""
    jump = c.jump
    if jump is None or (not now and time.monotonic() < jump.until):
        return
    c.jump = None
    expected = c.base_offset_s + jump.seconds
    if any(
        abs(_stamp(e) - e["_rx"] - expected) < 30
        for e in c.rig.logs
        if e.get("_rx", 0) >= jump.since and isinstance(e.get("ts"), str)
    ):
        c.events["clock_jumps_seen"] += 1
    c.rig.set_wall_offset(c.base_offset_s)


def _stamp(entry: dict[str, Any]) -> float:
    """A log line's `ts` (the daemon's wall clock) in epoch seconds."""
    text = str(entry["ts"]).rstrip("Z")
    try:
        moment = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return float("nan")
    return moment.timestamp() + float("0" + text[19:] if text[19:20] == "." else 0)


def _code(c: Campaign, i: int, kind: str, setup: Setup) -> str:
    code = f"28{c.seed % 1000:03d}{i:09d}{setup.suffix}"
    c.label = f"#{i} {kind}" + (f"[{setup.detail}]" if setup.detail else "")
    c.codes.add(code)
    c.who.add_code(code, c.label)
    return code


def _codes_on_disk(c: Campaign, label: str, when: str) -> None:
    """SPEC rule 6: no file under the state directory holds a whole payment code."""
    hits = codes_on_disk(c.rig.state_dir, c.codes)
    if hits:
        files = ", ".join(sorted({name for name, _ in hits}))
        whose = Counter(
            c.who.by_code_hash.get(code_hash(code), "?").split(" ", 1)[-1].split("[")[0]
            for code in {code for _, code in hits}
        )
        c.findings.append(
            f"{label}: {len(hits)} whole payment codes on disk {when} (in {files}; codes of "
            f"{', '.join(f'{kind} x{n}' for kind, n in whose.most_common(6))})"
        )


def _note_refs(c: Campaign, start: int) -> None:
    """The refs the daemon started since log entry `start` belong to this transaction."""
    for entry in c.rig.logs[start:]:
        if entry.get("event") == "payment.start" and entry.get("ref"):
            c.who.by_ref.setdefault(str(entry["ref"]), c.label)


def _restart(c: Campaign) -> None:
    c.rig.start()
    mark = len(c.rig.logs)
    for ref in sorted(c.unacked):
        c.rig.vmc.write_line(f"SUCCESS {ref}")
    for ref in sorted(c.unacked):
        if _report_was_late(c, mark, ref):
            c.vended.discard(ref)
            c.late.add(ref)
    c.unacked.clear()


def _alive(c: Campaign) -> None:
    """A daemon that exits by itself has crashed: that ends the run."""
    proc = c.rig.proc
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"the daemon exited by itself (status {proc.returncode})")


def _read_until(rig: DaemonRig, moment: float, pending: list[str]) -> None:
    """Read the VMC's lines until `moment`, keeping them for `_play_vmc`."""
    while (remaining := moment - time.monotonic()) > 0:
        line = rig.vmc.read_line(remaining)
        if line is None:
            break
        pending.append(line)


def _play_vmc(c: Campaign, answer: str, pending: list[str]) -> None:
    """Read the kiosk's verdict for this scan; act as the controller when approved."""
    rig = c.rig
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fresh = not pending  # read now, not kept while the rig waited for a fault's moment
        line = pending.pop(0) if pending else rig.vmc.read_line(deadline - time.monotonic())
        read_at = time.monotonic()
        if line is None:
            return
        if line.startswith("DENIED"):
            return
        if line.startswith("APPROVED "):
            ref = line.split(" ")[1]
            if answer == "success":
                mark = len(rig.logs)
                rig.vmc.write_line(f"SUCCESS {ref}")
                written = time.monotonic()
                c.vended.add(ref)
                c.unacked.add(ref)
                acked = rig.vmc.expect("ACK ", 5) == f"ACK {ref}"
                if acked:
                    c.unacked.discard(ref)
                # Without the ACK (a kill) the kiosk may still have logged its word.
                if _report_was_late(c, mark, ref, 5 if acked else 1):
                    c.vended.discard(ref)
                    c.unacked.discard(ref)
                    c.late.add(ref)
                    if fresh and written - read_at < PROMPT_REPORT_S:
                        c.find(
                            f"SUCCESS {ref} written {written - read_at:.2f} s after APPROVED "
                            f"was taken as late (vend.timeout_s {VEND_TIMEOUT_S})"
                        )
            elif answer == "failure":
                rig.vmc.write_line(f"FAILURE {ref}")
                rig.vmc.expect("ACK ", 5)
            return


def _report_was_late(c: Campaign, mark: int, ref: str, timeout_s: float = 5) -> bool:
    """Did the kiosk take the SUCCESS just ACKed as late (its vend.timeout_s had passed, the
    charge is being reversed)? Its log says which, just before the ACK went out. The rig's
    controller is late when its thread was starved, or it read APPROVED while waiting for a
    fault's moment; a real one that dispensed late gave the product away by its own fault."""
    events = ("vend.report", "vend.report_late", "vend.report_repeated", "vend.report_claimed")
    try:
        index = c.rig.wait_log_after(
            mark,
            lambda e: e.get("event") in events and str(e.get("ref")) == ref,
            timeout_s,
            f"the kiosk's word on SUCCESS {ref}",
        )
    except AssertionError:
        return False  # not logged: counted as dispensed, so the checks judge it
    entry = c.rig.logs[index]
    return entry.get("event") == "vend.report_late" or (
        entry.get("event") == "vend.report_repeated" and entry.get("settled") == "timed_out"
    )


def _wait_ready(c: Campaign, start: int) -> None:
    """The sale that began at log line `start` has ended, and the red light (if any) is over.
    A sale whose thread failed (the daemon lives on) is a finding."""
    rig = c.rig
    done = rig.wait_log_after(
        start,
        lambda e: (
            e.get("event") in ("payment.result", "scan.rejected", "scan.ignored")
            or e.get("message") == "sale failed"
        ),
        20,
        "payment.result",
    )
    if rig.logs[done].get("message") == "sale failed":
        why = str(rig.logs[done].get("exception", "")).strip().splitlines()[-1:]
        c.find(f"the sale's thread failed: {why[0][:200] if why else '?'}")
    if rig.logs[done].get("event") in ("scan.rejected", "scan.ignored"):
        # No sale started (under heavy load a pty can split a scan past the scanner's idle
        # timeout): the lights never left ready, so there is no light to wait for.
        c.events["scans_lost"] += 1
        return
    rig.wait_log_after(
        done + 1,
        lambda e: e.get("event") == "indicator" and e.get("state") in ("ready", "offline"),
        10,
        "ready",
    )


# SIGHUP ------------------------------------------------------------------------------------


def _reload(c: Campaign, i: int, rng: random.Random, **alipay: Any) -> int:
    """Rewrite the config (the same, or with another harmless `trans_name`) and send SIGHUP.
    Returns the log index to look for the daemon's answer from."""
    if rng.random() < 0.5:
        alipay.setdefault("trans_name", f"Vending purchase {i}")
    else:
        alipay.setdefault("trans_name", None)  # the default again
    c.rig.rewrite_config(alipay)
    mark = len(c.rig.logs)
    c.rig.signal(signal.SIGHUP)
    c.events["reloads"] += 1
    return mark


def _reload_outcome(c: Campaign, mark: int) -> bool:
    try:
        index = c.rig.wait_log_after(
            mark,
            lambda e: e.get("event") in ("config.reloaded", "config.reload_failed"),
            10,
            "config.reloaded",
        )
    except AssertionError:
        c.find("SIGHUP: neither config.reloaded nor config.reload_failed in 10 s")
        return False
    entry = c.rig.logs[index]
    if entry["event"] == "config.reload_failed":
        c.events["reloads_refused"] += 1
        return False
    return True


# The scheduled long outage ----------------------------------------------------------------------


def _long_outage(c: Campaign, i: int) -> None:
    """With the worker's backoff ceiling compressed to milliseconds, the gateway answers HTTP
    500 (or refuses connections) until one open transaction was retried more than 1,000 times;
    younger transactions wait behind it. Then it comes back: all of them must settle, and the
    daemon must have raised the retry-ceiling alarm."""
    rig, sim, rng = c.rig, c.sim, c.rng
    _end_jump(c, now=True)
    mode = rng.choice(("http_500", "refused"))
    mode = os.environ.get("KIOSK_CAMPAIGN_OUTAGE", mode)
    setup = Setup("0008", detail=mode)
    code = _code(c, i, "long_outage", setup)
    c.kinds["long_outage"] += 1
    c.events["long_outages"] += 1
    compressed = _reload_outcome(c, _reload(c, i, rng, **OUTAGE_CONFIG))
    if not compressed:
        # Without the compressed clock a thousand retries take days: no outage to play.
        c.find(f"the daemon refused the config with {OUTAGE_CONFIG}; no outage played")
        _reload_outcome(c, _reload(c, i, rng, **{key: TIMINGS.get(key) for key in OUTAGE_CONFIG}))
        return

    # The first sale: charged, its answer lost; then the outage starts.
    sim.inject_for_code(code, FaultPlan(Fault.DROP_AFTER_CHARGE))
    if mode == "http_500":
        for service in ("query", "cancel", "refund"):
            sim.inject(FaultPlan(Fault.HTTP_500, service, charge=False, times=0))
    start = len(rig.logs)
    rig.scanner.write_line(code)
    entry = rig.logs[
        rig.wait_log_after(start, lambda e: e.get("event") == "payment.start", 10, "start")
    ]
    ref = str(entry["ref"])
    c.who.by_ref[ref] = c.label
    if mode == "refused":
        rig.wait_log_after(
            start,
            lambda e: e.get("event") == "alipay.call" and e.get("partner_trans_id") == ref,
            10,
            "the pay's answer",
        )
        sim.go_offline()
    _play_vmc(c, "success", [])
    _wait_ready(c, start)

    # Younger sales behind it: paid or not, their answers lost too (refused: never sent).
    refs = [ref]
    for n in range(rng.randint(1, 2)):
        younger = f"28{c.seed % 1000:03d}{i:09d}{10 + n:04d}"
        c.codes.add(younger)
        c.who.add_code(younger, c.label)
        sim.inject_for_code(younger, FaultPlan(Fault.HTTP_500, charge=rng.random() < 0.5))
        mark = len(rig.logs)
        rig.scanner.write_line(younger)
        _play_vmc(c, "success", [])
        _wait_ready(c, mark)
        _note_refs(c, mark)
        refs += [r for r, label in c.who.by_ref.items() if label == c.label and r not in refs]

    # Retries of the first transaction: each one an answered request (HTTP 500) or a refused
    # connection, as the daemon logs them.
    def retry(e: dict[str, Any]) -> bool:
        if mode == "refused":
            return e.get("event") == "alipay.not_sent"
        return (
            e.get("event") == "alipay.call"
            and e.get("partner_trans_id") == ref
            and e.get("service") != "alipay.acquire.overseas.spot.pay"
        )

    t0 = time.monotonic()
    seen = 0
    while seen <= OUTAGE_RETRIES and time.monotonic() - t0 < OUTAGE_WAIT_S:
        before = seen
        seen = rig.wait_count_after(start, retry, max(seen + 50, OUTAGE_RETRIES + 1), STALL_S)
        if seen == before:
            break  # no retry for STALL_S: the worker has stopped trying
    took = time.monotonic() - t0
    c.events["outage_retries"] += seen
    if seen <= OUTAGE_RETRIES:
        c.find(f"{mode}: only {seen} retries of {ref} in {took:.0f} s")
    alarm = [
        e
        for e in rig.logs[start:]
        if e.get("event") == "alarm" and e.get("kind") == "retry_ceiling"
    ]
    if not alarm:
        c.find(f"no alarm with kind retry_ceiling after {seen} retries of {ref}")
    elif not any(e.get("ref") in (None, ref) for e in alarm):
        c.find(f"retry_ceiling alarms only for other refs: {[e.get('ref') for e in alarm]}")

    # The gateway comes back, the backoff ceiling too.
    sim.clear_faults()
    if mode == "refused":
        sim.go_online()
    restore = {key: TIMINGS.get(key) for key in OUTAGE_CONFIG}
    _reload_outcome(c, _reload(c, i, rng, **restore))
    if not _settled(rig, set(refs), SETTLE_WAIT_S):
        c.find(f"not settled {SETTLE_WAIT_S:.0f} s after the outage ended: {sorted(refs)}")
    exact = sum(
        1
        for s in c.sim.requests_seen
        if s.service != "pay"
        and ref in (s.params.get("partner_trans_id"), s.params.get("out_trade_no"))
    )
    print(
        f"long outage ({mode}): {seen} retries of {ref} logged in {took:.1f} s, "
        f"{exact} reached the gateway"
    )


def _settled(rig: DaemonRig, refs: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        rows = {r["ref"]: r for r in rig.journal()}
        if all(rows.get(ref, {}).get("final") for ref in refs):
            return True
        pause.wait(0.5)  # the journal export is a subprocess; poll it
    return False


# The run ----------------------------------------------------------------------------------------


def _kinds(clock: bool) -> list[str]:
    chosen = [
        k.strip() for k in os.environ.get("KIOSK_CAMPAIGN_FAULTS", "").split(",") if k.strip()
    ]
    unknown = set(chosen) - set(KINDS)
    assert not unknown, (
        f"KIOSK_CAMPAIGN_FAULTS: unknown kinds {sorted(unknown)}; known: {sorted(KINDS)}"
    )
    kinds = chosen or list(KINDS)
    if not clock:
        kinds = [k for k in kinds if k not in CLOCK_KINDS] or ["none"]
    return kinds


def _events() -> list[str]:
    raw = os.environ.get("KIOSK_CAMPAIGN_EVENTS")
    if raw is None:
        return list(EVENTS)
    chosen = [e.strip() for e in raw.split(",") if e.strip()]
    unknown = set(chosen) - set(EVENTS)
    assert not unknown, f"KIOSK_CAMPAIGN_EVENTS: unknown {sorted(unknown)}; known: {EVENTS}"
    return chosen


def _schedule(rng: random.Random, events: list[str], clock: bool) -> dict[int, str]:
    """Which transactions get which event: disjoint random sets."""
    wanted = {
        "kill": KILLS,
        "reload": RELOADS,
        "late_restart": LATE_RESTARTS if clock else 0,
        "long_outage": OUTAGES,
    }
    # Not in the first transactions: the replay kinds need other trades to replay.
    slots = rng.sample(
        range(min(5, TRANSACTIONS // 2), TRANSACTIONS), TRANSACTIONS - min(5, TRANSACTIONS // 2)
    )
    schedule: dict[int, str] = {}
    for name in EVENTS:
        if name in events:
            for _ in range(min(wanted[name], len(slots))):
                schedule[slots.pop()] = name
    return schedule


def _work_off(rig: DaemonRig) -> int:
    """Wait up to 120 s for every transaction to be final (or in attention); return how many
    are not."""
    deadline = time.monotonic() + 120
    pause = threading.Event()
    left = 0
    while time.monotonic() < deadline:
        left = sum(1 for r in rig.journal() if not r["final"] and r["state"] != "attention")
        if left == 0:
            return 0
        pause.wait(0.5)  # the worker retries with backoff; poll the journal export
    return left


def _context(c: Campaign, message: str) -> str:
    proc = c.rig.proc
    alive = proc is None or proc.poll() is None
    return (
        f"seed {c.seed} (replay: KIOSK_CAMPAIGN_SEED={c.seed}): {message}"
        + (
            ""
            if alive
            else f"\nthe daemon is not running (status {proc.returncode if proc else '?'})"
        )
        + "\nlast daemon log lines:\n  "
        + "\n  ".join(line[:300] for line in c.rig.raw_log[-12:])
    )
