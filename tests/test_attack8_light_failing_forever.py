"""A light driver that refuses for good: the kiosk says so once, and goes on selling.

A GPIO write that keeps failing (a broken pin, a board pulled loose) is asked again every
second. The log must say so once (`indicator.failed`), not claim a new light state every
second forever: an `"event": "indicator"` line is the record of a change of light state (SPEC
section 6), and one a second fills the journal of a kiosk left for weeks with a dead LED.
The buzzer is a device of the same board: a beep that fails must not cost the sale either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kiosk.ports import KioskState, Sound
from tests.conftest import payment_code
from tests.loop_rig import Rig


def test_a_light_refused_for_good_is_not_logged_as_a_new_state_every_second(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)
    show = rig.lights.show
    attempts: list[KioskState] = []
    tried = threading.Condition()

    def refused(state: KioskState) -> None:
        if state is KioskState.OFFLINE:
            with tried:
                attempts.append(state)
                tried.notify_all()
            raise OSError("GPIO write refused")
        show(state)

    rig.lights.show = refused  # type: ignore[method-assign]
    mark = rig.log.size
    rig.kiosk.unreachable()  # a request found no gateway: the lights should show OFFLINE
    rig.log.wait_for("indicator.failed", after=mark - 1, part="lights")
    with tried:  # the loop asks the lights again at its ticks: let it ask a few times
        assert tried.wait_for(lambda: len(attempts) >= 4, 20), attempts
    claimed = [
        e
        for e in rig.log.events[mark:]
        if e.get("event") == "indicator" and e.get("state") == KioskState.OFFLINE.value
    ]
    failed = [e for e in rig.log.events[mark:] if e.get("event") == "indicator.failed"]
    assert len(failed) == 1
    assert len(claimed) <= 1, (
        f"the lights never took OFFLINE, yet the log claims the change {len(claimed)} times "
        f"after {len(attempts)} attempts: one line a second for as long as the pin is broken"
    )
    rig.stop()


def test_a_buzzer_that_refuses_does_not_stop_a_sale(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)

    def refused(sound: Sound) -> None:
        raise OSError("GPIO write refused")

    rig.lights.sound = refused  # type: ignore[method-assign]
    mark = rig.log.size
    rig.scanner.scan(payment_code("0001", 1))
    assert rig.vend.wait_for_approval(10), (
        "a paid-for scan was dropped because the buzzer could not beep: "
        f"{[e.get('event') for e in rig.log.events[mark:]]}"
    )
    rig.stop()
