"""Attack: the serial link ACKs `SUCCESS <ref>` before the core has journaled VENDED. When
that commit fails (the journal's card is full, or read-only after an I/O error) and the kiosk
then restarts (a technician frees space and restarts it, a power cut, the watchdog), the
journal still says `vending`. The restart waits vend.timeout_s for a report the controller
will never repeat (it got its ACK), and reverses the charge: the customer has the product and
the money back (SPEC rule 1, 'no goods without money')."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drivers.vend_serial import SerialVendOutput
from kiosk.alipay.client import AlipayClient
from kiosk.journal import Journal, TxnState
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code
from tests.daemon_rig import Pty
from tests.loop_rig import Rig, rig_config, rig_factory


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        yield make


def test_attack_acked_success_lost_to_a_failed_commit_is_reversed_after_restart(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    vmc = Pty()
    config = rig_config(tmp_path / "state", simulator.url)
    journal = Journal(config.kiosk.state_dir)
    link = SerialVendOutput(vmc.port, 9600, "USD")
    rig = make_rig(config, vend=link, journal=journal)
    assert link.wait_connected(10)
    seen: dict[str, str] = {}

    def controller() -> None:
        approved = vmc.expect("APPROVED", 15)
        ref = approved.split()[1]
        with journal._lock:  # the card fills up while the product comes out
            journal._conn.execute("PRAGMA query_only=ON")
        vmc.write_line(f"SUCCESS {ref}")
        seen["ref"], seen["ack"] = ref, vmc.expect("ACK", 10)

    player = threading.Thread(target=controller)
    player.start()
    rig.scanner.scan(payment_code("0001", 3))
    player.join(30)
    ref = seen["ref"]
    assert seen["ack"] == f"ACK {ref}"  # the controller was told its SUCCESS was taken
    rig.log.wait_for("kiosk.out_of_service", 10)
    rig.stop()  # restarted (the technician freed space, or the power went)
    with journal._lock:
        journal._conn.execute("PRAGMA query_only=OFF")
    journal.close()
    assert Journal(config.kiosk.state_dir).get(ref).state is TxnState.VENDING  # type: ignore[union-attr]

    journal2 = Journal(config.kiosk.state_dir)
    link2 = SerialVendOutput(vmc.port, 9600, "USD")
    rig2 = make_rig(config, vend=link2, journal=journal2)
    assert rig2.log.wait_until(lambda: journal2.get(ref).final, 20)  # type: ignore[union-attr]
    state = journal2.get(ref).state  # type: ignore[union-attr]
    trade = simulator.ledger.trade(PARTNER, ref)
    rig2.stop()
    vmc.close()
    assert trade is not None
    assert state is TxnState.VENDED and trade.holds_money, (
        f"the controller vended and got 'ACK {ref}', yet after the restart the journal says "
        f"{state.value} and Alipay holds {'the money' if trade.holds_money else 'nothing'}"
    )
