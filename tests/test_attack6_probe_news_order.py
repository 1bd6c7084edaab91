"""The probe's failure and a later answer: the answer decides.

Offline, the kiosk probes the gateway on a thread of its own. A sale's answer puts the kiosk
back online while the probe is still out; the probe's request then fails (its connection was
tried while the network was down) and its news waits for the loop. The journal worker's request
is answered after that: the gateway was last seen answering, so the kiosk must end online
(READY, the probe stopped), not offline until some later request or probe happens to answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiosk.alipay.client import AlipayClient
from kiosk.journal import Journal, TxnState
from kiosk.ports import KioskState
from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.loop_rig import Gate, GatedClient, Rig, rig_config, with_a_reversal_due


def test_an_answer_after_the_probes_failure_puts_the_kiosk_back_online(
    make_rig: Callable[..., Rig],
    make_client: Callable[..., AlipayClient],
    simulator: GatewaySimulator,
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "state")
    txn = with_a_reversal_due(journal)

    worker_gate, probe_gate, loop_gate = Gate(), Gate(), Gate()
    built = [0]

    def client_factory() -> Any:
        client = make_client(pay_timeout_s=1.0)
        if threading.current_thread().name == "probe":
            return GatedClient(client, "query", probe_gate, fail=True)
        built[0] += 1
        if built[0] == 2:  # the worker's: _build_flows makes the foreground's first
            return GatedClient(client, "cancel", worker_gate, fail=False)
        return client

    config = rig_config(tmp_path / "state", simulator.url, alipay={"probe_interval_s": 0.2})
    rig = make_rig(config, journal=journal, client_factory=client_factory)
    assert worker_gate.reached.wait(10)  # the worker's cancel is on its way

    # The gateway goes away: a sale's pay finds no gateway, the kiosk goes offline and probes.
    simulator.go_offline()
    mark = rig.log.size
    rig.scanner.scan(payment_code("0001", 1))
    rig.log.wait_for("gateway.offline", after=mark - 1)
    assert probe_gate.reached.wait(10)  # the probe's request is out
    assert rig.log.wait_until(lambda: rig.lights.state is KioskState.OFFLINE, 10)

    # The gateway is back: a sale's pay is answered, the kiosk is online and sells.
    simulator.go_online()
    mark = rig.log.size
    rig.scanner.scan(payment_code("0002", 2))
    rig.log.wait_for("gateway.online", after=mark - 1)
    rig.log.wait_for("payment.result", after=mark - 1, outcome="vended")
    assert rig.log.wait_until(lambda: not rig.kiosk._sale_busy(), 10)

    # The probe's request fails; its news waits for the loop (busy, or not yet scheduled).
    handle = rig.kiosk._handle
    barrier = threading.Event()

    def held(kind: str, payload: Any) -> None:
        if kind == "probe":
            loop_gate.pass_()
        handle(kind, payload)
        if (kind, payload) == ("gateway", "barrier"):
            barrier.set()  # everything told to the loop before it has been handled

    rig.kiosk._handle = held  # type: ignore[method-assign]
    probe_gate.open.set()
    assert loop_gate.reached.wait(10)

    # After that failure, the worker's cancel is answered: the last news is an answer.
    worker_gate.open.set()
    rig.log.wait_for("payment.cancel", outcome="success")
    assert rig.log.wait_until(lambda: journal.get(txn.ref).state is TxnState.CANCELLED, 10)
    loop_gate.open.set()
    rig.kiosk.events.put(("gateway", "barrier"))  # no news: only a marker in the queue
    assert barrier.wait(10)
    assert not rig.kiosk.status.offline, (
        "offline although the last request (the worker's cancel, after the probe's failure) "
        "was answered"
    )
    assert rig.lights.state is KioskState.READY
    assert rig.kiosk._next_probe is None
    rig.stop()
