"""The whole daemon as a subprocess: serial scanner and vending controller on ptys, the
gateway simulator on loopback, fake lights. Money rules are checked on the ledger after."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, payment_code
from tests.daemon_rig import DaemonRig, service_python_env

pytestmark = pytest.mark.slow


@pytest.fixture
def rig(tmp_path: Path, simulator: GatewaySimulator) -> Iterator[DaemonRig]:
    rig = DaemonRig(tmp_path, simulator)
    rig.start()
    try:
        yield rig
    finally:
        rig.close()


def held(sim: GatewaySimulator, ref: str) -> bool:
    trade = sim.ledger.trade(PARTNER, ref)
    return trade is not None and trade.holds_money


def assert_money_rules(rig: DaemonRig) -> None:
    """Every transaction final; Alipay holds money exactly for what was vended."""
    rows = rig.journal()
    assert all(r["final"] for r in rows), rows
    vended = {r["ref"] for r in rows if r["state"] == "vended"}
    holding = {t.partner_trans_id for t in rig.sim.ledger.trades() if t.holds_money}
    assert holding == vended
    assert all(r["buyer_code"] is None for r in rows)


def sell_and_vend(rig: DaemonRig, n: int) -> str:
    """Scan a code that pays at once and play a controller that dispenses."""
    rig.scanner.write_line(payment_code("0001", n))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}")
    assert rig.vmc.expect("ACK ") == f"ACK {ref}"
    return ref


def test_paid_scan_is_approved_vended_and_acknowledged(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("0001"))
    approved = rig.vmc.expect("APPROVED ")
    _, ref, amount = approved.split(" ")
    assert amount == "1.50"
    rig.vmc.write_line(f"SUCCESS {ref}", end="\n")
    assert rig.vmc.expect("ACK ") == f"ACK {ref}"
    rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 10)
    assert held(rig.sim, ref)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_declined_scan_tells_the_controller_why(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("2022"))
    assert rig.vmc.expect("DENIED ") == "DENIED BUYER_BALANCE_NOT_ENOUGH"
    rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "declined", 5)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_vend_failure_is_reversed(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("0001"))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.vmc.write_line(f"FAILURE {ref}")
    assert rig.vmc.expect("ACK ") == f"ACK {ref}"
    rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 10)
    assert not held(rig.sim, ref)
    assert rig.sim.ledger.trade(PARTNER, ref).charged
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_vend_silence_counts_as_failure_and_is_reversed(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("0001"))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 15)
    assert not held(rig.sim, ref)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_garbage_scan_is_rejected_without_a_request(rig: DaemonRig) -> None:
    rig.scanner.write_line("hello-world")
    rig.wait_log(lambda e: e.get("event") == "scan.rejected", 5)
    assert rig.sim.requests_seen == []
    assert rig.stop() == 0


def test_gateway_offline_then_back(rig: DaemonRig) -> None:
    rig.sim.go_offline()
    rig.scanner.write_line(payment_code("0001", 1))
    assert rig.vmc.expect("DENIED ") == "DENIED OFFLINE"
    rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "offline", 10)
    rig.sim.go_online()
    rig.wait_log(lambda e: e.get("event") == "gateway.online", 10)
    sell_and_vend(rig, 2)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_sigterm_mid_payment_parks_it_and_the_restart_cancels(rig: DaemonRig) -> None:
    rig.stop()
    rig.close()
    slow = DaemonRig(rig.tmp, rig.sim, query_deadline_s=60, query_interval_s=0.5)
    try:
        slow.start()
        slow.scanner.write_line(payment_code("1002"))  # the buyer never confirms
        slow.wait_log(lambda e: e.get("event") == "payment.start", 10)
        slow.wait_log(lambda e: e.get("event") == "alipay.call" or "service" in e, 10)
        slow.signal(signal.SIGTERM)
        assert slow.wait_exit(20) == 0
        [row] = slow.journal()
        assert row["state"] in ("paying", "querying") and not row["final"]
        slow.start()
        slow.wait_log(lambda e: e.get("event") == "payment.settled", 20)
        assert slow.stop() == 0
        assert_money_rules(slow)
    finally:
        slow.close()


def test_sigkill_mid_vend_is_reversed_after_restart(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("0001"))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    assert held(rig.sim, ref)
    rig.kill()
    rig.start()
    # The controller never reports: after vend.timeout_s the charge is reversed.
    rig.wait_log(lambda e: e.get("event") == "payment.settled" and e.get("ref") == ref, 20)
    assert not held(rig.sim, ref)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_sigkill_mid_vend_then_controller_confirms_keeps_the_sale(rig: DaemonRig) -> None:
    rig.scanner.write_line(payment_code("0001"))
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.kill()
    rig.start()
    rig.vmc.write_line(f"SUCCESS {ref}")
    rig.wait_log(lambda e: e.get("event") == "payment.settled" and e.get("ref") == ref, 20)
    assert held(rig.sim, ref)
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_logs_never_carry_a_whole_payment_code(rig: DaemonRig) -> None:
    code = payment_code("0001", 77)
    rig.scanner.write_line(code)
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}")
    rig.vmc.expect("ACK ")
    rig.stop()
    assert not any(code in line for line in rig.raw_log)
    states = [e["state"] for e in rig.logs if e.get("event") == "indicator"]
    assert states[:2] == ["starting", "ready"]
    assert "paying" in states and "vending" in states


def test_a_second_scan_of_the_same_code_is_refused_locally(rig: DaemonRig) -> None:
    code = payment_code("0001", 5)
    rig.scanner.write_line(code)
    _, ref, _ = rig.vmc.expect("APPROVED ").split(" ")
    rig.vmc.write_line(f"SUCCESS {ref}")
    rig.vmc.expect("ACK ")
    done = rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 10)
    rig.wait_log(
        lambda e: (
            e.get("event") == "indicator"
            and e.get("state") == "ready"
            and rig.logs.index(e) > rig.logs.index(done)
        ),
        10,
    )
    pays_before = sum(1 for r in rig.sim.requests_seen if r.service == "pay")
    rig.scanner.write_line(code)
    assert rig.vmc.expect("DENIED ") == "DENIED CODE_REUSED"
    assert sum(1 for r in rig.sim.requests_seen if r.service == "pay") == pays_before
    assert rig.stop() == 0


def test_systemd_hears_ready_watchdog_and_stopping(rig: DaemonRig) -> None:
    rig.stop()
    sock_path = rig.tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    try:
        rig.start(extra_env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        seen: list[str] = []
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert "READY=1" in seen[0]
        assert rig.stop() == 0
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
    finally:
        sock.close()


def test_merchant_configuration_error_takes_it_out_of_service_until_a_probe_passes(
    rig: DaemonRig,
) -> None:
    rig.scanner.write_line(payment_code("2049"))  # SECONDARY_MERCHANT_ID_INVALID
    assert rig.vmc.expect("DENIED ") == "DENIED SECONDARY_MERCHANT_ID_INVALID"
    rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "out_of_service", 5)
    # probe_interval_s is 1 s on the rig: a signed query is accepted again, back in service.
    rig.wait_log(lambda e: e.get("event") == "kiosk.back_in_service", 10)
    sell_and_vend(rig, 2)
    assert rig.stop() == 0
    assert_money_rules(rig)


def sells_at(rig: DaemonRig, price: str) -> None:
    """One paid, vended sale at `price`; then a clean stop."""
    rig.scanner.write_line(payment_code("0001"))
    _, ref, amount = rig.vmc.expect("APPROVED ").split(" ")
    assert amount == price
    rig.vmc.write_line(f"SUCCESS {ref}")
    rig.vmc.expect("ACK ")
    assert rig.stop() == 0


def test_sighup_rereads_the_config(rig: DaemonRig) -> None:
    text = rig.config_path.read_text()
    rig.config_path.write_text(text.replace('price = "1.50"', 'price = "2.00"'))
    rig.signal(signal.SIGHUP)
    rig.wait_log(lambda e: e.get("event") == "config.reloaded", 10)
    sells_at(rig, "2.00")


def test_vmc_mode_vend_request_then_scan_charges_the_asked_amount(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    rig = DaemonRig(tmp_path, simulator)
    text = rig.config_path.read_text()
    rig.config_path.write_text(
        text.replace('mode = "fixed"', 'mode = "vmc"\nscan_timeout_s = 1').replace(
            'price = "1.50"\n', ""
        )
    )
    try:
        rig.start()
        rig.vmc.write_line("VEND tea 0.80")
        assert rig.vmc.expect("OK") == "OK"
        rig.scanner.write_line(payment_code("0001"))
        _, ref, amount = rig.vmc.expect("APPROVED ").split(" ")
        assert amount == "0.80"
        rig.vmc.write_line("VEND tea 0.80")
        assert rig.vmc.expect("BUSY") == "BUSY"
        rig.vmc.write_line(f"SUCCESS {ref}")
        rig.vmc.expect("ACK ")
        done = rig.wait_log(
            lambda e: e.get("event") == "payment.result" and e.get("ref") == ref, 10
        )
        rig.wait_log_after(
            rig.logs.index(done),
            lambda e: e.get("event") == "indicator" and e.get("state") == "ready",
            10,
            "ready",
        )
        rig.vmc.write_line("VEND tea 0.80")
        rig.vmc.expect("OK")
        assert rig.vmc.expect("TIMEOUT", 5) == "TIMEOUT"  # no scan within scan_timeout_s
        rig.vmc.write_line("PING")
        assert rig.vmc.expect("PONG") == "PONG"
        assert rig.stop() == 0
        assert_money_rules(rig)
        assert simulator.ledger.trade(PARTNER, ref).amount == Decimal("0.80")
    finally:
        rig.close()


def test_a_sighup_while_the_kiosk_starts_is_a_reload_not_its_end(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    """SIGHUP's default action ends a process: a reload sent while the kiosk was still starting
    (before it could reload) used to kill it. Now the config it reads is the new one, or it
    reloads once it runs; either way it comes up and sells at the new price."""
    rig = DaemonRig(tmp_path, simulator)
    try:
        text = rig.config_path.read_text()
        rig.start(wait_ready=False)
        rig.wait_log(lambda e: e.get("event") == "kiosk.starting", 30, "kiosk.starting")
        rig.config_path.write_text(text.replace('price = "1.50"', 'price = "2.00"'))
        rig.signal(signal.SIGHUP)
        rig.wait_log(lambda e: e.get("event") == "kiosk.ready", 30, "kiosk.ready")
        rig.wait_log(lambda e: e.get("event") == "scanner.opened", 10, "scanner.opened")
        rig.wait_log(lambda e: e.get("event") == "vend.link_up", 10, "vend.link_up")
        assert rig.proc is not None and rig.proc.poll() is None
        sells_at(rig, "2.00")
    finally:
        rig.close()


def test_sighup_during_a_vend_keeps_the_sale_and_the_new_price_applies_after_it(
    rig: DaemonRig,
) -> None:
    rig.scanner.write_line(payment_code("0001", 1))
    _, ref, amount = rig.vmc.expect("APPROVED ").split(" ")
    text = rig.config_path.read_text()
    rig.config_path.write_text(text.replace('price = "1.50"', 'price = "2.00"'))
    rig.signal(signal.SIGHUP)
    rig.wait_log(lambda e: e.get("event") == "config.reload_deferred", 10)
    rig.vmc.write_line(f"SUCCESS {ref}")
    assert rig.vmc.expect("ACK ") == f"ACK {ref}"
    rig.wait_log(lambda e: e.get("event") == "config.reloaded", 10)
    assert amount == "1.50" and held(rig.sim, ref)
    rig.scanner.write_line(payment_code("0001", 2))
    _, second, amount = rig.vmc.expect("APPROVED ").split(" ")
    assert amount == "2.00"
    rig.vmc.write_line(f"SUCCESS {second}")
    rig.vmc.expect("ACK ")
    assert rig.stop() == 0
    assert_money_rules(rig)


def test_the_daemon_as_the_service_runs_it_keeps_the_money_rules(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    """With kiosk.service's Python settings (`python -OO`: no asserts, no docstrings; the C
    locale in UTF-8 mode) a paid sale is vended, a declined one denied, a failed vend reversed
    and a garbage scan refused."""
    rig = DaemonRig(tmp_path, simulator, declined_hold_s=0.5)
    rig.start(extra_env=service_python_env())
    try:
        assert rig.proc is not None
        environ = Path(f"/proc/{rig.proc.pid}/environ").read_bytes().split(b"\0")
        assert {b"PYTHONOPTIMIZE=2", b"LC_ALL=C", b"PYTHONUTF8=1"} <= set(environ)
        paid = sell_and_vend(rig, 1)
        rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == paid, 10)
        rig.wait_log(lambda e: e.get("event") == "indicator" and e.get("state") == "ready", 5)
        mark = len(rig.logs)
        rig.scanner.write_line("not a payment code")
        rig.wait_log_after(mark, lambda e: e.get("event") == "scan.rejected", 5, "scan.rejected")
        rig.scanner.write_line(payment_code("2022", 2))
        assert rig.vmc.expect("DENIED ") == "DENIED BUYER_BALANCE_NOT_ENOUGH"
        red = rig.wait_log_after(mark, lambda e: e.get("state") == "declined", 5, "declined")
        rig.wait_log_after(red, lambda e: e.get("state") == "ready", 10, "ready again")
        rig.scanner.write_line(payment_code("0001", 3))
        _, failed, _ = rig.vmc.expect("APPROVED ").split(" ")
        rig.vmc.write_line(f"FAILURE {failed}")
        assert rig.vmc.expect("ACK ") == f"ACK {failed}"
        rig.wait_log(lambda e: e.get("event") == "payment.result" and e.get("ref") == failed, 10)
        assert rig.stop() == 0
    finally:
        rig.close()
    assert_money_rules(rig)
    assert held(rig.sim, paid)
    assert not held(rig.sim, failed)
