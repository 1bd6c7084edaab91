"""Alarms raised once when they start and cleared once when they end, fed by the loop, the
worker and the journal; and systemd's STATUS= that always says the state now."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.alarms import ALARM_KINDS, Alarm, AlarmBoard
from kiosk.journal import TxnState
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from kiosk.systemd import Notifier
from tests.loop_rig import Rig, rig_config

WAIT_S = 20.0


def test_the_board_raises_once_clears_once_and_tells_its_listeners() -> None:
    board = AlarmBoard(lambda: datetime(2026, 1, 2, tzinfo=UTC))
    heard: list[Alarm] = []
    board.listen(heard.append)
    assert board.raise_("offline", "gateway unreachable for 5 min")
    assert not board.raise_("offline", "gateway unreachable for 6 min")  # still the same one
    board.update("offline", "gateway unreachable for 7 min")
    assert board.counts()["offline"] == 1
    assert board.clear("offline")
    assert not board.clear("offline")
    assert [(a.kind, a.active) for a in heard] == [("offline", True), ("offline", False)]
    assert heard[0].payload() == {
        "kind": "offline",
        "message": "gateway unreachable for 5 min",
        "ref": None,
        "at": "2026-01-02T00:00:00Z",
        "active": True,
    }
    board.raise_("attention", "x", key="R1", ref="R1")
    board.raise_("attention", "x", key="R2", ref="R2")
    board.keep_only("attention", {"R2"})
    assert [a.ref for a in board.active()] == ["R2"]
    with pytest.raises(ValueError):
        board.raise_("no_such_kind", "x")
    assert set(board.counts()) == set(ALARM_KINDS)


def test_a_vend_link_down_for_long_raises_one_alarm_and_clears_it_when_back(
    make_rig: Callable[..., Rig],
) -> None:
    vend = FakeVendOutput()
    rig = make_rig(vend=vend)
    kiosk = rig.kiosk
    checks = [0]
    check_disk = kiosk._check_disk

    def counted() -> None:
        checks[0] += 1
        check_disk()

    kiosk._check_disk = counted  # type: ignore[method-assign]
    kiosk.link_alarm_s = 0.2
    kiosk.alarm_check_s = 0.05
    kiosk._next_alarm_check = 0.0
    kiosk.events.put(("wake", None))  # look again with the short intervals
    vend.is_healthy = False
    rig.log.wait_for("alarm.raised", WAIT_S, kind="vend_link_down")
    # Looked at again and again while it lasts, but raised once.
    seen = checks[0]
    assert rig.log.wait_until(lambda: checks[0] >= seen + 5, WAIT_S)
    vend.is_healthy = True
    rig.log.wait_for("alarm.cleared", WAIT_S, kind="vend_link_down")
    raised = [e for e in rig.log.named("alarm.raised") if e["kind"] == "vend_link_down"]
    assert len(raised) == 1
    assert not kiosk.alarms.is_active("vend_link_down")
    rig.stop()


def test_a_transaction_in_attention_raises_an_alarm_until_a_person_settles_it(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig()
    kiosk = rig.kiosk
    journal = kiosk.journal
    txn = journal.open_transaction(
        ref="VM-ATT-1",
        amount=Decimal("1.50"),
        currency="USD",
        item="coffee",
        code_last4="0999",
        trans_create_time="20260101000000",
    )
    txn = journal.update(txn, state=TxnState.ATTENTION, note="refund refused")
    rig.log.wait_for("alarm.raised", WAIT_S, kind="attention", ref="VM-ATT-1")
    assert kiosk.alarms.is_active("attention", "VM-ATT-1")
    # A person settles it (the CLI, another process, writes the journal behind the loop's
    # back): the next look at the journal clears the alarm.
    with journal._lock:
        journal._conn.execute(
            "UPDATE transactions SET state='refunded', final=1 WHERE ref='VM-ATT-1'"
        )
    kiosk.alarm_check_s = 0.05
    kiosk._next_alarm_check = 0.0
    kiosk.events.put(("wake", None))
    rig.log.wait_for("alarm.cleared", WAIT_S, kind="attention", ref="VM-ATT-1")
    assert len([e for e in rig.log.named("alarm.raised") if e["kind"] == "attention"]) == 1
    rig.stop()


def test_the_worker_reports_its_retry_ceiling_and_its_end() -> None:
    from kiosk.worker import JournalWorker

    heard: list[tuple[str, str | None]] = []
    worker = JournalWorker.__new__(JournalWorker)
    worker.on_retry_ceiling = lambda ref, message: heard.append((ref, message))
    from kiosk.worker import _Retry

    worker._schedule = {"R1": _Retry(due=0, tries=50, first_seen=0, alarmed=True)}
    worker._forget("R1")
    assert heard == [("R1", None)]


# -- STATUS= ------------------------------------------------------------------------------


class ProblemVend(FakeVendOutput):
    """A vend output that can say why it takes no payments (like an MDB board)."""

    def __init__(self) -> None:
        super().__init__()
        self.why: str | None = None

    def problem(self) -> str | None:
        return self.why


def test_status_always_says_the_state_now_through_every_recovery(
    make_rig: Callable[..., Rig], simulator: GatewaySimulator, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(WAIT_S)
    statuses: list[str] = []

    def next_status() -> str:
        while True:
            for line in sock.recv(512).decode().splitlines():
                if line.startswith("STATUS="):
                    statuses.append(line[7:])
                    return line[7:]

    def wait_status(text: str) -> None:
        while next_status() != text:
            pass

    synced = [False]
    config = rig_config(tmp_path / "state", simulator.url)
    config = replace(config, kiosk=replace(config.kiosk, require_synced_clock=True))
    vend = ProblemVend()
    rig = make_rig(
        config,
        vend=vend,
        notifier=Notifier({"NOTIFY_SOCKET": str(path)}),
        clock_synced=lambda: synced[0],
        clock_recheck_s=(0.05, 0.05),
    )
    try:
        wait_status("out of service: clock not synchronised")
        vend.why = "the board refused its configuration"
        rig.kiosk.on_vend_problem(vend.why)
        synced[0] = True
        # The clock recovered, the board has not: STATUS says the board, not "ready".
        wait_status("out of service: the board refused its configuration")
        vend.why = None
        rig.kiosk.on_vend_problem(None)
        wait_status("ready")
        assert rig.lights.wait_for(KioskState.READY, WAIT_S)
        assert "ready" not in statuses[:-1]  # never said while it was not true
    finally:
        rig.stop()
        sock.close()
