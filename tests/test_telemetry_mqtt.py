"""Telemetry against a real Mosquitto broker on loopback (SPEC section 8): retained state and
availability, the last will, one message per final sale, no payment code or key in any
payload, sales that go on while the broker is down, TLS with a test CA and a password."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kiosk.config import TelemetrySection
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.daemon_rig import DaemonRig
from tests.loop_rig import Rig, rig_config
from tests.mosquitto import Broker, Message, Subscriber, make_ca, mosquitto_problem

WAIT_S = 20.0
TID = "DEMO-01"  # the demo config's terminal
BASE = f"kiosk/{TID}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    problem = mosquitto_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; .ci/run installs it from tools/host-packages.txt")
        pytest.skip(problem)
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def telemetry_config(tmp_path: Path, gateway: str, **telemetry: Any) -> Any:
    config = rig_config(tmp_path / "state", gateway)
    return replace(config, telemetry=TelemetrySection(**telemetry))


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    sub = Subscriber(broker, [f"{BASE}/#", "homeassistant/#"])
    try:
        yield sub
    finally:
        sub.close()


def state_where(check: Callable[[dict[str, Any]], bool]) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        return m.topic == f"{BASE}/state" and check(m.json())

    return match


def is_availability(value: str) -> Callable[[Message], bool]:
    return lambda m: m.topic == f"{BASE}/availability" and m.payload == value


# -- what is published ------------------------------------------------------------------------


def test_each_final_sale_publishes_exactly_one_message_and_state_is_retained(
    make_rig: Callable[..., Rig],
    broker: Broker,
    subscriber: Subscriber,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    rig = make_rig(telemetry_config(tmp_path, simulator.url, mqtt_url=broker.url))
    subscriber.wait_for(is_availability("online"), WAIT_S, "online")
    codes = [payment_code("0999", 11), payment_code("0999", 12), payment_code("2022", 13)]
    for code in codes:
        rig.scanner.scan(code)
        assert rig.lights.wait_for(KioskState.PAYING, WAIT_S), rig.lights.history
        assert rig.lights.wait_for(KioskState.READY, WAIT_S), rig.lights.history
    # The state goes out after every queued sale, so once it counts them all, every sale
    # message is out: none may follow.
    subscriber.wait_for(
        state_where(lambda s: s["sales_today"]["count"] == 2 and s["unfinished"] == 0),
        WAIT_S,
        "state counting both sales",
    )
    sales = [m.json() for m in subscriber.on(f"{BASE}/sale")]
    journal = {t.ref: t for t in rig.kiosk.journal.listing(include_all=True)}
    assert sorted(s["ref"] for s in sales) == sorted(journal), sales  # one each, no more
    for sale in sales:
        txn = journal[sale["ref"]]
        assert sale == {
            "ref": txn.ref,
            "state": txn.state.value,
            "amount": "1.50",
            "currency": "USD",
            "item": txn.item,
            "code": txn.error_code,
            "at": sale["at"],
        }
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sale["at"])
    assert sorted(s["state"] for s in sales) == ["declined", "vended", "vended"]
    assert {m.retain for m in subscriber.on(f"{BASE}/sale")} == {False}
    assert all(m.qos == 1 for m in subscriber.messages)

    # A newcomer gets the retained state and availability at once.
    late = Subscriber(broker, [f"{BASE}/state", f"{BASE}/availability", "homeassistant/#"])
    try:
        state = late.wait_for(lambda m: m.topic == f"{BASE}/state", WAIT_S, "retained state")
        assert state.retain
        body = state.json()
        assert set(body) >= {
            "state",
            "reason",
            "since",
            "firmware",
            "unfinished",
            "attention",
            "sales_today",
            "last_sale_at",
        }
        assert body["state"] in {s.value for s in KioskState}
        assert body["sales_today"] == {"count": 2, "amount": "3.00", "currency": "USD"}
        assert body["attention"] == 0 and body["last_sale_at"] is not None
        online = late.wait_for(lambda m: m.topic == f"{BASE}/availability", WAIT_S, "avail")
        assert online.retain and online.payload == "online"
        # Home Assistant's discovery configs are retained too.
        discovered = late.wait_for(
            lambda m: m.topic == f"homeassistant/sensor/{TID}/state/config", WAIT_S, "config"
        )
        assert discovered.retain
    finally:
        late.close()

    mark = subscriber.size
    rig.stop()  # a clean stop says offline itself (the broker sends no will then)
    subscriber.wait_after(mark, is_availability("offline"), WAIT_S, "offline")
    assert retained(broker, f"{BASE}/availability") == "offline"

    check_no_secret_in(subscriber.messages, codes, refs=list(journal), secrets=[])


def retained(broker: Broker, topic: str) -> str:
    """What the broker keeps on `topic`, as a newcomer gets it (retain flag set)."""
    sub = Subscriber(broker, [topic])
    try:
        return sub.wait_for(lambda m: m.retain, WAIT_S, f"retained {topic}").payload
    finally:
        sub.close()


def check_no_secret_in(
    messages: list[Message], codes: list[str], refs: list[str], secrets: list[str]
) -> None:
    """No payment code, whole or its last digits, and no key material or password, in any
    payload. The refs (partner_trans_ids, made by the kiosk) are taken out first: their
    timestamp digits are no part of any code."""
    assert messages
    for message in messages:
        text = message.payload
        for ref in refs:
            text = text.replace(ref, "<ref>")
        for code in codes:
            assert code not in text, message
            assert code[-4:] not in text, (code[-4:], message)
            assert code[-6:] not in text, message
        assert "PRIVATE KEY" not in text and "BEGIN" not in text, message
        for secret in secrets:
            assert secret not in text, message


def test_an_alarm_goes_out_once_when_it_starts_and_once_when_it_clears(
    make_rig: Callable[..., Rig],
    broker: Broker,
    subscriber: Subscriber,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    config = telemetry_config(tmp_path, simulator.url, mqtt_url=broker.url)
    config = replace(config, kiosk=replace(config.kiosk, require_synced_clock=True))
    synced = [False]
    rechecks = [0]

    def clock_synced() -> bool:
        rechecks[0] += 1
        return synced[0]

    rig = make_rig(config, clock_synced=clock_synced, clock_recheck_s=(0.05, 0.05))
    subscriber.wait_for(
        state_where(lambda s: s["state"] == "out_of_service"), WAIT_S, "out of service"
    )
    # Looked at again and again while it lasts ...
    assert rig.log.wait_until(lambda: rechecks[0] >= 10, WAIT_S)
    synced[0] = True
    subscriber.wait_for(state_where(lambda s: s["state"] == "ready"), WAIT_S, "ready")
    alarms = [m.json() for m in subscriber.on(f"{BASE}/alarm")]
    # ... but each alarm went out once when it started and once when it ended.
    seen = sorted((a["kind"], a["active"]) for a in alarms)
    assert seen == [
        ("clock_unsynchronised", False),
        ("clock_unsynchronised", True),
        ("out_of_service", False),
        ("out_of_service", True),
    ], alarms
    started = next(a for a in alarms if a["kind"] == "out_of_service" and a["active"])
    assert started["message"] == "clock not synchronised" and started["ref"] is None
    assert set(started) == {"kind", "message", "ref", "at", "active"}
    rig.stop()


# -- the broker comes and goes; the kiosk sells ----------------------------------------------


def test_a_broker_down_or_restarted_stops_no_sale_and_telemetry_republishes(
    make_rig: Callable[..., Rig],
    broker: Broker,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    rig = make_rig(telemetry_config(tmp_path, simulator.url, mqtt_url=broker.url))
    sink = rig.kiosk.telemetry
    assert sink is not None
    sink.reconnect_max_s = 1.0  # come back quickly once the broker is back
    assert sink.connected.wait(WAIT_S)
    broker.stop()
    code = payment_code("0999", 21)
    rig.scanner.scan(code)  # the broker is gone: the sale goes on all the same
    approval = rig.vend.wait_for_approval(WAIT_S)
    assert approval is not None
    assert rig.lights.wait_for(KioskState.VENDING, WAIT_S)
    assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    [txn] = rig.kiosk.journal.listing(include_all=True)
    assert txn.state.value == "vended"

    broker.start()  # restarted from scratch: it retained nothing
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        # Reconnected: availability and state again, and the sale kept while it was away.
        sub.wait_for(is_availability("online"), WAIT_S, "online again")
        sub.wait_for(lambda m: m.topic == f"{BASE}/sale" and txn.ref in m.payload, WAIT_S, "sale")
        # (paho may first send again what the broker had not acknowledged before it went)
        sub.wait_for(state_where(lambda s: s["sales_today"]["count"] == 1), WAIT_S, "state")
        assert len(sub.on(f"{BASE}/sale")) == 1
    finally:
        sub.close()
    assert sink.dropped == 0
    rig.stop()


def test_a_kiosk_started_with_the_broker_down_sells_and_counts_what_it_drops(
    make_rig: Callable[..., Rig],
    broker: Broker,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    broker.stop()
    rig = make_rig(telemetry_config(tmp_path, simulator.url, mqtt_url=broker.url))
    sink = rig.kiosk.telemetry
    assert sink is not None
    sink.queue_size = 1  # room for one sale only
    for n in (31, 32):
        rig.scanner.scan(payment_code("0999", n))
        assert rig.lights.wait_for(KioskState.PAYING, WAIT_S)
        assert rig.lights.wait_for(KioskState.READY, WAIT_S)
    assert len(rig.vend.approvals) == 2
    assert rig.log.wait_until(lambda: sink.dropped == 1, WAIT_S)
    sink.reconnect_max_s = 1.0
    broker.start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        state = sub.wait_for(state_where(lambda s: s["sales_today"]["count"] == 2), WAIT_S, "state")
        assert state.json()["telemetry_dropped"] == 1
        assert len(sub.on(f"{BASE}/sale")) == 1  # the newer one: the older was dropped
    finally:
        sub.close()
    rig.stop()


# -- kiosk run, the process ----------------------------------------------------------------


def test_the_last_will_says_offline_when_kiosk_run_is_killed(
    tmp_path: Path, simulator: GatewaySimulator, broker: Broker
) -> None:
    rig = DaemonRig(tmp_path, simulator, extra_config={"telemetry": {"mqtt_url": broker.url}})
    sub = Subscriber(broker, ["kiosk/VM-RIG/#"])
    try:
        rig.start()
        sub.wait_for(
            lambda m: m.topic == "kiosk/VM-RIG/availability" and m.payload == "online",
            WAIT_S,
            "online",
        )
        mark = sub.size
        rig.signal(signal.SIGKILL)
        rig.wait_exit()
        sub.wait_after(
            mark,
            lambda m: m.topic == "kiosk/VM-RIG/availability" and m.payload == "offline",
            WAIT_S,
            "the last will",
        )
        assert retained(broker, "kiosk/VM-RIG/availability") == "offline"
    finally:
        sub.close()
        rig.close()


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    problem = mosquitto_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    b = Broker(
        tmp_path / "tls-broker",
        tls=make_ca(tmp_path / "ca"),
        users={TID: "s3cret-broker-pass", "observer": "look"},
    )
    b.start()
    try:
        yield b
    finally:
        b.stop()


def password_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqtt.pass"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_tls_with_a_test_ca_and_a_password_file_works(
    make_rig: Callable[..., Rig],
    tls_broker: Broker,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    assert tls_broker.tls is not None
    sub = Subscriber(tls_broker, [f"{BASE}/#"], username="observer", password="look")
    try:
        rig = make_rig(
            telemetry_config(
                tmp_path,
                simulator.url,
                mqtt_url=tls_broker.url,
                username=TID,
                password_file=password_file(tmp_path, "s3cret-broker-pass"),
                ca_bundle=str(tls_broker.tls.ca_pem),
            )
        )
        sub.wait_for(is_availability("online"), WAIT_S, "online over TLS")
        code = payment_code("0999", 41)
        rig.scanner.scan(code)
        sub.wait_for(lambda m: m.topic == f"{BASE}/sale", WAIT_S, "a sale over TLS")
        refs = [t.ref for t in rig.kiosk.journal.listing(include_all=True)]
        rig.stop()
        check_no_secret_in(sub.messages, [code], refs, secrets=["s3cret-broker-pass"])
        assert not rig.log.named("telemetry.connect_failed")
    finally:
        sub.close()


def test_a_wrong_ca_fails_cleanly_and_the_kiosk_sells_on(
    make_rig: Callable[..., Rig],
    tls_broker: Broker,
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    other = make_ca(tmp_path / "other-ca", name="not-the-brokers-ca")
    rig = make_rig(
        telemetry_config(
            tmp_path,
            simulator.url,
            mqtt_url=tls_broker.url,
            username=TID,
            password_file=password_file(tmp_path, "s3cret-broker-pass"),
            ca_bundle=str(other.ca_pem),
        )
    )
    failed = rig.log.wait_for("telemetry.connect_failed", WAIT_S)
    error = rig.log.events[failed]["error"]
    assert "not trusted" in error, error
    assert "s3cret" not in str(rig.log.events)
    rig.scanner.scan(payment_code("0999", 51))
    assert rig.vend.wait_for_approval(WAIT_S) is not None  # selling as usual
    sink = rig.kiosk.telemetry
    assert sink is not None and not sink.connected.is_set()
    rig.stop()


def test_a_state_change_while_the_state_is_being_published_goes_out_too(
    broker: Broker, subscriber: Subscriber, simulator: GatewaySimulator, tmp_path: Path
) -> None:
    """The kiosk moves on (here: to ready) while the telemetry thread is building the state
    it had: that change is published as well, not forgotten until the next heartbeat."""
    import threading
    from datetime import UTC, datetime

    from kiosk.alarms import AlarmBoard
    from kiosk.figures import FiguresReader
    from kiosk.telemetry import KioskSnapshot, TelemetrySink

    config = telemetry_config(tmp_path, simulator.url, mqtt_url=broker.url)
    sink = TelemetrySink(config, FiguresReader(config.kiosk.state_dir), AlarmBoard())
    build = sink._state_payload
    raced = threading.Event()

    def racing_payload() -> str:
        payload = build()
        if not raced.is_set():
            raced.set()
            sink.state_changed(KioskSnapshot(KioskState.READY, None, datetime.now(UTC)))
        return payload

    sink._state_payload = racing_payload  # type: ignore[method-assign]
    sink.start()
    try:
        subscriber.wait_for(state_where(lambda s: s["state"] == "starting"), WAIT_S, "starting")
        subscriber.wait_for(state_where(lambda s: s["state"] == "ready"), WAIT_S, "ready")
    finally:
        sink.stop()
