"""The serial link ACKs `SUCCESS <ref>` only once the core has journaled VENDED (SPEC section 4:
`ACK` means the kiosk has recorded the outcome). When that commit fails (the journal's card is
full, or read-only after an I/O error), no ACK goes out; the controller repeats its report, and
after the restart (a technician frees space, a power cut, the watchdog) the kiosk takes the
repeated SUCCESS and journals VENDED, rather than reversing a sale whose product came out
(SPEC rule 1, 'no goods without money')."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from drivers.vend_serial import SerialVendOutput
from kiosk.journal import Journal, TxnState
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code
from tests.daemon_rig import Pty
from tests.loop_rig import Rig, rig_config

RESEND_EVERY_S = 0.5  # the controller repeats a report it has no ACK for


def test_success_is_acked_only_once_journaled_and_a_repeat_settles_it_after_restart(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    vmc = Pty()
    config = rig_config(tmp_path / "state", simulator.url)
    journal = Journal(config.kiosk.state_dir)
    link = SerialVendOutput(vmc.port, 9600, "USD")
    rig = make_rig(config, vend=link, journal=journal)
    assert link.wait_connected(10)
    seen: dict[str, str] = {}
    approved_seen = threading.Event()
    done = threading.Event()

    def controller() -> None:
        approved = vmc.expect("APPROVED", 15)
        ref = approved.split()[1]
        with journal._lock:  # the card fills up while the product comes out
            journal._conn.execute("PRAGMA query_only=ON")
        seen["ref"] = ref
        approved_seen.set()
        while not done.is_set():  # repeat the report until it is ACKed
            vmc.write_line(f"SUCCESS {ref}")
            try:
                seen["ack"] = vmc.expect("ACK", RESEND_EVERY_S)
                return
            except AssertionError:
                continue

    player = threading.Thread(target=controller)
    player.start()
    try:
        rig.scanner.scan(payment_code("0001", 3))
        assert approved_seen.wait(30)
        rig.log.wait_for("kiosk.out_of_service", 10)
        rig.stop()  # restarted (the technician freed space, or the power went)
        assert "ack" not in seen, "SUCCESS was ACKed although VENDED was never journaled"
        ref = seen["ref"]
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
        player.join(10)
        rig2.stop()
    finally:
        done.set()
        player.join(10)
        vmc.close()
    assert trade is not None
    assert state is TxnState.VENDED and trade.holds_money, (
        f"the controller vended, yet after the restart the journal says {state.value} and "
        f"Alipay holds {'the money' if trade.holds_money else 'nothing'}"
    )
    assert seen.get("ack") == f"ACK {ref}"  # ACKed once the outcome was recorded
