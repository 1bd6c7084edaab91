"""Status lights and buzzer on GPIO pins (SPEC section 6), through gpiozero.

Every pin is optional. LEDs blink on gpiozero's own background threads; the buzzer plays short
sequences on one thread of ours. Either stops at once when a new state or sound is set.
Logging the state is the core's job (`{"event": "indicator"}`), not this driver's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpiozero import LED, Buzzer, TonalBuzzer
from gpiozero.tones import Tone

from kiosk.ports import KioskState, Sound

# Timings (seconds). Blinks are symmetric on/off.
BLINK_S = 0.5  # paying (amber), vending (green)
SLOW_BLINK_S = 1.0  # offline (red)
DECLINED_HOLD_S = 3.0  # red stays on this long, then goes off by itself
SHORT_BEEP_S = 0.1
BEEP_GAP_S = 0.1
LONG_BEEP_S = 0.8
ERROR_BEEP_S = 0.05  # two very short beeps: not to be mistaken for a scan beep

# Passive buzzers play a tone: a high A for signals, a low A for errors. A TonalBuzzer built
# on A4 with one octave reaches exactly A3..A5.
HIGH_NOTE = "A5"
LOW_NOTE = "A3"


@dataclass(frozen=True)
class Beep:
    """One beep and the silence after it."""

    on_s: float
    off_s: float = 0.0
    note: str = HIGH_NOTE  # passive buzzers only


SHORT = Beep(SHORT_BEEP_S)
SHORT_THEN_GAP = Beep(SHORT_BEEP_S, BEEP_GAP_S)

BEEPS: dict[KioskState | Sound, tuple[Beep, ...]] = {
    KioskState.PAYING: (SHORT,),
    KioskState.VENDING: (Beep(LONG_BEEP_S),),
    KioskState.DECLINED: (SHORT_THEN_GAP, SHORT),
    KioskState.OUT_OF_SERVICE: (SHORT_THEN_GAP, SHORT_THEN_GAP, SHORT),
    Sound.SCAN: (SHORT,),
    Sound.ERROR: (Beep(ERROR_BEEP_S, ERROR_BEEP_S, LOW_NOTE), Beep(ERROR_BEEP_S, 0.0, LOW_NOTE)),
}


class _Beeper:
    """Plays one beep sequence at a time on its own thread; a new one cuts the old one off."""

    def __init__(self, buzzer: Buzzer | TonalBuzzer) -> None:
        self._buzzer = buzzer
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def play(self, beeps: Sequence[Beep]) -> None:
        self.stop()
        if not beeps:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(beeps, self._stop), name="indicator-beeper", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self, beeps: Sequence[Beep], stop: threading.Event) -> None:
        try:
            for beep in beeps:
                self._sound(beep.note)
                if stop.wait(beep.on_s):
                    return
                self._silence()
                if stop.wait(beep.off_s):
                    return
        finally:
            self._silence()

    def _sound(self, note: str) -> None:
        if isinstance(self._buzzer, TonalBuzzer):
            self._buzzer.play(Tone(note))
        else:
            self._buzzer.on()

    def _silence(self) -> None:
        if isinstance(self._buzzer, TonalBuzzer):
            self._buzzer.stop()
        else:
            self._buzzer.off()


class GpioIndicator:
    """`Indicator` on up to three LEDs and a buzzer (active: on/off; passive: tones).

    | state          | green     | amber     | red                | buzzer             |
    |----------------|-----------|-----------|--------------------|--------------------|
    | starting       | off       | on        | off                | -                  |
    | ready          | on        | off       | off                | -                  |
    | paying         | off       | blink 0.5 | off                | one short (0.1)    |
    | vending        | blink 0.5 | off       | off                | one long (0.8)     |
    | declined       | off       | off       | on 3 s, then off   | two short          |
    | offline        | on        | off       | blink 1.0          | -                  |
    | out_of_service | off       | off       | on                 | three short        |

    Sounds: SCAN one short beep; ERROR two very short beeps (0.05 s; low tone when passive).
    """

    def __init__(
        self,
        green: int | None,
        red: int | None,
        amber: int | None,
        buzzer: int | None,
        buzzer_type: str = "active",
        active_high: bool = True,
        pin_factory: Any = None,
    ) -> None:
        if buzzer_type not in ("active", "passive"):
            raise ValueError(f"buzzer_type must be 'active' or 'passive', not {buzzer_type!r}")
        self._lock = threading.Lock()
        self._closed = False
        self._devices: list[Any] = []
        try:
            self._green = self._led(green, active_high, pin_factory)
            self._red = self._led(red, active_high, pin_factory)
            self._amber = self._led(amber, active_high, pin_factory)
            self._beeper: _Beeper | None = None
            if buzzer is not None:
                device: Buzzer | TonalBuzzer
                if buzzer_type == "passive":
                    device = TonalBuzzer(buzzer, mid_tone="A4", octaves=1, pin_factory=pin_factory)
                else:
                    device = Buzzer(buzzer, active_high=active_high, pin_factory=pin_factory)
                self._devices.append(device)
                self._beeper = _Beeper(device)
        except Exception:
            self._close_devices()
            raise

    def _led(self, pin: int | None, active_high: bool, pin_factory: Any) -> LED | None:
        if pin is None:
            return None
        led = LED(pin, active_high=active_high, pin_factory=pin_factory)
        self._devices.append(led)
        return led

    def show(self, state: KioskState) -> None:
        """Switch to `state`'s lights and beeps at once, cutting off the previous pattern."""
        with self._lock:
            if self._closed:
                return
            green, amber, red = _LIGHTS[state]
            _set(self._green, green)
            _set(self._amber, amber)
            _set(self._red, red)
            if self._beeper is not None:
                self._beeper.play(BEEPS.get(state, ()))

    def sound(self, sound: Sound) -> None:
        """Play a one-off signal over the current lights (cuts off a beep still sounding)."""
        with self._lock:
            if self._closed or self._beeper is None:
                return
            self._beeper.play(BEEPS[sound])

    def close(self) -> None:
        """Stop every pattern, turn everything off and release the pins. Safe twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._beeper is not None:
                self._beeper.stop()
            self._close_devices()

    def _close_devices(self) -> None:
        for device in self._devices:
            device.close()  # stops a blink thread and leaves the pin off
        self._devices.clear()

    def __enter__(self) -> GpioIndicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What each LED does in each state: "on", "off", "blink", "slow" or "hold" (on, then off by
# itself after DECLINED_HOLD_S, so a forgotten show() never leaves red on).
_LIGHTS: dict[KioskState, tuple[str, str, str]] = {
    #                          green     amber    red
    KioskState.STARTING: ("off", "on", "off"),
    KioskState.READY: ("on", "off", "off"),
    KioskState.PAYING: ("off", "blink", "off"),
    KioskState.VENDING: ("blink", "off", "off"),
    KioskState.DECLINED: ("off", "off", "hold"),
    KioskState.OFFLINE: ("on", "off", "slow"),
    KioskState.OUT_OF_SERVICE: ("off", "off", "on"),
}


def _set(led: LED | None, mode: str) -> None:
    # Each call replaces the LED's previous blink thread (gpiozero stops and joins it first).
    if led is None:
        return
    if mode == "on":
        led.on()
    elif mode == "off":
        led.off()
    elif mode == "blink":
        led.blink(on_time=BLINK_S, off_time=BLINK_S)
    elif mode == "slow":
        led.blink(on_time=SLOW_BLINK_S, off_time=SLOW_BLINK_S)
    elif mode == "hold":
        led.blink(on_time=DECLINED_HOLD_S, off_time=0, n=1)
    else:  # pragma: no cover - _LIGHTS holds only the modes above
        raise ValueError(mode)
