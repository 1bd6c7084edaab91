"""The daemon's loop in-process, with fake devices and the simulator: lights in order, scans
never queued, the clock and key checks, and a watchdog that is fed only while parts work."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drivers.indicator_fake import FakeIndicator
from drivers.scanner_fake import FakeScanner
from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.daemon import Kiosk
from kiosk.demo import demo_config
from kiosk.errors import KeyFileError
from kiosk.journal import Journal
from kiosk.ports import KioskState, Sound
from kiosk.simulator import GatewaySimulator
from kiosk.systemd import Notifier
from tests.conftest import payment_code


class Rig:
    def __init__(
        self, kiosk: Kiosk, scanner: FakeScanner, lights: FakeIndicator, vend: FakeVendOutput
    ) -> None:
        self.kiosk, self.scanner, self.lights, self.vend = kiosk, scanner, lights, vend
        self.thread = threading.Thread(target=kiosk.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        assert self.kiosk.ready.wait(10)

    def stop(self) -> None:
        self.kiosk.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(
        wall: datetime | None = None,
        client_factory: Callable[[], AlipayClient] | None = None,
        notifier: Notifier | None = None,
        vend: FakeVendOutput | None = None,
    ) -> Rig:
        config = demo_config(tmp_path / "state", simulator.url)
        config = replace(config, indicators=replace(config.indicators, declined_hold_s=0.3))
        scanner, lights, vend = FakeScanner(), FakeIndicator(), vend or FakeVendOutput()
        kiosk = Kiosk(
            config,
            scanner=scanner,
            indicator=lights,
            vend=vend,
            journal=Journal(config.kiosk.state_dir),
            client_factory=client_factory or (lambda: make_client(pay_timeout_s=1.0)),
            notifier=notifier or Notifier({}),
            wall_clock=(lambda: wall) if wall else (lambda: datetime.now(UTC)),
        )
        rig = Rig(kiosk, scanner, lights, vend)
        rigs.append(rig)
        rig.start()
        return rig

    yield make
    for rig in rigs:
        if rig.thread.is_alive():
            rig.stop()
        rig.kiosk.journal.close()


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
