"""Status lights and buzzer on gpiozero's MockFactory: each state's pattern and its timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero import GPIOPinInUse
from gpiozero.pins.mock import MockFactory, MockPWMPin
from gpiozero.threads import GPIOThread
from gpiozero.tones import Tone

from drivers import indicator_gpio as gpio
from drivers.indicator_gpio import GpioIndicator
from kiosk.ports import KioskState, Sound

GREEN, RED, AMBER, BUZZER = 17, 27, 22, 18
WAIT_S = 5.0
OFF, ON = 0.0, 1.0


class RecordingPin(MockPWMPin):
    """A mock PWM pin that wakes waiters on every state change and remembers its tones."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.changed = threading.Condition()  # before super(): it may already drive the pin
        self.frequencies: list[float | None] = []
        super().__init__(factory, info)

    def _change_state(self, value: Any) -> bool:
        with self.changed:
            changed: bool = super()._change_state(value)
            self.changed.notify_all()
        return changed

    def _set_frequency(self, value: Any) -> None:
        super()._set_frequency(value)
        self.frequencies.append(value)

    def wait_states(self, count: int, timeout: float = WAIT_S) -> bool:
        """Wait until `states` holds at least `count` entries (the first is the cleared one)."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.states) >= count, timeout)


START_TOLERANCE_S = 0.3  # a pattern's first change waits for a thread to be scheduled


def _prompt_start(
    pin: RecordingPin, expected: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Check that the first change came promptly, then measure the rest of the pattern from it:
    a busy test machine may take longer than gpiozero's 50 ms tolerance to start a thread, but
    the pattern's own timing (how long a beep or a blink lasts) must still hold."""
    if len(expected) < 2 or expected[1][0] != 0:
        return expected
    assert pin.states[1].timestamp < START_TOLERANCE_S, pin.states
    return [expected[0], (pin.states[1].timestamp, expected[1][1]), *expected[2:]]


def assert_pattern(pin: RecordingPin, expected: list[tuple[float, float]]) -> None:
    """The pin went through `expected` (gap since the previous change, state) so far. The
    length is checked first: gpiozero's assertion zips, so a short list would pass."""
    assert pin.wait_states(len(expected)), f"only {pin.states} within {WAIT_S} s"
    assert len(pin.states) >= len(expected)
    pin.assert_states_and_times(_prompt_start(pin, expected))


def assert_exactly(pin: RecordingPin, expected: list[tuple[float, float]]) -> None:
    assert len(pin.states) == len(expected), pin.states
    pin.assert_states_and_times(_prompt_start(pin, expected))


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    # A fresh factory per test, reset and closed after it: class-level state must not leak.
    mock = MockFactory(pin_class=RecordingPin)
    yield mock
    mock.reset()
    mock.close()


class Pins:
    def __init__(self, factory: MockFactory) -> None:
        self.green: RecordingPin = factory.pin(GREEN)
        self.red: RecordingPin = factory.pin(RED)
        self.amber: RecordingPin = factory.pin(AMBER)
        self.buzzer: RecordingPin = factory.pin(BUZZER)
        self.all = [self.green, self.red, self.amber, self.buzzer]

    def clear(self) -> None:
        for pin in self.all:
            pin.clear_states()
            pin.frequencies.clear()


@pytest.fixture
def pins(factory: MockFactory) -> Pins:
    return Pins(factory)


def make(factory: MockFactory, pins: Pins, **options: Any) -> GpioIndicator:
    indicator = GpioIndicator(GREEN, RED, AMBER, BUZZER, pin_factory=factory, **options)
    pins.clear()
    return indicator


@pytest.fixture
def indicator(factory: MockFactory, pins: Pins) -> Iterator[GpioIndicator]:
    with make(factory, pins) as ind:
        yield ind


@pytest.fixture
def passive(factory: MockFactory, pins: Pins) -> Iterator[GpioIndicator]:
    with make(factory, pins, buzzer_type="passive") as ind:
        yield ind


def gpio_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if isinstance(t, GPIOThread) and t.is_alive()}


@pytest.fixture
def blink_threads() -> Callable[..., int]:
    """How many gpiozero background threads (blinks) run now that did not before the test;
    with `finishing=True`, after giving those that are ending a moment to end."""
    before = gpio_threads()

    def count(finishing: bool = False) -> int:
        if finishing:
            for thread in gpio_threads() - before:
                thread.join(timeout=1.0)
        return len(gpio_threads() - before)

    return count


