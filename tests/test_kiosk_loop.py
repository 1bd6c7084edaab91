"""The daemon's loop in-process, with fake devices and the simulator: lights in order, scans
never queued, the clock and key checks, and a watchdog that is fed only while parts work."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.errors import JournalCorrupt, KeyFileError
from kiosk.journal import TxnState
from kiosk.payment import Sale, SaleResult
from kiosk.ports import KioskState, Sound
from kiosk.simulator import GatewaySimulator
from kiosk.systemd import Notifier
from tests.conftest import PARTNER, payment_code
from tests.loop_rig import ProtocolVendOutput, Rig, rig_config


def test_lights_follow_a_paid_sale_in_order(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.scanner.scan(payment_code("0001"))
    assert rig.vend.wait_for_approval(10)
    for state in (KioskState.PAYING, KioskState.VENDING, KioskState.READY):
        assert rig.lights.wait_for(state, 10), rig.lights.history
    assert rig.lights.history[:2] == [KioskState.STARTING, KioskState.READY]
    assert Sound.SCAN in rig.lights.sounds
    rig.stop()


def test_a_scan_during_a_payment_is_ignored_with_an_error_beep(
    make_rig: Callable[..., Rig],
) -> None:
    vend = FakeVendOutput()
    vend.hold()  # the vend stays in progress until released
    rig = make_rig(vend=vend)
    rig.scanner.scan(payment_code("0001", 1))
    assert vend.wait_for_approval(10)
    rig.scanner.scan(payment_code("0001", 2))
    assert rig.lights.wait_for_sound(Sound.ERROR, 1, 5)
    assert rig.lights.wait_for(KioskState.VENDING, 10)
    vend.release()
    assert rig.lights.wait_for(KioskState.READY, 10)
    assert len(vend.approvals) == 1  # never queued
    assert len(rig.kiosk.status.sales) == 1
    rig.stop()


def test_declined_shows_red_then_ready(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)
    rig.scanner.scan(payment_code("2022"))
    assert rig.lights.wait_for(KioskState.DECLINED, 10)
    assert rig.lights.wait_for(KioskState.READY, 5)
    assert rig.vend.denials == ["BUYER_BALANCE_NOT_ENOUGH"]
    rig.stop()


def test_an_unset_clock_keeps_the_kiosk_out_of_service(
    make_rig: Callable[..., Rig], simulator: GatewaySimulator
) -> None:
    rig = make_rig(wall=datetime(1970, 1, 1, tzinfo=UTC))
    assert rig.kiosk.status.out_of_service == "clock not set"
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    rig.scanner.scan(payment_code("0001"))
    assert rig.lights.wait_for_sound(Sound.ERROR, 1, 5)
    assert simulator.requests_seen == []
    rig.stop()


def test_an_unusable_key_keeps_the_kiosk_out_of_service(make_rig: Callable[..., Rig]) -> None:
    def refuse() -> AlipayClient:
        raise KeyFileError("private key file /etc/kiosk/keys/k.pem is readable by others")

    rig = make_rig(client_factory=refuse)
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    assert rig.kiosk.status.out_of_service is not None
    assert "readable by others" in rig.kiosk.status.out_of_service
    rig.stop()


def test_the_watchdog_is_fed_only_while_every_part_works(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    vend = FakeVendOutput()
    rig = make_rig(
        notifier=Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}), vend=vend
    )
    try:
        pings = [sock.recv(100) for _ in range(3)]
        assert b"READY=1" in pings[0] and b"WATCHDOG=1" in pings[-1]
        vend.is_healthy = False  # the vend link's reader died
        sock.settimeout(0.1)
        drained = 0
        while drained < 50:  # what was already in flight
            try:
                sock.recv(100)
            except TimeoutError:
                break
            drained += 1
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # five watchdog intervals: nothing
        vend.is_healthy = True
        assert b"WATCHDOG=1" in sock.recv(100)
    finally:
        rig.stop()
        sock.close()


# -- the loop survives a failing handler -------------------------------------------------------


class FlakyVendOutput(FakeVendOutput):
    """A controller link whose deny() or answer_vend() raises while told to (a driver bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.deny_failures = 0
        self.answer_failures = 0

    def deny(self, reason: str) -> None:
        if self.deny_failures:
            self.deny_failures -= 1
            raise RuntimeError("link bug")
        super().deny(reason)

    def answer_vend(self, answer: str) -> None:
        if self.answer_failures:
            self.answer_failures -= 1
            raise RuntimeError("link bug")
        super().answer_vend(answer)


def test_an_exception_in_a_handler_raises_an_alarm_denies_the_sale_and_the_loop_goes_on(
    make_rig: Callable[..., Rig],
) -> None:
    vend = FlakyVendOutput()
    vend.deny_failures = 1
    rig = make_rig(vend=vend)
    rig.scanner.scan(payment_code("2022"))  # declined: the DENIED line fails once
    rig.log.wait_for("alarm", kind="loop_error", handler="sale_done")
    [alarm] = rig.log.named("alarm")
    assert "RuntimeError: link bug" in alarm["error"] and "Traceback" in alarm["traceback"]
    # The alarm is logged first, then the loop makes safe: the denial, then the red light.
    assert rig.lights.wait_for(KioskState.DECLINED, 5)
    assert vend.denials == ["ERROR"]  # the safe answer for a sale whose handler failed
    assert rig.lights.wait_for(KioskState.READY, 5)
    rig.scanner.scan(payment_code("0001", 2))
    assert vend.wait_for_approval(10)  # still selling
    assert rig.kiosk.stopped.is_set() is False
    rig.stop()


def test_a_refusal_reason_that_is_not_a_protocol_token_reaches_the_controller_as_one(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    vend = ProtocolVendOutput()
    rig = make_rig(vend=vend)
    flow = rig.kiosk.flow
    assert flow is not None
    odd = Sale("VM-odd-1", SaleResult.DECLINED, "BAD CODE ü", TxnState.DECLINED)
    monkeypatch.setattr(flow, "sell", lambda code, amount, item, abandoned=None: odd)
    rig.scanner.scan(payment_code("0001"))
    assert rig.lights.wait_for(KioskState.DECLINED, 5)
    assert vend.denials == ["BAD-CODE--"]
    assert rig.log.named("alarm") == []
    rig.stop()


def test_the_watchdog_is_withheld_only_while_a_handler_keeps_failing(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    vend = FlakyVendOutput()
    rig = make_rig(
        notifier=Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}), vend=vend
    )
    try:
        sock.settimeout(2)
        assert b"WATCHDOG=1" in sock.recv(100) or b"WATCHDOG=1" in sock.recv(100)
        vend.answer_failures = 1_000_000  # every answer to the controller fails from now on
        for _ in range(5):
            mark = rig.log.size
            vend.cancel()
            rig.log.wait_for("alarm", after=mark - 1, kind="loop_error", handler="vend_cancel")
        rig.log.wait_for("watchdog.withheld", part="event loop (vend_cancel)")
        sock.settimeout(0.1)
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(100)  # what was already in flight
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # five watchdog intervals: nothing
        vend.answer_failures = 0
        vend.cancel()  # handled again: the loop does its job
        assert vend.wait_for_answer("CANCELLED", 5)
        assert b"WATCHDOG=1" in sock.recv(100)
    finally:
        rig.stop()
        sock.close()


# -- operations -------------------------------------------------------------------------------


def test_a_journal_write_fault_ends_by_itself_once_a_durable_write_succeeds(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    journal = rig.kiosk.journal
    with journal._lock:
        journal._conn.execute("PRAGMA query_only=ON")  # every write now fails, like a full card
    rig.scanner.scan(payment_code("0001", 1))
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 10)
    assert (rig.kiosk.status.out_of_service or "").startswith("journal:")
    assert rig.vend.approvals == []
    mark = rig.log.size
    rig.log.wait_for("journal.still_failing", after=mark - 1)  # re-checked, still failing
    assert rig.kiosk.status.out_of_service is not None
    with journal._lock:
        journal._conn.execute("PRAGMA query_only=OFF")  # space again
    # probe_interval_s is 1 s in the demo config: the next check writes, and succeeds.
    rig.log.wait_for("kiosk.back_in_service", 10)
    assert rig.lights.wait_for(KioskState.READY, 5)
    rig.scanner.scan(payment_code("0001", 2))
    assert rig.vend.wait_for_approval(10)
    rig.stop()


def test_a_corrupt_journal_keeps_the_kiosk_out_of_service(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.kiosk.events.put(("journal_error", JournalCorrupt("journal x is unreadable: malformed")))
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    # Writes would succeed, but a corrupt journal is never written to again by this process.
    rig.kiosk.events.put(("writable", None))
    rig.kiosk.events.put(("gateway", "reachable"))
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", reason="out of service")
    assert "unreadable" in (rig.kiosk.status.out_of_service or "")
    assert rig.log.named("journal.writable") == []
    rig.stop()


def test_the_status_keeps_only_the_last_hundred_sales(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.stop()
    for n in range(250):
        rig.kiosk._handle_sale_done(Sale(f"VM-{n}", SaleResult.VENDED, "", TxnState.VENDED))
    assert len(rig.kiosk.status.sales) == 100
    assert rig.kiosk.status.sales[0].ref == "VM-150"
    assert rig.kiosk.status.sales[-1].ref == "VM-249"
    assert rig.kiosk.status.sales_total == 250


def test_a_vend_above_max_price_is_denied_and_not_selected(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(
        tmp_path / "state",
        simulator.url,
        sale={"mode": "vmc", "price": None, "max_price": Decimal("20.00")},
    )
    vend = ProtocolVendOutput()
    rig = make_rig(config, vend=vend)
    vend.request_vend("tea", "0.80")
    assert vend.wait_for_answer("OK", 5)
    vend.request_vend("caviar", "25.00")  # the customer chose again, above the cap
    rig.log.wait_for("vend.refused", reason="MAX_PRICE")
    assert vend.denials == ["MAX_PRICE"]
    assert vend.answers == ["OK"]
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", reason="no selection on the machine")
    assert vend.approvals == []
    vend.request_vend("tea", "20.00")  # at the cap: fine
    rig.scanner.scan(payment_code("0001", 2))
    assert vend.wait_for_approval(10) is not None
    rig.stop()


# -- the clock ------------------------------------------------------------------------------


def test_an_unsynchronised_clock_keeps_the_kiosk_out_of_service_until_it_syncs(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url, kiosk={"require_synced_clock": True})
    synced = threading.Event()
    vend = ProtocolVendOutput()
    rig = make_rig(config, vend=vend, clock_synced=synced.is_set, clock_recheck_s=(0.05, 0.05))
    assert rig.kiosk.status.out_of_service == "clock not synchronised"
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", reason="out of service")
    vend.request_vend("tea", "1.50")
    assert vend.wait_for_answer("OUT_OF_SERVICE clock-not-synchronised", 5)
    assert simulator.requests_seen == []
    synced.set()  # timesyncd got its first answer
    rig.log.wait_for("kiosk.back_in_service", 5, cleared="clock")
    rig.scanner.scan(payment_code("0001", 2))
    assert vend.wait_for_approval(10)
    synced.clear()  # lost again later: out of service at the next check
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    rig.stop()


def test_the_clock_check_is_skipped_where_the_config_says_so(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url, kiosk={"require_synced_clock": False})
    rig = make_rig(config, clock_synced=lambda: False)
    assert rig.kiosk.status.out_of_service is None
    rig.scanner.scan(payment_code("0001"))
    assert rig.vend.wait_for_approval(10)
    rig.stop()


# -- a vend output with its own problem (an MDB board), and the machine's patience -------------


class BoardVendOutput(ProtocolVendOutput):
    """A vend output with a reader switch and a problem of its own, like the MDB driver."""

    cancel_abandons_payment = True

    def __init__(self) -> None:
        super().__init__()
        self.switched: list[tuple[bool, str | None]] = []
        self.board_problem: str | None = None

    def set_available(self, available: bool, reason: str | None) -> None:
        self.switched.append((available, reason))

    def problem(self) -> str | None:
        return self.board_problem

    def running(self) -> bool:
        return not self.closed

    def healthy(self) -> bool:
        return self.running() and self.board_problem is None


def test_a_vend_problem_is_out_of_service_but_never_withholds_the_watchdog(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    config = rig_config(tmp_path / "state", simulator.url, sale={"mode": "vmc", "price": None})
    vend = BoardVendOutput()
    rig = make_rig(
        config,
        vend=vend,
        notifier=Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}),
    )
    try:
        assert vend.switched[-1] == (True, None)
        vend.board_problem = "the MDB board refused mdb-addr=0x10: c,ERR,invalid parameter"
        rig.kiosk.on_vend_problem(vend.board_problem)  # what the driver calls
        assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
        assert rig.kiosk.status.out_of_service is None  # a field of its own
        assert rig.log.wait_until(lambda: vend.switched[-1][0] is False, 5)
        vend.request_vend("tea", "1.50")
        assert vend.wait_for_answer("OUT_OF_SERVICE the-MDB-board-refused-mdb-addr=0x10", 5)
        sock.settimeout(0.1)
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(100)  # what was already in flight
        sock.settimeout(2)
        assert b"WATCHDOG=1" in sock.recv(100)  # still fed: the driver retries by itself
        assert rig.log.named("watchdog.withheld") == []
        vend.board_problem = None
        rig.kiosk.on_vend_problem(None)
        rig.log.wait_for("kiosk.back_in_service", 5, cleared="vend")
        assert rig.log.wait_until(lambda: vend.switched[-1] == (True, None), 5)
        assert rig.lights.wait_for(KioskState.READY, 5)
    finally:
        rig.stop()
        sock.close()
    assert vend.closed


def test_a_sale_still_unpaid_when_approve_within_s_passes_is_abandoned(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    from dataclasses import dataclass, replace

    from kiosk.config import VendSection

    @dataclass(frozen=True)
    class MdbVendSection(VendSection):
        approve_within_s: float = 60.0

    config = rig_config(
        tmp_path / "state",
        simulator.url,
        sale={"mode": "vmc", "price": None},
        alipay={"query_deadline_s": 30.0},  # without the abandon it would query for 30 s
    )
    config = replace(config, vend=MdbVendSection(driver="mdb", timeout_s=2.0, approve_within_s=4.0))
    vend = BoardVendOutput()
    rig = make_rig(config, vend=vend)
    vend.request_vend("tea", "1.50")
    assert vend.wait_for_answer("OK", 5)
    rig.scanner.scan(payment_code("1002"))  # UNKNOW; the buyer never confirms
    rig.log.wait_for("sale.abandoned", 10, why="approve_within_s passed")
    index = rig.log.wait_for("payment.result", 10)
    result = rig.log.events[index]
    assert (result["outcome"], result["reason"]) == ("declined", "CANCELLED")
    assert vend.approvals == []
    trade = simulator.ledger.trade(PARTNER, result["ref"])
    assert trade is None or not trade.holds_money
    rig.stop()
