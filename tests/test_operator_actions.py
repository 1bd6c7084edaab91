"""A person's actions on a transaction in attention: `kiosk journal retry REF` hands it back to
the journal worker where it resumes (the running daemon's worker takes it up, and the refund
goes through), `kiosk journal resolve REF --note` settles it for good; both are recorded with
who and when and shown by `kiosk journal`; any other transaction is refused (exit 2) and left
as it was."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kiosk.journal import JOURNAL_FILE, Journal, Transaction, TxnState
from kiosk.payment import refunds_paused
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator
from kiosk.worker import JournalWorker
from tests.conftest import PARTNER, payment_code
from tests.daemon_rig import DaemonRig, faketime_problem
from tests.test_worker import FakeFlow

ROOT = Path(__file__).resolve().parents[1]


def kiosk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def in_attention(journal: Journal, ref: str, refund: bool = True) -> Transaction:
    txn = journal.open_transaction(
        ref=ref,
        amount=Decimal("3.00"),
        currency="USD",
        item="snack",
        code_last4="0005",
        trans_create_time="20261129120000",
        first_request=("pay", {"partner_trans_id": ref}),
    )
    return journal.update(
        txn,
        state=TxnState.ATTENTION,
        refund_id=f"{ref}-R" if refund else None,
        error_code="REFUND_AMT_RESTRICTION",
        note="refund refused: needs a person",
    )


def raw_rows(state_dir: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(state_dir / JOURNAL_FILE)
    try:
        return conn.execute("SELECT * FROM transactions ORDER BY seq").fetchall() + [
            ("actions", *row) for row in conn.execute("SELECT * FROM operator_actions")
        ]
    finally:
        conn.close()


# -- the journal -------------------------------------------------------------------------------


def test_retry_resumes_a_refused_refund_with_the_same_refund_id(journal: Journal) -> None:
    in_attention(journal, "VM-A-1")
    txn = journal.retry_attention("VM-A-1", "alice")
    assert (txn.state, txn.refund_id, txn.final) == (TxnState.REFUNDING, "VM-A-1-R", False)
    assert [t.ref for t in journal.unfinished()] == ["VM-A-1"]
    (action,) = journal.operator_actions()["VM-A-1"]
    assert (action.action, action.by, action.from_state, action.to_state, action.note) == (
        "retry",
        "alice",
        "attention",
        "refunding",
        None,
    )
    assert action.at == txn.updated_at


def test_retry_without_a_refund_asked_starts_the_reversal_over_with_cancel(
    journal: Journal,
) -> None:
    in_attention(journal, "VM-A-2", refund=False)
    assert journal.retry_attention("VM-A-2", "alice").state is TxnState.CANCELLING


def test_resolve_is_final_and_never_worked_on_again(journal: Journal) -> None:
    in_attention(journal, "VM-A-3")
    txn = journal.resolve_attention("VM-A-3", "bob", "refunded by hand in the merchant portal")
    assert (txn.state, txn.final) == (TxnState.RESOLVED, True)
    assert journal.unfinished() == []
    exported = txn.export(journal.operator_actions()["VM-A-3"])
    assert exported["final"] is True and exported["buyer_code"] is None
    assert exported["actions"] == [
        {
            "action": "resolve",
            "by": "bob",
            "at": txn.updated_at,
            "from_state": "attention",
            "to_state": "resolved",
            "note": "refunded by hand in the merchant portal",
        }
    ]


def test_the_running_workers_next_pass_takes_up_a_retried_transaction(
    journal: Journal, tmp_path: Path
) -> None:
    in_attention(journal, "VM-A-4")
    flow = FakeFlow()
    flow.outcomes["VM-A-4"] = TxnState.REFUNDED
    worker = JournalWorker(flow, journal)  # type: ignore[arg-type]
    worker.work_off_due()
    assert flow.settled == []  # in attention: left to a person
    with Journal(tmp_path / "state", migrate=False) as command:  # `kiosk journal retry`
        command.retry_attention("VM-A-4", "alice")
    worker.work_off_due()
    assert flow.settled == ["VM-A-4"]


@pytest.mark.parametrize("state", [TxnState.VENDED, TxnState.CANCELLING, TxnState.RESOLVED])
def test_an_action_on_a_transaction_not_in_attention_is_refused_and_changes_nothing(
    journal: Journal, tmp_path: Path, state: TxnState
) -> None:
    txn = in_attention(journal, "VM-A-5")
    if state is TxnState.RESOLVED:
        journal.resolve_attention(txn.ref, "bob", "done")
    else:
        journal.update(txn, state=state)
    before = raw_rows(tmp_path / "state")
    why = "it is final" if state in (TxnState.VENDED, TxnState.RESOLVED) else "still working"
    for args, verb in ((["retry"], "retried"), (["resolve", "--note", "x"], "resolved")):
        done = kiosk("journal", *args, "VM-A-5", "--state-dir", str(tmp_path / "state"))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"kiosk: VM-A-5 is {state.value}, not in attention: ")
        assert why in done.stderr
        assert done.stderr.endswith(f"; only a transaction in attention can be {verb}\n")
    assert raw_rows(tmp_path / "state") == before


def test_an_unknown_ref_is_refused_with_exit_2(journal: Journal, tmp_path: Path) -> None:
    in_attention(journal, "VM-A-6")
    done = kiosk("journal", "retry", "VM-A-NOPE", "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert done.stderr == (
        f"kiosk: no transaction VM-A-NOPE in the journal {tmp_path / 'state' / JOURNAL_FILE}\n"
    )
    done = kiosk("journal", "retry", "VM-A-6", "--state-dir", str(tmp_path / "none"))
    assert (done.returncode, done.stderr) == (
        2,
        f"kiosk: no transaction VM-A-6: no journal in {tmp_path / 'none'} yet\n",
    )


# -- the command line --------------------------------------------------------------------------


def test_the_commands_record_the_unix_user_or_the_name_given_and_the_listing_shows_them(
    journal: Journal, tmp_path: Path
) -> None:
    in_attention(journal, "VM-A-7")
    in_attention(journal, "VM-A-8")
    state = str(tmp_path / "state")
    env = {"SUDO_USER": ""}
    retried = kiosk("journal", "retry", "VM-A-7", "--state-dir", state, env=env)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("VM-A-7: attention -> refunding, retried by ")
    # --state-dir may also come before the action; a payment code in a note is masked.
    resolved = kiosk(
        "journal",
        "--state-dir",
        state,
        "resolve",
        "VM-A-8",
        "--by",
        "Dana (field tech)",
        "--note",
        "buyer refunded in cash; code 286512345678901234 on the receipt",
    )
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.startswith("VM-A-8: attention -> resolved (final), by Dana (field")

    listed = json.loads(kiosk("journal", "--json", "--all", "--state-dir", state).stdout)
    by_ref = {row["ref"]: row for row in listed}
    me = pwd.getpwuid(os.getuid()).pw_name
    assert [(a["action"], a["by"]) for a in by_ref["VM-A-7"]["actions"]] == [("retry", me)]
    (action,) = by_ref["VM-A-8"]["actions"]
    assert action["note"] == "buyer refunded in cash; code " + "*" * 14 + "1234 on the receipt"
    assert (by_ref["VM-A-8"]["state"], by_ref["VM-A-8"]["final"]) == ("resolved", True)
    datetime.fromisoformat(action["at"].replace("Z", "+00:00"))  # ISO 8601, UTC
    assert b"286512345678901234" not in b"".join(
        f.read_bytes() for f in (tmp_path / "state").iterdir() if f.is_file()
    )

    table = kiosk("journal", "--state-dir", state).stdout
    assert f"VM-A-7  retry by {me} (attention -> refunding)" in table
    assert "VM-A-8  resolve by Dana (field tech) (attention -> resolved): buyer refunded" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resolve", "VM-A-9"], "the following arguments are required: --note"),
        (["resolve", "VM-A-9", "--note", "  "], "--note is empty"),
        (["resolve", "VM-A-9", "--note", "a\x1b[2Jb"], "--note holds a control character"),
        (["retry", "VM-A-9", "--by", "x" * 65], "--by is 65 characters; at most 64"),
        (["--json", "retry", "VM-A-9"], "--json and --all are for the listing, not for retry"),
    ],
)
def test_bad_usage_of_the_actions_is_exit_2_and_changes_nothing(
    journal: Journal, tmp_path: Path, args: list[str], message: str
) -> None:
    in_attention(journal, "VM-A-9")
    before = raw_rows(tmp_path / "state")
    done = kiosk("journal", *args, "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert message in done.stderr
    assert raw_rows(tmp_path / "state") == before


# -- beside a running kiosk --------------------------------------------------------------------


def _refund_refused(sim: GatewaySimulator, code: str) -> None:
    """Paid, the vend fails, cancel refused (retry_flag=N), every refund refused (signed)."""
    sim.inject_for_code(code, FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0))
    sim.inject_for_code(
        code, FaultPlan(Fault.DECLINE, "refund", error="REFUND_AMT_RESTRICTION", times=0)
    )


def _sell_into_attention(rig: DaemonRig, code: str) -> str:
    start = len(rig.logs)
    rig.scanner.write_line(code)
    approved = rig.vmc.expect("APPROVED ", 20)
    assert approved is not None, rig.raw_log[-10:]
    ref = approved.split(" ")[1]
    rig.vmc.write_line(f"FAILURE {ref}")
    rig.wait_log_after(
        start,
        lambda e: e.get("event") == "alarm" and e.get("ref") == ref,
        30,
        f"the attention alarm of {ref}",
    )
    done = rig.wait_log_after(
        start, lambda e: e.get("event") == "payment.result", 30, "payment.result"
    )
    rig.wait_log_after(  # the sale is over and the red light too: the next scan is taken
        done + 1,
        lambda e: e.get("event") == "indicator" and e.get("state") == "ready",
        10,
        "ready",
    )
    return ref


def _sent_for(sim: GatewaySimulator, ref: str) -> list[str]:
    return [
        s.service
        for s in sim.requests_seen
        if ref in (s.params.get("partner_trans_id"), s.params.get("out_trade_no"))
    ]


def _journal_row(rig: DaemonRig, ref: str) -> dict[str, Any]:
    return next(r for r in rig.journal() if r["ref"] == ref)


@pytest.mark.slow
def test_retry_and_resolve_work_while_kiosk_run_runs_and_its_worker_settles_the_retry(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    # A refund refused 00:00-01:30 Beijing time is tried again, not left to a person: the
    # daemon's clock is put outside that pause when the real one is in it.
    shift = 0.0
    if refunds_paused(datetime.now(UTC)):
        problem = faketime_problem()
        if problem is not None:
            pytest.skip(f"Alipay's refund pause now, and no libfaketime to leave it: {problem}")
        shift = 2 * 3600.0
    rig = DaemonRig(
        tmp_path,
        simulator,
        declined_hold_s=0.2,
        faketime=shift != 0.0,
        extra_config={"vend": {"timeout_s": 2.0}},
        query_interval_s=0.1,
    )
    if shift:
        rig.set_wall_offset(shift)
    codes = [payment_code("0005", n) for n in (71, 72)]
    for code in codes:
        _refund_refused(simulator, code)
    try:
        rig.start(extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
        retried, resolved = (_sell_into_attention(rig, code) for code in codes)
        assert _journal_row(rig, retried)["state"] == "attention"
        simulator.clear_faults()  # the merchant's balance is topped up: refunds go through
        sent_for_resolved = _sent_for(simulator, resolved)

        mark = len(rig.logs)
        done = kiosk("journal", "retry", retried, "--by", "ops", "--config", str(rig.config_path))
        assert done.returncode == 0, done.stderr
        done = kiosk(
            "journal",
            "resolve",
            resolved,
            "--note",
            "refunded from the portal",
            "--config",
            str(rig.config_path),
        )
        assert done.returncode == 0, done.stderr
        rig.wait_log_after(
            mark,
            lambda e: e.get("event") == "payment.settled" and e.get("ref") == retried,
            30,
            f"the worker settling {retried}",
        )
        assert rig.stop() == 0
    finally:
        rig.close()

    rows = {r["ref"]: r for r in rig.journal()}
    assert rows[retried]["state"] == "refunded"
    assert [(a["action"], a["by"]) for a in rows[retried]["actions"]] == [("retry", "ops")]
    assert (rows[resolved]["state"], rows[resolved]["final"]) == ("resolved", True)
    trade = simulator.ledger.trade(PARTNER, retried)
    assert trade is not None and trade.reversed and not trade.holds_money
    assert list(trade.refunds) == [f"{retried}-R"]  # the same refund id: refunded once
    held = simulator.ledger.trade(PARTNER, resolved)
    assert held is not None and held.holds_money  # settled outside: the kiosk sent nothing more
    assert _sent_for(simulator, resolved) == sent_for_resolved
    # `kiosk run` never loaded the report's code.
    imported = [line for line in rig.raw_log if line.startswith("import time:")]
    assert any(line.endswith(" kiosk.worker") for line in imported)
    assert not any(line.endswith(" kiosk.report") for line in imported)
