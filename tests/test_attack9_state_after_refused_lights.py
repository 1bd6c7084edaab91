"""Lights refused through a sale leave the kiosk's reported state true once it is over.

The lights refuse every switch while a sale runs (PAYING, VENDING), then the kiosk is back to
READY, the state the lights already show. The state the kiosk reports (status, systemd's STATUS=,
telemetry's `state`, SPEC section 6) must be READY, not a state the lights never took.
"""

from __future__ import annotations

from collections.abc import Callable

from kiosk.ports import KioskState
from tests.conftest import payment_code
from tests.loop_rig import Rig


def test_the_reported_state_is_ready_after_a_sale_the_lights_refused(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    assert rig.lights.wait_for(KioskState.READY, 10)
    show = rig.lights.show

    def refused(state: KioskState) -> None:
        raise OSError("GPIO write refused")

    rig.lights.show = refused  # type: ignore[method-assign]
    rig.scanner.scan(payment_code("0001", 1))
    assert rig.vend.wait_for_approval(10)
    assert rig.log.wait_until(lambda: not rig.kiosk._sale_busy(), 10)
    rig.lights.show = show  # type: ignore[method-assign]
    rig.log.wait_for("indicator.recovered", 5, part="lights")
    assert rig.log.wait_until(lambda: rig.kiosk.status.state is KioskState.READY, 5), (
        f"idle and showing READY, but reported as {rig.kiosk.status.state}"
    )
    rig.stop()
