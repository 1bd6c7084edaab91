"""The small interfaces between the core and the hardware edges.

The core never imports evdev, gpiozero or serial: it talks to a `Scanner`, an `Indicator` and a
`VendOutput`, built from the config by `drivers.build`. Each driver has a fake twin, so a test or
`kiosk demo` runs the same core code paths as a kiosk in the field.

Threading contract: drivers may call the callbacks they are given from their own threads. The
callbacks are cheap and never block (the daemon puts an event on its queue and returns).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol


class KioskState(enum.StrEnum):
    """What the lights and buzzer show (SPEC section 6)."""

    STARTING = "starting"
    READY = "ready"
    PAYING = "paying"
    VENDING = "vending"
    DECLINED = "declined"
    OFFLINE = "offline"
    OUT_OF_SERVICE = "out_of_service"


class Sound(enum.StrEnum):
    """One-off buzzer signals that are not tied to a state change."""

    SCAN = "scan"  # short beep: a code was read and a payment starts
    ERROR = "error"  # short error beep: the scan was ignored or was not a payment code


class Indicator(Protocol):
    """Status lights and buzzer."""

    def show(self, state: KioskState) -> None:
        """Switch to this state's pattern at once, interrupting the previous one."""

    def sound(self, sound: Sound) -> None:
        """Play a one-off signal over the current light pattern."""

    def close(self) -> None:
        """Turn everything off and release the pins. Safe to call twice."""


# A scanner hands over each complete line it read (without the terminator). The core decides
# whether it is a payment code; drivers do not drop anything silently.
ScanCallback = Callable[[str], None]


class Scanner(Protocol):
    """A barcode scanner: it reads codes and hands each complete one to `on_scan`."""

    def start(self, on_scan: ScanCallback) -> None:
        """Begin reading in the background (reconnecting after unplug)."""

    def healthy(self) -> bool:
        """True while the device is open, or while the driver is waiting for a replug."""

    def close(self) -> None:
        """Stop reading and release the device (ungrab). Safe to call twice."""


class VendResult(enum.StrEnum):
    """How a vend ended, as far as the vending side says."""

    VENDED = "vended"  # SUCCESS <ref>, or the drop sensor saw the product fall
    FAILED = "failed"  # FAILURE <ref>
    TIMED_OUT = "timed_out"  # no word within vend.timeout_s: counts as a failure


@dataclass(frozen=True)
class VendRequest:
    """The controller's `VEND <item> <amount>` (vmc sale mode): the customer chose."""

    item: str
    amount: Decimal


class VendListener(Protocol):
    """What the vend output tells the core about the controller's own requests (vmc mode)."""

    def on_vend_request(self, request: VendRequest) -> None: ...

    def on_vend_cancel(self) -> None: ...


class VendOutput(Protocol):
    """Releases the product and reports whether it came out."""

    def start(self, listener: VendListener) -> None:
        """Begin listening to the controller (serial) or the drop sensor (relay)."""

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        """Approve the vend (`APPROVED <ref> <amount>` or a relay pulse) and block until it
        is confirmed, failed, or `timeout_s` passes."""

    def await_report(self, ref: str, timeout_s: float) -> VendResult:
        """After a restart: wait for a `SUCCESS`/`FAILURE` the controller may still send for a
        vend approved before the restart, without approving again."""

    def deny(self, reason: str) -> None:
        """Tell the controller the payment was refused (`DENIED <reason>`)."""

    def answer_vend(self, answer: str) -> None:
        """Answer a `VEND` request: `OK`, `BUSY`, `OUT_OF_SERVICE <reason>`, `CANCELLED`,
        `TIMEOUT` (no scan within scan_timeout_s)."""

    def healthy(self) -> bool:
        """True while the link is open, or while the driver is reconnecting."""

    def close(self) -> None:
        """Release the port or pins. Safe to call twice."""


class ReaderSwitch(Protocol):
    """An optional capability of a `VendOutput` that is a payment device in the machine's eyes
    (MDB cashless): the core switches it off while it cannot take payments, so the machine
    goes on selling for cash, and learns why the device itself cannot take them.

    The core calls these through `set_available()` and `vend_problem()` below, so vend outputs
    without the capability (serial, relay, fake) need nothing. A driver with this capability
    also calls `listener.on_vend_problem(problem)` when `problem()` changes, if its listener has
    that method, so the core need not poll.
    """

    def set_available(self, available: bool, reason: str | None) -> None:
        """The kiosk can take payments (`True`), or cannot (`False`, with the kiosk state's
        reason: offline, out of service, stopping). Returns at once; the device follows."""

    def problem(self) -> str | None:
        """Why the device cannot take payments now (a board that refused its configuration,
        or stopped answering), as text for `out_of_service`; None while it can."""


def set_available(output: VendOutput, available: bool, reason: str | None = None) -> None:
    """Tell a vend output with a reader switch whether the kiosk can take payments; a no-op
    for the others."""
    switch = getattr(output, "set_available", None)
    if switch is not None:
        switch(available, reason)


def acknowledge(output: VendOutput, ref: str) -> None:
    """The outcome of `ref`'s vend is recorded (journaled): a vend output whose controller
    repeats its report until it is acknowledged (serial: `ACK <ref>`) may tell it now. A no-op
    for outputs without acknowledgements (relay, MDB, fake)."""
    ack = getattr(output, "acknowledge", None)
    if ack is not None:
        ack(ref)


def vend_running(output: VendOutput) -> bool:
    """Whether the vend output's own machinery runs (for the watchdog). A driver whose
    `healthy()` also counts a problem it retries by itself (see `problem()`) says so with
    `running()`; for the others this is `healthy()`."""
    running = getattr(output, "running", None)
    return bool(running()) if running is not None else output.healthy()


def vend_problem(output: VendOutput) -> str | None:
    """The vend output's own reason for not taking payments, if it has a way to say one."""
    problem = getattr(output, "problem", None)
    return problem() if problem is not None else None


def link_up(part: Scanner | VendOutput) -> bool:
    """Whether a scanner or vend output is connected to its device now (for the link-down
    alarm). A driver that can tell says so with `connected()` (a serial port open, an input
    node open); for the others this is `healthy()`, which also holds while reconnecting."""
    connected = getattr(part, "connected", None)
    if connected is not None:
        return bool(connected()) and part.healthy()
    return part.healthy()


def cancel_abandons_payment(output: VendOutput) -> bool:
    """Whether the controller dropping its request mid-payment abandons the payment (MDB:
    nothing may be approved late), rather than being answered BUSY (the serial link)."""
    return bool(getattr(output, "cancel_abandons_payment", False))


def reports_name_the_vend(output: VendOutput) -> bool:
    """Whether the controller's vend report names the vend it is about (serial: `SUCCESS
    <ref>`). An MDB report does not: after a restart, one report cannot tell which of two
    unconfirmed vends it is about."""
    return bool(getattr(output, "reports_name_the_vend", True))
