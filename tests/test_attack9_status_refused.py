"""systemd's STATUS= refused does not hide an out-of-service alarm.

The notifier is one part among the others the loop switches as its state changes (SPEC section
6): one that refuses (its socket gone, a send that raises) is logged and asked again, and must
not keep the rest of the report from being made: the out_of_service alarm for a reason present
is what tells a person the kiosk stopped selling (SPEC section 5's alarm topic).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from kiosk.systemd import Notifier
from tests.loop_rig import Rig, rig_config


class RefusingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.refused = 0

    def status(self, text: str) -> None:
        self.refused += 1
        raise OSError("notify socket refused")


def test_a_refused_status_line_does_not_keep_the_out_of_service_alarm_from_being_raised(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    config = rig_config(tmp_path / "state", simulator.url, kiosk={"require_synced_clock": True})
    synced = threading.Event()
    synced.set()
    notifier = RefusingNotifier()
    rig = make_rig(
        config, notifier=notifier, clock_synced=synced.is_set, clock_recheck_s=(0.05, 0.05)
    )
    assert rig.lights.wait_for(KioskState.READY, 10)
    synced.clear()  # the clock lost its time source: out of service at the next check
    assert rig.lights.wait_for(KioskState.OUT_OF_SERVICE, 5)
    rig.log.wait_for("indicator.failed", 5, part="systemd")
    assert rig.log.wait_until(lambda: rig.kiosk.alarms.is_active("out_of_service", "clock"), 5), (
        "out of service, and no out_of_service alarm: the refused STATUS= line skipped it "
        f"(alarms: {[a.payload() for a in rig.kiosk.alarms.active()]}, "
        f"status refused {notifier.refused} times)"
    )
    rig.stop()