# -- the states of SPEC section 6 ---------------------------------------------------------


def test_starting_lights_amber_only(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.STARTING)
    indicator.close()
    assert_exactly(pins.amber, [(0, OFF), (0, ON), (0, OFF)])  # the last: close()
    for pin in (pins.green, pins.red, pins.buzzer):
        assert_exactly(pin, [(0, OFF)])


def test_ready_lights_green_only(
    indicator: GpioIndicator, pins: Pins, blink_threads: Callable[..., int]
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.READY)
    assert pins.green.state == ON
    assert (pins.red.state, pins.amber.state, pins.buzzer.state) == (OFF, OFF, OFF)
    assert blink_threads() == 0


def test_paying_blinks_amber_every_half_second(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.PAYING)
    assert_pattern(pins.amber, [(0, OFF), (0, ON), (0.5, OFF), (0.5, ON), (0.5, OFF)])
    assert (pins.green.state, pins.red.state) == (OFF, OFF)


def test_paying_beeps_once_short(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.PAYING)
    assert pins.buzzer.wait_states(3)
    indicator.close()
    assert_exactly(pins.buzzer, [(0, OFF), (0, ON), (gpio.SHORT_BEEP_S, OFF)])


def test_vending_blinks_green_and_beeps_once_long(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.VENDING)
    assert_pattern(pins.green, [(0, OFF), (0, ON), (0.5, OFF), (0.5, ON)])
    indicator.close()
    assert_exactly(pins.buzzer, [(0, OFF), (0, ON), (0.8, OFF)])
    assert_exactly(pins.amber, [(0, OFF)])


def test_declined_holds_red_three_seconds_then_turns_it_off(
    indicator: GpioIndicator, pins: Pins, blink_threads: Callable[..., int]
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.DECLINED)
    assert_pattern(pins.red, [(0, OFF), (0, ON), (3.0, OFF)])
    assert blink_threads(finishing=True) == 0  # red stays off: nothing is left running
    assert (pins.green.state, pins.amber.state) == (OFF, OFF)


def test_declined_beeps_twice_short(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.DECLINED)
    assert pins.buzzer.wait_states(5)
    indicator.close()
    short, gap = gpio.SHORT_BEEP_S, gpio.BEEP_GAP_S
    assert_exactly(pins.buzzer, [(0, OFF), (0, ON), (short, OFF), (gap, ON), (short, OFF)])


def test_offline_blinks_red_slowly_with_green_on(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.OFFLINE)
    assert_pattern(pins.red, [(0, OFF), (0, ON), (1.0, OFF), (1.0, ON)])
    assert_exactly(pins.green, [(0, OFF), (0, ON)])
    assert_exactly(pins.buzzer, [(0, OFF)])


def test_out_of_service_lights_red_and_beeps_three_times_once(
    indicator: GpioIndicator, pins: Pins
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.OUT_OF_SERVICE)
    assert pins.buzzer.wait_states(7)
    assert pins.red.state == ON
    indicator.close()
    s, g = gpio.SHORT_BEEP_S, gpio.BEEP_GAP_S
    expected = [(0, OFF), (0, ON), (s, OFF), (g, ON), (s, OFF), (g, ON), (s, OFF)]
    assert_exactly(pins.buzzer, expected)


# -- sounds -------------------------------------------------------------------------------


