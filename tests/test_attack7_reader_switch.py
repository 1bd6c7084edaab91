"""A reader switch that fails does not keep the lights, or the stop, from what is true.

A vend output with a reader switch (MDB) is told whether the kiosk can take payments. When that
switch raises (a driver fault), the loop's handler fails and its safe state tries again; but
the lights are a device of their own: the buyer must still see OFFLINE when the kiosk is
offline, and a SIGTERM with a sale in hand must still end in a clean stop, not an exception
out of the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from drivers.vend_fake import FakeVendOutput
from kiosk.ports import KioskState
from tests.conftest import payment_code
from tests.loop_rig import Rig


class FailingReader(FakeVendOutput):
    """A fake vend output with a reader switch that can be made to raise."""

    def __init__(self) -> None:
        super().__init__()
        self.switches: list[tuple[bool, str | None]] = []
        self.refuse: Callable[[bool, str | None], bool] = lambda available, reason: False

    def set_available(self, available: bool, reason: str | None = None) -> None:
        if self.refuse(available, reason):
            raise OSError("reader switch refused")
        self.switches.append((available, reason))


def test_a_failing_reader_switch_still_lets_the_lights_show_offline(
    make_rig: Callable[..., Rig],
) -> None:
    reader = FailingReader()
    rig = make_rig(vend=reader)
    assert rig.lights.wait_for(KioskState.READY, 10)
    assert reader.switches[-1] == (True, None)
    reader.refuse = lambda available, reason: True  # the switch fails from now on

    mark = rig.log.size
    rig.kiosk.unreachable()  # a request of the worker's flow found no gateway
    rig.log.wait_for("indicator.failed", after=mark - 1, part="reader")
    assert rig.kiosk.status.offline
    assert rig.lights.wait_for(KioskState.OFFLINE, 5), (
        "the kiosk is offline but the lights still show "
        f"{rig.lights.state}: a failing reader switch kept them from changing "
        f"({rig.lights.history})"
    )


def test_a_reader_switch_failing_at_the_stop_during_a_sale_ends_in_a_clean_stop(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = FailingReader()
    rig = make_rig(vend=reader)
    assert rig.lights.wait_for(KioskState.READY, 10)
    escaped: list[BaseException] = []
    hook = threading.excepthook

    def caught(args: Any) -> None:
        if args.thread is rig.thread:
            escaped.append(args.exc_value)
            return
        hook(args)

    monkeypatch.setattr(threading, "excepthook", caught)
    reader.refuse = lambda available, reason: reason == "stopping"
    reader.hold()  # the paid sale's vend is in progress when the stop comes
    rig.scanner.scan(payment_code("0001", 1))
    assert reader.wait_for_approval(10)
    rig.kiosk.stop()
    reader.release()
    rig.thread.join(20)
    assert not rig.thread.is_alive()
    assert rig.log.wait_until(lambda: rig.kiosk.stopped.is_set(), 10)
    assert escaped == [], f"the loop ended with an exception out of run(): {escaped!r}"
