"""Shared fixtures: keys, the gateway simulator on loopback, clients, journals, fake devices."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.client import AlipayClient, GatewaySettings
from kiosk.alipay.signing import Md5Signature, RsaSignature, SignType
from kiosk.boot_clock import BootStamp
from kiosk.journal import Journal
from kiosk.simulator import GatewaySimulator, MerchantAccount

PARTNER = "2088101122334455"
MD5_KEY = b"8f0b3c7e2a9d4f6b1c5e7a9d3f2b4c6e"


@functools.cache
def named_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per name, made once per test run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def simulator() -> Iterator[GatewaySimulator]:
    sim = GatewaySimulator(
        [
            MerchantAccount(
                PARTNER, md5_key=MD5_KEY, merchant_public_key=named_key("merchant").public_key()
            )
        ],
        alipay_private_key=named_key("alipay"),
    )
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def signature_for(sign_type: SignType, sim: GatewaySimulator) -> Md5Signature | RsaSignature:
    if sign_type is SignType.MD5:
        return Md5Signature(MD5_KEY)
    return RsaSignature(
        sign_type, private_key=named_key("merchant"), public_key=sim.alipay_public_key
    )


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Any]]:
    """The kiosk loop with fake devices against the simulator (tests/loop_rig.py); each rig
    made is closed at the end of the test."""
    from tests.loop_rig import rig_factory  # loop_rig imports this module

    with rig_factory(tmp_path, simulator.url, make_client) as make:
        yield make


@pytest.fixture
def make_client(simulator: GatewaySimulator) -> Iterator[Callable[..., AlipayClient]]:
    made: list[AlipayClient] = []

    def make(
        sign_type: SignType = SignType.RSA2,
        pay_timeout_s: float = 0.5,
        gateway: str | None = None,
        backup: str | None = None,
    ) -> AlipayClient:
        client = AlipayClient(
            GatewaySettings(
                gateway=gateway or simulator.url,
                backup_gateway=backup,
                partner=PARTNER,
                seller_id=PARTNER,
                signature=signature_for(sign_type, simulator),
                connect_timeout_s=1.0,
                pay_timeout_s=pay_timeout_s,
                read_timeout_s=pay_timeout_s,
            )
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "state") as j:
        yield j


def payment_code(suffix: str, n: int = 1) -> str:
    """A well-formed Alipay payment code whose last 4 digits pick the simulator's behaviour."""
    return f"28{n:012d}{suffix}"


class WallClock:
    """A journal's wall clock (epoch seconds), as a test sets it (`now`)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


class KioskClocks(WallClock):
    """The journal's wall clock and its boot clock (`boot`): time passing moves both."""

    def __init__(self, now: float | None = None) -> None:
        super().__init__(now)
        self.boot = FakeBootClock()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
            self.boot.advance(seconds)


def open_sale(journal: Journal, ref: str, digits: str) -> None:
    """A scan's sale journaled as the payment flow opens it: its code's last 4 and keyed hash
    (rule 7), and with that commit the hashes past the window dropped."""
    journal.open_transaction(
        ref=ref,
        amount=Decimal("1.50"),
        currency="USD",
        item="tea",
        code_last4=digits[-4:],
        trans_create_time="20270115080000",
        code_digest=journal.code_digest(digits),
    )


class FakeBootClock:
    """The kernel's boot clock as a test moves it: a boot id and CLOCK_BOOTTIME seconds."""

    def __init__(self, boot_id: str = "b0" * 16, seconds: float = 1000.0) -> None:
        self.boot_id = boot_id
        self.seconds = seconds
        self._lock = threading.Lock()

    def __call__(self) -> BootStamp:
        with self._lock:
            return BootStamp(self.boot_id, self.seconds)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds

    def reboot(self, boot_id: str, seconds: float = 20.0) -> None:
        """A new boot: a new id, the clock from (nearly) zero."""
        with self._lock:
            self.boot_id, self.seconds = boot_id, seconds
