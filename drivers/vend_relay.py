"""A vend output for machines without a controller: pulse a relay to release the product, and
optionally confirm it with a drop sensor. Pins through gpiozero (injected `pin_factory`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from decimal import Decimal
from typing import Any

from gpiozero import DigitalInputDevice, DigitalOutputDevice

from kiosk.log import event
from kiosk.ports import VendListener, VendResult

log = logging.getLogger(__name__)

SETTLED_MEMORY = 256  # refs remembered, so a repeated dispense never pulses twice


class RelayVendOutput:
    """`VendOutput` on a relay pin, with an optional drop sensor on `sense_pin`.

    With a sensor (pulled up; a falling product pulls it low = active), a vend is VENDED when
    the sensor fires between the start of the pulse and `sense_timeout_s` after its end, else
    FAILED. Without one, the vend is VENDED once the pulse is done: nothing can say otherwise.
    """

    def __init__(
        self,
        relay_pin: int,
        pulse_ms: float,
        sense_pin: int | None,
        sense_timeout_s: float,
        active_high: bool = True,
        pin_factory: Any = None,
    ) -> None:
        self._pulse_s = pulse_ms / 1000
        self._sense_timeout_s = sense_timeout_s
        self._closed = threading.Event()
        self._dropped = threading.Event()
        self._vend_lock = threading.Lock()  # one vend at a time
        self._settled: OrderedDict[str, VendResult] = OrderedDict()
        self._relay = DigitalOutputDevice(
            relay_pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
        )
        self._sensor: DigitalInputDevice | None = None
        if sense_pin is not None:
            try:
                self._sensor = DigitalInputDevice(sense_pin, pull_up=True, pin_factory=pin_factory)
            except Exception:
                self._relay.close()
                raise
            self._sensor.when_activated = self._dropped.set

    def start(self, listener: VendListener) -> None:
        """Nothing to listen to: a relay has no controller asking for vends."""

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        """Pulse the relay and, with a sensor, wait up to `sense_timeout_s` after the pulse for
        the drop (`timeout_s`, the serial link's wait, does not apply here)."""
        with self._vend_lock:
            known = self._settled.get(ref)
            if known is not None:
                event(log, "vend.dispense_repeated", logging.WARNING, ref=ref, result=known.value)
                return known
            result = self._pulse_and_watch(ref)
            self._settled[ref] = result
            while len(self._settled) > SETTLED_MEMORY:
                self._settled.popitem(last=False)
        event(log, "vend.result", ref=ref, result=result.value)
        return result

    def await_report(self, ref: str, timeout_s: float) -> VendResult:
        """A relay cannot tell, after a restart, whether a product fell: TIMED_OUT (reversed)."""
        return VendResult.TIMED_OUT

    def deny(self, reason: str) -> None:
        """No controller to tell."""

    def answer_vend(self, answer: str) -> None:
        """No controller to answer."""

    def healthy(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        """Release the relay (off) and the sensor. A vend in progress is finished first (at
        most the pulse plus `sense_timeout_s`), so it never ends half done. Safe twice."""
        self._closed.set()
        with self._vend_lock:
            self._relay.close()
            if self._sensor is not None:
                self._sensor.close()

    def __enter__(self) -> RelayVendOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pulse_and_watch(self, ref: str) -> VendResult:
        if self._closed.is_set():
            return VendResult.FAILED  # the relay is released: nothing was pulsed
        sensor = self._sensor
        if sensor is not None and sensor.is_active:
            # A blocked beam cannot fire again: this vend cannot be confirmed.
            event(log, "vend.sensor_stuck", logging.WARNING, ref=ref)
        self._dropped.clear()
        event(log, "vend.pulse", ref=ref, pulse_ms=round(self._pulse_s * 1000))
        self._relay.on()
        try:
            time.sleep(self._pulse_s)  # the pulse itself: the relay must stay on this long
        finally:
            self._relay.off()
        if sensor is None:
            return VendResult.VENDED
        return VendResult.VENDED if self._dropped.wait(self._sense_timeout_s) else VendResult.FAILED
