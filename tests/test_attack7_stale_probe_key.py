"""A key problem found by a probe of a replaced config does not overrule the reload.

Offline, the probe builds its own client from the running config. While it reads the key files
(a slow card), a SIGHUP applies a new config whose clients are built fine. The probe then fails
on the old config's key: that says nothing about the key in use now, and must not take the
kiosk out of service (until the next key retry, a probe interval later) right after a reload
that proved its key usable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiosk.alipay.client import AlipayClient
from kiosk.daemon import KEY
from kiosk.errors import KeyFileError
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.loop_rig import Rig, rig_config


def test_a_stale_probes_key_problem_leaves_the_reloaded_kiosk_in_service(
    make_rig: Callable[..., Rig],
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    config = rig_config(tmp_path / "state", simulator.url, alipay={"probe_interval_s": 0.2})
    newer = replace(config, alipay=replace(config.alipay, probe_interval_s=30.0))
    reading, read = threading.Event(), threading.Event()
    probes = [0]

    def client_factory() -> Any:
        if threading.current_thread().name == "probe":
            probes[0] += 1
            if probes[0] == 1:  # the first probe reads the old config's key, slowly
                reading.set()
                assert read.wait(20), "the test never let the key read end"
                raise KeyFileError("private key file /etc/kiosk/old.pem: readable by others")
        return make_client(pay_timeout_s=1.0)

    rig = make_rig(config, client_factory=client_factory, reload_config=lambda: newer)
    assert rig.lights.wait_for(KioskState.READY, 10)
    rig.kiosk.unreachable()  # offline: the probe starts
    assert reading.wait(10)
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reloaded", after=mark - 1)
    assert KEY not in rig.kiosk.status.reasons  # the new config's clients were built

    handle = rig.kiosk._handle
    heard = threading.Event()

    def watched(kind: str, payload: Any) -> None:
        handle(kind, payload)
        if kind == "probe" and payload[0] == 0:
            heard.set()

    rig.kiosk._handle = watched  # type: ignore[method-assign]
    read.set()
    assert heard.wait(10)
    assert KEY not in rig.kiosk.status.reasons, (
        "out of service on the key of a config that the reload replaced: "
        f"{rig.kiosk.status.reasons}"
    )
    rig.stop()