def test_scan_sound_is_one_short_beep(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.sound(Sound.SCAN)
    assert pins.buzzer.wait_states(3)
    indicator.close()
    assert_exactly(pins.buzzer, [(0, OFF), (0, ON), (0.1, OFF)])


def test_error_sound_is_two_very_short_beeps(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.sound(Sound.ERROR)
    assert pins.buzzer.wait_states(5)
    indicator.close()
    e = gpio.ERROR_BEEP_S
    assert_exactly(pins.buzzer, [(0, OFF), (0, ON), (e, OFF), (e, ON), (e, OFF)])


def test_sound_leaves_the_lights_alone(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.READY)
    indicator.sound(Sound.ERROR)
    assert pins.buzzer.wait_states(5)
    assert_exactly(pins.green, [(0, OFF), (0, ON)])


def test_passive_buzzer_plays_a_high_tone_for_a_scan(passive: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    passive.sound(Sound.SCAN)
    assert pins.buzzer.wait_states(3)
    passive.close()
    assert_exactly(pins.buzzer, [(0, 0.0), (0, 0.5), (0.1, 0.0)])  # 50 % duty while sounding
    tones = [f for f in pins.buzzer.frequencies if f is not None]
    assert tones == [pytest.approx(Tone(gpio.HIGH_NOTE).frequency)]


def test_passive_buzzer_plays_a_low_tone_for_an_error(passive: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    passive.sound(Sound.ERROR)
    assert pins.buzzer.wait_states(5)
    passive.close()
    tones = {round(f) for f in pins.buzzer.frequencies if f is not None}
    assert tones == {220}


def test_passive_buzzer_beeps_with_the_states_too(passive: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    passive.show(KioskState.VENDING)
    assert pins.buzzer.wait_states(3)
    passive.close()
    assert_exactly(pins.buzzer, [(0, 0.0), (0, 0.5), (0.8, 0.0)])


# -- interruption and lifetime --------------------------------------------------------------


def test_new_state_stops_a_blink_at_once(
    indicator: GpioIndicator, pins: Pins, blink_threads: Callable[..., int]
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.PAYING)
    assert pins.amber.wait_states(3)  # on, then off: the blink thread is running
    started = time.monotonic()
    indicator.show(KioskState.READY)
    assert time.monotonic() - started < 0.2
    assert pins.amber.state == OFF
    assert blink_threads() == 0
    assert pins.green.state == ON


def test_new_state_cuts_off_a_long_beep(indicator: GpioIndicator, pins: Pins) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.VENDING)
    assert pins.buzzer.wait_states(2)  # the long beep has started
    indicator.show(KioskState.READY)
    assert pins.buzzer.state == OFF
    assert len(pins.buzzer.states) == 3
    assert pins.buzzer.states[-1].timestamp < 0.2  # well short of 0.8 s


def test_ready_after_declined_turns_red_off_before_the_three_seconds(
    indicator: GpioIndicator, pins: Pins, blink_threads: Callable[..., int]
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.DECLINED)
    assert pins.red.wait_states(2)
    indicator.show(KioskState.READY)
    assert pins.red.state == OFF
    assert pins.red.states[-1].timestamp < 0.2
    assert blink_threads() == 0


def test_close_turns_everything_off_and_is_safe_twice(
    indicator: GpioIndicator, pins: Pins, blink_threads: Callable[..., int]
) -> None:
    pins.clear()  # timings count from here
    indicator.show(KioskState.OFFLINE)
    indicator.sound(Sound.SCAN)
    indicator.close()
    indicator.close()
    assert [pin.state for pin in pins.all] == [OFF, OFF, OFF, OFF]
    assert blink_threads() == 0
    indicator.show(KioskState.READY)  # after close: ignored, not an error
    assert pins.green.state == OFF


def test_any_pin_may_be_missing(factory: MockFactory, pins: Pins) -> None:
    with GpioIndicator(None, RED, None, None, pin_factory=factory) as indicator:
        for state in KioskState:
            indicator.show(state)
        indicator.sound(Sound.SCAN)
        indicator.sound(Sound.ERROR)
        assert pins.red.state == ON  # out_of_service, the last state shown


def test_active_low_pins_are_inverted(factory: MockFactory, pins: Pins) -> None:
    with make(factory, pins, active_high=False) as indicator:
        indicator.show(KioskState.READY)
        assert (pins.green.state, pins.red.state, pins.amber.state) == (OFF, ON, ON)


def test_unknown_buzzer_type_is_refused(factory: MockFactory) -> None:
    with pytest.raises(ValueError, match="buzzer_type"):
        GpioIndicator(GREEN, RED, AMBER, BUZZER, buzzer_type="piezo", pin_factory=factory)


def test_failed_construction_releases_the_pins_it_took(factory: MockFactory) -> None:
    with pytest.raises(GPIOPinInUse):
        GpioIndicator(GREEN, GREEN, AMBER, BUZZER, pin_factory=factory)
    with GpioIndicator(GREEN, RED, AMBER, BUZZER, pin_factory=factory) as indicator:
        indicator.show(KioskState.READY)
