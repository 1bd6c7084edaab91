"""A probe's answer from a gateway the kiosk no longer uses does not put it back online.

Offline, the kiosk probes the gateway on a thread of its own. While that probe is out, a SIGHUP
moves the kiosk to another gateway, and a sale's pay there finds no gateway: the kiosk is
offline, and rightly so. Then the old probe comes back, answered by the old gateway. That answer
says nothing about the gateway the kiosk now uses: the kiosk must not light READY, switch an
MDB reader on and stop probing while the only request to its gateway failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiosk.alipay.client import AlipayClient
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Gate, GatedClient, Rig, rig_config

DEAD_GATEWAY = "http://127.0.0.1:9/gateway.do"  # nothing listens on the discard port


def test_an_old_gateways_answer_to_a_stale_probe_leaves_the_kiosk_offline(
    make_rig: Callable[..., Rig],
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    config = rig_config(tmp_path / "state", simulator.url, alipay={"probe_interval_s": 0.2})
    moved = replace(config, alipay=replace(config.alipay, gateway=DEAD_GATEWAY))
    gateway = [simulator.url]  # what the running config names, as the factory reads it
    probe_gate = Gate()
    probes = [0]

    def client_factory() -> Any:
        client = make_client(pay_timeout_s=1.0, gateway=gateway[0])
        if threading.current_thread().name == "probe":
            probes[0] += 1
            if probes[0] == 1:
                return GatedClient(client, "query", probe_gate)
        return client

    rig = make_rig(config, client_factory=client_factory, reload_config=lambda: moved)
    assert rig.lights.wait_for(KioskState.READY, 10)

    # A request found no gateway: offline, and the probe asks the (old) gateway.
    mark = rig.log.size
    rig.kiosk.unreachable()
    rig.log.wait_for("gateway.offline", after=mark - 1)
    assert rig.lights.wait_for(KioskState.OFFLINE, 10)
    assert probe_gate.reached.wait(10)

    # SIGHUP: the kiosk now uses another gateway, and a sale's pay there finds none.
    gateway[0] = DEAD_GATEWAY
    mark = rig.log.size
    rig.kiosk.reload()
    rig.log.wait_for("config.reloaded", after=mark - 1)
    assert rig.kiosk.config.alipay.gateway == DEAD_GATEWAY
    rig.scanner.scan(payment_code("0001", 1))
    assert rig.log.wait_until(lambda: "OFFLINE" in rig.vend.denials, 10), rig.vend.denials
    assert rig.log.wait_until(lambda: not rig.kiosk._sale_busy(), 10)
    assert rig.kiosk.status.offline
    assert rig.lights.wait_for(KioskState.OFFLINE, 10)  # the red light of the denial is over

    # The old probe comes back, answered by the old gateway.
    handle = rig.kiosk._handle
    heard, barrier = threading.Event(), threading.Event()

    def watched(kind: str, payload: Any) -> None:
        handle(kind, payload)
        if kind == "probe" and payload[0] == 0:
            heard.set()
        if (kind, payload) == ("gateway", "barrier"):
            barrier.set()  # everything told to the loop before it has been handled

    rig.kiosk._handle = watched  # type: ignore[method-assign]
    probe_gate.open.set()
    assert heard.wait(10)
    rig.kiosk.events.put(("gateway", "barrier"))  # no news: only a marker in the queue
    assert barrier.wait(10)
    online_ready = (
        not rig.kiosk.status.offline
        and rig.lights.state is KioskState.READY
        and rig.kiosk._next_probe is None
        and not rig.kiosk._probing
    )
    assert not online_ready, (
        "READY, probe stopped, on the word of a gateway the kiosk no longer uses; the only "
        f"request to {DEAD_GATEWAY} found no gateway (lights: {rig.lights.history})"
    )
    rig.stop()
