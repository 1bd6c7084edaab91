"""A crash at each journal step: the flow runs in a child process killed with SIGKILL right
after that step, a second process recovers from the journal, and the money rules are
checked against the gateway simulator's ledger."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, named_key, payment_code

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "crash_child.py"

# (crash point, code suffix, vend result, what the controller re-reports after the restart)
STEPS = [
    ("after_open", "0001", "vended", "timed_out"),  # the row and its pay, not yet sent
    ("after_pay_sent", "0001", "vended", "timed_out"),
    ("after_querying", "3002", "vended", "timed_out"),
    ("after_vending", "0001", "vended", "timed_out"),  # paid, APPROVED not yet sent
    ("after_vending", "3002", "vended", "timed_out"),  # paid as found by a query
    ("after_dispense", "0001", "vended", "vended"),
    ("after_dispense", "0001", "failed", "failed"),
    ("after_cancelling", "0001", "failed", "timed_out"),
    ("after_cancel_journaled", "0001", "failed", "timed_out"),
    ("after_cancel_sent", "0001", "failed", "timed_out"),
    ("after_refunding", "4001", "failed", "timed_out"),
    ("after_refund_journaled", "4001", "failed", "timed_out"),
    ("after_refund_sent", "4001", "failed", "timed_out"),
]


def _keys(tmp: Path, sim: GatewaySimulator) -> tuple[Path, Path]:
    pub = tmp / "alipay_public_key.pem"
    pub.write_bytes(
        sim.alipay_public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    key = tmp / "merchant_private_key.pem"
    key.write_bytes(
        named_key("merchant").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    return pub, key


@pytest.mark.parametrize(
    ("point", "suffix", "vend_result", "report"), STEPS, ids=[f"{p}-{v}" for p, _, v, _ in STEPS]
)
def test_crash_at_each_journal_step_keeps_the_money_rules(
    tmp_path: Path,
    simulator: GatewaySimulator,
    point: str,
    suffix: str,
    vend_result: str,
    report: str,
) -> None:
    pub, key = _keys(tmp_path, simulator)
    state = tmp_path / "state"
    code = payment_code(suffix)
    common = [str(state), simulator.url, str(pub), str(key)]
    crashed = subprocess.run(
        [sys.executable, str(CHILD), "sell", *common, point, code, vend_result],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    # SPEC rule 6: killed mid-sale, WAL and all, no file holds the whole code.
    assert [
        p.name for p in state.iterdir() if p.is_file() and code.encode() in p.read_bytes()
    ] == []

    recovered = subprocess.run(
        [sys.executable, str(CHILD), "recover", *common, report],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert recovered.returncode == 0, recovered.stderr.decode()[-2000:]
    final_states = set(recovered.stdout.decode().strip().split(","))

    # Money rules: Alipay holds money exactly when the journal says the goods went out.
    trades = simulator.ledger.trades()
    holding = [t for t in trades if t.holds_money]
    if final_states == {"vended"}:
        assert len(holding) == 1 and holding[0].partner == PARTNER
    else:
        assert holding == [], (point, final_states, [t.events for t in trades])
    assert len(trades) <= 1  # one scan, at most one charge
    # ... nor after the recovery.
    assert not any(code.encode() in p.read_bytes() for p in state.iterdir() if p.is_file())
