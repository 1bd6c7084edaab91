"""The relay vend output on gpiozero's MockFactory: the pulse, and the drop sensor's verdict."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from drivers.vend_relay import RelayVendOutput
from kiosk.ports import VendResult

T = TypeVar("T")
RELAY, SENSE = 23, 24
WAIT_S = 5.0
PRICE = Decimal("1.50")


class RecordingPin(MockPin):
    """A mock pin that wakes waiters on every state change."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.changed = threading.Condition()  # before super(): it may already drive the pin
        super().__init__(factory, info)

    def _change_state(self, value: Any) -> bool:
        with self.changed:
            changed: bool = super()._change_state(value)
            self.changed.notify_all()
        return changed

    def wait_states(self, count: int, timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.states) >= count, timeout)


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    # A fresh factory per test, reset and closed after it: class-level state must not leak.
    mock = MockFactory(pin_class=RecordingPin)
    yield mock
    mock.reset()
    mock.close()


@pytest.fixture
def relay_pin(factory: MockFactory) -> RecordingPin:
    return factory.pin(RELAY)


@pytest.fixture
def sense_pin(factory: MockFactory) -> RecordingPin:
    return factory.pin(SENSE)


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield lambda call: pool.submit(call)


def relay_output(factory: MockFactory, **options: Any) -> RelayVendOutput:
    settings: dict[str, Any] = {
        "relay_pin": RELAY,
        "pulse_ms": 200,
        "sense_pin": SENSE,
        "sense_timeout_s": 0.2,
        "pin_factory": factory,
    }
    settings.update(options)
    return RelayVendOutput(**settings)


def test_without_a_sensor_the_pulse_is_a_vend_of_pulse_ms(
    factory: MockFactory, relay_pin: RecordingPin
) -> None:
    with relay_output(factory, sense_pin=None, pulse_ms=300) as relay:
        relay_pin.clear_states()
        assert relay.dispense("K1", PRICE, 30) is VendResult.VENDED
    assert len(relay_pin.states) == 3
    relay_pin.assert_states_and_times([(0, False), (0, True), (0.3, False)])


def test_drop_seen_after_the_pulse_is_vended(
    factory: MockFactory, relay_pin: RecordingPin, sense_pin: RecordingPin, background
) -> None:
    with relay_output(factory, sense_timeout_s=WAIT_S) as relay:
        relay_pin.clear_states()
        result = background(lambda: relay.dispense("K2", PRICE, 30))
        assert relay_pin.wait_states(3)  # on, then off: the pulse is over
        sense_pin.drive_low()  # the product breaks the beam
        sense_pin.drive_high()
        assert result.result(WAIT_S) is VendResult.VENDED


def test_drop_seen_during_the_pulse_is_vended(
    factory: MockFactory, relay_pin: RecordingPin, sense_pin: RecordingPin, background
) -> None:
    with relay_output(factory, pulse_ms=500, sense_timeout_s=0.1) as relay:
        relay_pin.clear_states()
        result = background(lambda: relay.dispense("K3", PRICE, 30))
        assert relay_pin.wait_states(2)  # the relay is on
        sense_pin.drive_low()
        assert result.result(WAIT_S) is VendResult.VENDED


def test_no_drop_within_the_sense_timeout_is_failed(
    factory: MockFactory, relay_pin: RecordingPin
) -> None:
    with relay_output(factory, pulse_ms=100, sense_timeout_s=0.2) as relay:
        relay_pin.clear_states()
        assert relay.dispense("K4", PRICE, 30) is VendResult.FAILED
    assert len(relay_pin.states) == 3
    relay_pin.assert_states_and_times([(0, False), (0, True), (0.1, False)])


def test_a_sensor_already_blocked_cannot_confirm_a_vend(
    factory: MockFactory, sense_pin: RecordingPin
) -> None:
    with relay_output(factory, pulse_ms=50, sense_timeout_s=0.1) as relay:
        sense_pin.drive_low()  # beam blocked before the pulse: no new edge can come
        assert relay.dispense("K5", PRICE, 30) is VendResult.FAILED


def test_a_drop_before_the_pulse_does_not_count(
    factory: MockFactory, sense_pin: RecordingPin
) -> None:
    with relay_output(factory, pulse_ms=50, sense_timeout_s=0.1) as relay:
        sense_pin.drive_low()
        sense_pin.drive_high()
        assert relay.dispense("K6", PRICE, 30) is VendResult.FAILED


def test_the_same_ref_is_never_pulsed_twice(factory: MockFactory, relay_pin: RecordingPin) -> None:
    with relay_output(factory, sense_pin=None, pulse_ms=50) as relay:
        relay_pin.clear_states()
        assert relay.dispense("K7", PRICE, 30) is VendResult.VENDED
        assert relay.dispense("K7", PRICE, 30) is VendResult.VENDED
    assert [state for _, state in relay_pin.states] == [False, True, False]


def test_active_low_relay_idles_high(factory: MockFactory, relay_pin: RecordingPin) -> None:
    with relay_output(factory, sense_pin=None, active_high=False, pulse_ms=50) as relay:
        assert relay_pin.state is True
        relay_pin.clear_states()
        relay.dispense("K8", PRICE, 30)
    assert [state for _, state in relay_pin.states][:3] == [True, False, True]


def test_await_report_after_a_restart_cannot_tell(factory: MockFactory) -> None:
    with relay_output(factory) as relay:
        assert relay.await_report("K9", 30) is VendResult.TIMED_OUT


def test_controller_messages_are_accepted_and_ignored(factory: MockFactory) -> None:
    with relay_output(factory) as relay:
        relay.deny("TIMEOUT")
        relay.answer_vend("OK")
        assert relay.healthy()


def test_close_releases_the_pins_and_is_safe_twice(
    factory: MockFactory, relay_pin: RecordingPin
) -> None:
    relay = relay_output(factory)
    relay.close()
    relay.close()
    assert not relay.healthy()
    assert relay_pin.function == "input"
    relay_output(factory).close()  # the pins can be taken again
