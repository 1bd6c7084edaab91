"""SIGHUP in-process: a new config takes effect between sales, never under one; the worker and
the refs in hand live for the whole process; being offline and every out-of-service reason
survive a reload unless the new config is what changes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.config import Config, ConfigInvalid, ConfigProblem
from kiosk.daemon import flow_settings
from kiosk.errors import KeyFileError
from kiosk.journal import TxnState
from kiosk.ports import KioskState, VendResult
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code
from tests.loop_rig import Rig, rig_config


class Configs:
    """What `kiosk.reload()` reads next: the test sets it, like a technician editing the file."""

    def __init__(self, config: Config) -> None:
        self.next: Config | Exception = config

    def __call__(self) -> Config:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


def with_price(config: Config, price: str) -> Config:
    return replace(config, sale=replace(config.sale, price=Decimal(price)))


def held(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.holds_money


def reloaded(rig: Rig, after: int = -1) -> int:
    """Wait until the reload sent after log index `after` was handled (applied, deferred or
    refused); returns the index of that log event."""
    names = ("config.reloaded", "config.reload_deferred", "config.kept", "config.restart_needed")
    found: list[int] = []

    def seen() -> bool:
        hits = [i for n in names if (i := rig.log.index(n, after)) is not None]
        found[:] = sorted(hits)[:1]
        return bool(hits)

    assert rig.log.wait_until(seen, 10), "the reload was not handled"
    return found[0]


def test_a_reload_during_a_vend_leaves_the_sale_alone_and_applies_after_it(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    configs = Configs(with_price(config, "2.00"))
    vend = FakeVendOutput()
    vend.hold()  # the product is coming out
    rig = make_rig(config, vend=vend, reload_config=configs)
    worker = rig.kiosk.worker
    rig.scanner.scan(payment_code("0001", 1))
    approval = vend.wait_for_approval(10)
    assert approval is not None
    ref, amount = approval
    mark = rig.log.size
    rig.kiosk.reload()
    reloaded(rig, mark - 1)
    rig.kiosk.worker.wake(resume_all=True)  # a worker pass now must leave the sale alone
    with vend._changed:
        assert not vend._changed.wait_for(lambda: vend.awaited, 1.5), "a worker took the sale"
    vend.release()  # SUCCESS from the controller
    rig.log.wait_for("payment.result", ref=ref)
    rig.log.wait_for("config.reloaded", after=mark - 1)
    assert held(simulator, ref), "the vended sale's money was returned"
    assert rig.kiosk.journal.get(ref).state is TxnState.VENDED  # type: ignore[union-attr]
    assert rig.kiosk.worker is worker  # one worker, never two at once
    assert amount == Decimal("1.50")  # the sale kept the config it began with
    assert rig.lights.wait_for(KioskState.READY, 5)
    rig.scanner.scan(payment_code("0001", 2))
    second = vend.wait_for_approval(10)
    assert second is not None and second[1] == Decimal("2.00")  # the next one has the new one
    rig.stop()


def test_the_worker_and_the_refs_in_hand_live_for_the_whole_process(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    configs = Configs(with_price(config, "2.00"))
    rig = make_rig(config, reload_config=configs)
    worker = rig.kiosk.worker
    for n in range(3):
        mark = rig.log.size
        configs.next = with_price(config, f"{2 + n}.00")
        rig.kiosk.reload()
        rig.log.wait_for("config.reloaded", after=mark - 1)
        rig.log.wait_for("worker.flow_replaced", after=mark - 1)
    assert rig.kiosk.worker is worker and worker.alive()
    assert worker.flow is not None and rig.kiosk.flow is not None
    assert worker.flow.in_hand is rig.kiosk.in_hand is rig.kiosk.flow.in_hand
    assert worker.flow.settings.retry_max_s == config.alipay.retry_max_s
    rig.scanner.scan(payment_code("0001"))
    approval = rig.vend.wait_for_approval(10)
    assert approval is not None and approval[1] == Decimal("4.00")
    rig.stop()


def test_a_reload_while_offline_keeps_probing_and_the_kiosk_comes_back_online(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    rig = make_rig(config, reload_config=Configs(config))
    simulator.go_offline()
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("gateway.offline")
    assert rig.lights.wait_for(KioskState.OFFLINE, 10)
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reloaded", after=mark - 1)
    assert rig.kiosk.status.offline
    simulator.go_online()
    # probe_interval_s is 1 s: the probe, still scheduled, finds the gateway back.
    rig.log.wait_for("gateway.online", 10)
    assert rig.lights.wait_for(KioskState.READY, 5)
    rig.stop()


def test_a_reload_keeps_an_unset_clock_out_of_service(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    rig = make_rig(config, wall=datetime(1970, 1, 1, tzinfo=UTC), reload_config=Configs(config))
    assert rig.kiosk.status.out_of_service == "clock not set"
    mark = rig.log.size
    rig.kiosk.reload()
    reloaded(rig, mark - 1)
    assert rig.kiosk.status.out_of_service == "clock not set"
    rig.scanner.scan(payment_code("0001"))
    rig.log.wait_for("scan.ignored", after=mark - 1, reason="out of service")
    assert simulator.requests_seen == []
    rig.stop()


def test_a_reload_keeps_a_journal_fault_out_of_service(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    rig = make_rig(config, reload_config=Configs(config))
    journal = rig.kiosk.journal
    with journal._lock:
        journal._conn.execute("PRAGMA query_only=ON")  # writes fail, and keep failing
    try:
        rig.scanner.scan(payment_code("0001"))
        assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 10)
        mark = rig.log.size
        rig.kiosk.reload()
        reloaded(rig, mark - 1)
        assert (rig.kiosk.status.out_of_service or "").startswith("journal:")
        rig.scanner.scan(payment_code("0001", 2))
        rig.log.wait_for("scan.ignored", after=mark - 1, reason="out of service")
    finally:
        with journal._lock:
            journal._conn.execute("PRAGMA query_only=OFF")
    rig.stop()


def test_a_merchant_refusal_survives_a_reload_until_a_probe_with_the_new_config_passes(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    # Probes are five minutes apart: only the reload can bring one on within the test.
    config = rig_config(tmp_path / "state", simulator.url, alipay={"probe_interval_s": 300.0})
    rig = make_rig(config, reload_config=Configs(config))
    rig.scanner.scan(payment_code("2049"))  # SECONDARY_MERCHANT_ID_INVALID
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 10)
    probes = len(rig.log.named("gateway.probe"))
    mark = rig.log.size
    rig.kiosk.reload()  # the technician fixed the merchant id
    at = rig.log.wait_for("config.reloaded", after=mark - 1)  # when the sale has ended
    probe = rig.log.wait_for("gateway.probe", 10, after=at, accepted=True)
    back = rig.log.wait_for("kiosk.back_in_service", 10, after=at)
    assert probe < back and len(rig.log.named("gateway.probe")) == probes + 1
    assert rig.lights.wait_for(KioskState.READY, 5)
    rig.stop()


def test_a_reload_with_unusable_keys_goes_out_of_service_and_a_fixed_one_comes_back(
    make_rig: Callable[..., Rig],
    tmp_path: Path,
    simulator: GatewaySimulator,
    make_client: Callable[..., AlipayClient],
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    keys_ok = [True]

    def client() -> AlipayClient:
        if not keys_ok[0]:
            raise KeyFileError("private key file k.pem is readable by others")
        return make_client(pay_timeout_s=1.0)

    rig = make_rig(config, client_factory=client, reload_config=Configs(config))
    keys_ok[0] = False
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("kiosk.out_of_service", after=mark - 1, kind="key")
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    keys_ok[0] = True  # chmod 600, then SIGHUP
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("kiosk.back_in_service", after=mark - 1, cleared="key")
    rig.scanner.scan(payment_code("0001"))
    assert rig.vend.wait_for_approval(10)
    rig.stop()


def test_a_bad_config_on_reload_keeps_the_running_one(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    configs = Configs(config)
    rig = make_rig(config, reload_config=configs)
    configs.next = ConfigInvalid([ConfigProblem("kiosk.toml", 3, "sale.price: '1.5' is not")])
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.kept", after=mark - 1)
    [failed] = [e for e in rig.log.named("config.reload_failed")]
    assert "kiosk.toml:3" in failed["error"]
    assert rig.kiosk.config is config
    rig.scanner.scan(payment_code("0001"))
    assert rig.vend.wait_for_approval(10)
    rig.stop()


def test_changing_the_state_dir_or_a_driver_needs_a_restart_and_the_rest_applies(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    moved = with_price(config, "3.00")
    moved = replace(
        moved,
        kiosk=replace(moved.kiosk, state_dir=tmp_path / "elsewhere"),
        vend=replace(moved.vend, driver="serial", port="/dev/ttyAMA0"),
    )
    rig = make_rig(config, reload_config=Configs(moved))
    mark = rig.log.size
    rig.kiosk.reload()
    at = rig.log.wait_for("config.restart_needed", after=mark - 1)
    assert rig.log.events[at]["keys"] == "kiosk.state_dir, vend.driver, vend.port"
    rig.log.wait_for("config.reloaded", after=mark - 1)
    running = rig.kiosk.config
    assert running.kiosk.state_dir == config.kiosk.state_dir and running.vend == config.vend
    assert running.sale.price == Decimal("3.00")
    rig.stop()


def test_a_currency_change_is_not_applied_without_a_restart(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url)
    yen = replace(
        config,
        alipay=replace(config.alipay, currency="JPY"),
        sale=replace(config.sale, price=Decimal("150")),
    )
    rig = make_rig(config, reload_config=Configs(yen))
    mark = rig.log.size
    rig.kiosk.reload()
    at = rig.log.wait_for("config.restart_needed", after=mark - 1)
    assert rig.log.events[at]["applied"] is False
    assert rig.kiosk.config is config
    rig.stop()


def test_a_deferred_reload_is_not_lost_when_the_sale_is_reversed(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    """And it is applied before the worker is woken for the unvended sale: the worker's next
    request goes out under the new config (a new merchant key signs it), not the old."""
    config = rig_config(tmp_path / "state", simulator.url)
    vend = FakeVendOutput()
    vend.hold()
    vend.script(VendResult.FAILED)
    rig = make_rig(config, vend=vend, reload_config=Configs(with_price(config, "2.50")))
    rig.scanner.scan(payment_code("0001"))
    assert vend.wait_for_approval(10)
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reload_deferred", after=mark - 1)
    config_at_wake: list[Decimal] = []
    wake = rig.kiosk.worker.wake

    def noting_wake(*args: Any, **kwargs: Any) -> None:
        config_at_wake.append(rig.kiosk.config.sale.price)
        wake(*args, **kwargs)

    rig.kiosk.worker.wake = noting_wake  # type: ignore[method-assign]
    vend.release()
    rig.log.wait_for("config.reloaded", after=mark - 1)
    assert rig.kiosk.config.sale.price == Decimal("2.50")
    rig.stop()
    assert config_at_wake, "the unvended sale never woke the worker"
    assert config_at_wake[0] == Decimal("2.50")


def test_flow_settings_take_the_retry_cap_from_the_config(tmp_path: Path) -> None:
    config = rig_config(tmp_path, "http://127.0.0.1:1/gateway.do", alipay={"retry_max_s": 7.5})
    assert flow_settings(config).retry_max_s == 7.5
