"""Storage faults: a full state directory, a corrupt or truncated journal, a read-only
filesystem. The kiosk refuses new payments (`out_of_service`), keeps what it has, says
precisely why, and never overwrites what is already journaled."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.errors import JournalError
from kiosk.journal import JOURNAL_FILE, Journal, TxnState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.daemon_rig import DaemonRig

pytestmark = pytest.mark.slow


@pytest.fixture
def rig(tmp_path: Path, simulator: GatewaySimulator) -> Iterator[DaemonRig]:
    rig = DaemonRig(tmp_path, simulator)
    try:
        yield rig
    finally:
        rig.close()


def _sell_one(rig: DaemonRig, n: int) -> str:
    rig.scanner.write_line(payment_code("0001", n))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}")
    rig.vmc.expect("ACK ")
    rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 10)
    return ref


def test_full_disk_stops_new_payments_and_keeps_the_journal(rig: DaemonRig) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is needed to cap file sizes")
    rig.start()
    kept = _sell_one(rig, 1)
    assert rig.stop() == 0
    # Restart with files capped a little above their size: the card fills up mid-service.
    cap = max(p.stat().st_size for p in rig.state_dir.iterdir()) + 8192
    rig.start(wrap=["prlimit", f"--fsize={cap}", "--"])
    oos = None
    for n in range(2, 12):
        start = len(rig.logs)
        rig.scanner.write_line(payment_code("0001", n))
        done = rig.wait_log_after(
            start,
            lambda e: e.get("event") in ("payment.result", "kiosk.out_of_service"),
            15,
            "a sale's end",
        )
        if rig.logs[done]["event"] == "kiosk.out_of_service":
            oos = rig.logs[done]
            break
        line = rig.vmc.read_line(5)
        if line and line.startswith("APPROVED "):
            rig.vmc.write_line(f"SUCCESS {line.split()[1]}")
        rig.wait_log_after(
            done,
            lambda e: e.get("event") == "indicator" and e.get("state") == "ready",
            10,
            "ready",
        )
    assert oos is not None, "the journal never filled up"
    assert "journal" in oos["reason"]
    rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "out_of_service", 5)
    requests = len(rig.sim.requests_seen)
    rig.scanner.write_line(payment_code("0001", 99))
    rig.wait_log(
        lambda e: e.get("event") == "scan.ignored" and e.get("reason") == "out of service", 5
    )
    assert len(rig.sim.requests_seen) == requests  # nothing new is sent while the card is full
    assert rig.stop() == 0
    # Space again: the journal is worked off and nothing journaled was lost.
    rig.start()
    deadline_rows = _work_off(rig)
    rows = {r["ref"]: r for r in deadline_rows}
    assert rows[kept]["state"] == "vended"
    vended = {ref for ref, r in rows.items() if r["state"] == "vended"}
    holding = {t.partner_trans_id for t in rig.sim.ledger.trades() if t.holds_money}
    assert holding == vended  # no money without goods, no goods without money
    assert rig.stop() == 0


def _work_off(rig: DaemonRig) -> list[dict[str, object]]:
    import threading
    import time

    pause = threading.Event()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = rig.journal()
        if all(r["final"] for r in rows):
            return rows
        pause.wait(0.5)  # the worker retries with backoff; poll the journal export
    raise AssertionError(f"journal not worked off: {rig.journal()}")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_journal_keeps_the_kiosk_out_of_service_and_untouched(
    rig: DaemonRig, damage: str
) -> None:
    with Journal(rig.state_dir) as journal:
        for i in range(50):
            txn = journal.open_transaction(
                ref=f"VM-RIG-old-{i}",
                amount=Decimal("1.50"),
                currency="USD",
                item="coffee",
                code_last4="0001",
                trans_create_time="20261126000000",
            )
            journal.update(txn, state=TxnState.VENDED, note="x" * 300)
    path = rig.state_dir / JOURNAL_FILE
    data = path.read_bytes()
    damaged = b"\x00garbage" * 512 if damage == "garbage" else data[: len(data) // 3]
    path.write_bytes(damaged)
    rig.start(wait_ready=False)
    oos = rig.wait_log(lambda e: e.get("event") == "kiosk.out_of_service", 20)
    assert "journal" in oos["reason"] and str(path) in oos["reason"]
    rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "out_of_service", 5)
    assert rig.stop() == 0
    assert path.read_bytes() == damaged  # never overwritten
    assert rig.sim.requests_seen == []


def test_read_only_state_dir_keeps_the_kiosk_out_of_service(rig: DaemonRig) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only remount needs root and unshare")
    rig.start()
    kept = _sell_one(rig, 1)
    rig.stop()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m refused here: {probe.stderr.decode().strip()}")
    state = str(rig.state_dir)
    before = {p.name: p.read_bytes() for p in rig.state_dir.iterdir()}
    rig.start(
        wait_ready=False,
        wrap=[
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount --bind "{state}" "{state}" && mount -o remount,ro,bind "{state}" && exec "$@"',
            "sh",
        ],
    )
    oos = rig.wait_log(lambda e: e.get("event") == "kiosk.out_of_service", 20)
    assert "journal" in oos["reason"]
    assert rig.stop() == 0
    after = {p.name: p.read_bytes() for p in rig.state_dir.iterdir()}
    assert after == before
    assert {r["ref"] for r in rig.journal()} == {kept}


def test_a_full_journal_refuses_the_write_and_keeps_earlier_rows(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        first = journal.open_transaction(
            ref="VM-1-a",
            amount=Decimal("1.50"),
            currency="USD",
            item="coffee",
            code_last4="0001",
            trans_create_time="20261126000000",
        )
        pages = journal._conn.execute("PRAGMA page_count").fetchone()[0]
        journal._conn.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(JournalError, match="full"):
            for i in range(1000):
                journal.open_transaction(
                    ref=f"VM-1-{i:04d}-{'x' * 40}",
                    amount=Decimal("1.50"),
                    currency="USD",
                    item="coffee",
                    code_last4="0001",
                    trans_create_time="20261126000000",
                )
        assert journal.get(first.ref) is not None
