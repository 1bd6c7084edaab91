"""A light switch that failed is not a light shown.

The journal worker's request finds no gateway; the loop goes offline and switches the lights,
and the light driver fails once (a GPIO write refused). The loop's safe state after a failed
handler must leave lights that say what is true: OFFLINE, not the READY still lit from before.
"""

from __future__ import annotations

from collections.abc import Callable

from kiosk.ports import KioskState
from tests.loop_rig import Rig


def test_a_failed_switch_to_offline_is_shown_when_the_lights_take_it_again(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)
    show = rig.lights.show
    failed = []

    def once_refused(state: KioskState) -> None:
        if state is KioskState.OFFLINE and not failed:
            failed.append(state)
            raise OSError("GPIO write refused")
        show(state)

    rig.lights.show = once_refused  # type: ignore[method-assign]
    mark = rig.log.size
    rig.kiosk.unreachable()  # a request of the worker's flow found no gateway
    rig.log.wait_for("indicator.failed", after=mark - 1, part="lights")
    assert rig.kiosk.status.offline
    assert failed
    # Asked again at the loop's next tick, it takes it.
    rig.log.wait_for("indicator.recovered", after=mark - 1, part="lights")
    rig.stop()
    assert rig.lights.state is KioskState.OFFLINE, (
        f"the kiosk is offline but the lights show {rig.lights.state}: {rig.lights.history}"
    )
