"""A light switch refused once does not wedge the kiosk or end it.

The light driver refuses one switch (a GPIO write that failed once) and works again after. The
loop survives a failed handler and its safe state shows the true state; that must hold for
every switch: the one to PAYING as a sale starts (the sale either runs or is not left in hand:
never a kiosk that calls every later scan busy and never stops), and the one to STARTING before
the loop runs (never an exception out of `run()`, which under systemd is a restart loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from drivers.indicator_fake import FakeIndicator
from kiosk.ports import KioskState
from tests.conftest import payment_code
from tests.loop_rig import Rig


def refuse_once(lights: FakeIndicator, refused: KioskState) -> list[KioskState]:
    show = lights.show
    failed: list[KioskState] = []

    def once_refused(state: KioskState) -> None:
        if state is refused and not failed:
            failed.append(state)
            raise OSError("GPIO write refused")
        show(state)

    lights.show = once_refused  # type: ignore[method-assign]
    return failed


def test_a_refused_switch_to_paying_does_not_leave_a_sale_in_hand_forever(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)
    failed = refuse_once(rig.lights, KioskState.PAYING)
    mark = rig.log.size
    rig.scanner.scan(payment_code("0001", 1))
    rig.log.wait_for("indicator.failed", after=mark - 1, part="lights")
    assert failed
    # Either the sale went on, or it is not in hand: not a kiosk busy with a sale nobody runs.
    assert rig.log.wait_until(lambda: not rig.kiosk._sale_busy(), 10), (
        "a sale is in hand that no thread runs: every scan is now 'busy', a reload waits "
        f"forever, and a stop never returns (lights: {rig.lights.history})"
    )
    rig.stop()


def test_a_switch_refused_once_at_start_does_not_end_the_kiosk(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    show = FakeIndicator.show
    failed: list[KioskState] = []

    def once_refused(self: FakeIndicator, state: KioskState) -> None:
        if state is KioskState.STARTING and not failed:
            failed.append(state)
            raise OSError("GPIO write refused")
        show(self, state)

    monkeypatch.setattr(FakeIndicator, "show", once_refused)
    escaped: list[BaseException] = []
    hook = threading.excepthook

    def caught(args: Any) -> None:
        if args.thread.name != "MainThread" and args.exc_type is OSError:
            escaped.append(args.exc_value)
            return
        hook(args)

    monkeypatch.setattr(threading, "excepthook", caught)
    try:
        rig = make_rig()
    except AssertionError:
        rig = None
    assert failed
    assert escaped == [], f"run() ended with the light driver's exception: {escaped!r}"
    assert rig is not None and rig.kiosk.ready.is_set()
    assert rig.lights.wait_for(KioskState.READY, 10)
    rig.stop()
