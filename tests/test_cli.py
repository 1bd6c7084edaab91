"""The command line as a technician or integrator meets it: exit codes, `FILE:LINE` problems,
the journal export, the simulator for rigs, and a daemon that never crash-loops on a bad
config."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from kiosk import __version__
from kiosk.alipay.client import AlipayClient, GatewaySettings, Outcome
from kiosk.alipay.signing import RsaSignature, SignType, load_public_key
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, named_key
from tests.daemon_rig import DaemonRig

ROOT = Path(__file__).resolve().parents[1]
INTRO_LINE = (
    "kiosk demo: the real daemon, payment flow and journal, with a fake scanner, lights and "
    "vending machine and an Alipay gateway simulator on 127.0.0.1"
)


def kiosk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_until(args: list[str], event: str) -> subprocess.Popen[str]:
    """Start `kiosk ARGS --log-format json` and return once it logged `event`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiosk", *args, "--log-format", "json"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if json.loads(line).get("event") == event:
            return proc
    raise AssertionError(f"kiosk {args[0]} ended before logging {event}")


def test_version() -> None:
    done = kiosk("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"kiosk {__version__}"


def test_unknown_subcommand_is_bad_usage() -> None:
    assert kiosk("launch").returncode == 2


def test_check_prints_every_problem_as_file_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text(
        '[kiosk]\nterminal_id = "VM 1"\n\n[alipay]\ngateway = "http://example.com/gw"\n'
        'partner = "1234"\ncurency = "USD"\n'
    )
    done = kiosk("check", "--config", str(path))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"{path}:2:1: error: ") and "terminal_id" in line for line in lines)
    assert any(line.startswith(f"{path}:6:1: error: ") and "partner" in line for line in lines)
    assert any(line.startswith(f"{path}:7:1: error: ") and "currency" in line for line in lines)


def test_journal_json_on_an_empty_state_dir_is_an_empty_array(tmp_path: Path) -> None:
    from kiosk.journal import Journal

    Journal(tmp_path).close()
    done = kiosk("journal", "--json", "--state-dir", str(tmp_path))
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_journal_json_before_the_first_run_is_an_empty_array(tmp_path: Path) -> None:
    done = kiosk("journal", "--json", "--state-dir", str(tmp_path / "none"))
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_journal_on_a_state_dir_that_is_not_a_journal_is_a_runtime_failure(
    tmp_path: Path,
) -> None:
    (tmp_path / "journal.sqlite3").mkdir()
    done = kiosk("journal", "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"kiosk: journal {tmp_path / 'journal.sqlite3'} is not a regular file"
    ]


def test_demo_prints_each_scenario_once_in_one_table_and_no_deleted_path() -> None:
    done = kiosk("demo", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == INTRO_LINE
    for scenario in (
        "paid ",
        "declined ",
        "buyer confirms on phone",
        "timeout resolved by query",
        "vend failure reversed",
        "network lost, recovered from the journal",
        "MDB: selected, paid, C,VEND, SUCCESS",
        "MDB: cancelled while paying, reversed",
    ):
        assert sum(line.startswith(scenario) for line in lines) == 1, scenario
    table = [line for line in lines if line.startswith("MDB: ")]
    assert [line.split()[-1] for line in table] == ["ok", "ok"]
    assert lines[-1].startswith("8 scenarios in ")
    assert "kiosk-demo-" not in done.stdout  # its journal is gone at exit: not named
    assert lines[-2].endswith("(balanced)")


def test_interactive_demo_says_at_once_why_a_scan_did_nothing() -> None:
    code = "280000000000010001"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiosk", "demo", "--interactive", "--keep"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # Not a pipe nobody reads: a full pipe would block the demo, and the test with it.
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    # The reads below have no timeout of their own: a demo that stops answering is killed
    # (and the test fails) instead of hanging the suite.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout.readline().rstrip("\n") == INTRO_LINE
        kept = proc.stdout.readline()
        assert kept.startswith("journal kept in /"), kept
        state_dir = Path(kept.split()[3])
        proc.stdin.write(f"{code}\n")
        proc.stdin.flush()
        while not (line := proc.stdout.readline()).startswith("  "):
            assert line, "the demo ended early"
        assert line.startswith("  vended"), line
        started = time.monotonic()
        proc.stdin.write(f"{code}\n")  # the same code again: a payment code is single-use
        proc.stdin.flush()
        assert proc.stdout.readline() == "  refused: CODE_REUSED\n"
        assert time.monotonic() - started < 10  # said at once, not after a silent wait
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
        assert (state_dir / "journal.sqlite3").is_file()  # --keep kept it
        listing = kiosk("journal", "--all", "--state-dir", str(state_dir))
        assert "vended" in listing.stdout
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if "state_dir" in locals():
            shutil.rmtree(state_dir.parent, ignore_errors=True)


def test_run_with_a_bad_config_stays_up_out_of_service_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text("[kiosk]\nterminal_id = 5\n")
    proc = start_until(["run", "--config", str(path)], "kiosk.out_of_service")
    try:
        assert proc.poll() is None  # still running: no crash loop under systemd
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_simulator_command_serves_signed_answers(tmp_path: Path) -> None:
    merchant = tmp_path / "merchant.pem"
    merchant.write_bytes(
        named_key("merchant").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    alipay_public = tmp_path / "alipay_public.pem"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start_until(
        [
            "simulator",
            "--listen",
            f"127.0.0.1:{port}",
            "--partner",
            PARTNER,
            "--merchant-key",
            str(merchant),
            "--write-alipay-public-key",
            str(alipay_public),
        ],
        "simulator.listening",
    )
    try:
        signature = RsaSignature(
            SignType.RSA2,
            private_key=named_key("merchant"),
            public_key=load_public_key(alipay_public.read_bytes()),
        )
        client = AlipayClient(
            GatewaySettings(
                gateway=f"http://127.0.0.1:{port}/gateway.do",
                partner=PARTNER,
                seller_id=PARTNER,
                signature=signature,
            )
        )
        with client:
            result = client.query("VM-CLI-nothing")
        # A signed, verified answer: no such trade.
        assert (result.outcome, result.error) == (Outcome.FAILED, "TRADE_NOT_EXIST")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_kiosk_run_on_the_same_state_dir_refuses_in_one_line_and_exits_1(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    rig = DaemonRig(tmp_path, simulator)
    try:
        rig.start()
        assert rig.proc is not None
        second = kiosk("run", "--config", str(rig.config_path), timeout=30)
        lock = (rig.state_dir / "kiosk.lock").absolute()
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"kiosk: another kiosk run (pid {rig.proc.pid}) holds {lock}"
        )
        assert rig.proc.poll() is None  # the first one runs on, untouched
        assert rig.journal() == []  # `kiosk journal` reads while `kiosk run` runs
        assert rig.stop() == 0
        rig.start()  # the lock went with the process: a restart takes it at once
        assert rig.stop() == 0
    finally:
        rig.close()


def test_a_stop_and_a_reload_in_one_out_of_service_wait_end_the_kiosk() -> None:
    """SIGTERM, then SIGHUP before the wait ends: the stop wins (systemd is stopping the
    service; a reload must not forget that)."""
    import signal as signals

    from kiosk import cli
    from kiosk.systemd import Notifier

    class Signalled(Notifier):
        def ready(self, status: str = "") -> None:
            signals.raise_signal(signals.SIGTERM)
            signals.raise_signal(signals.SIGHUP)

    before = {sig: signals.getsignal(sig) for sig in (signals.SIGTERM, signals.SIGHUP)}
    try:
        assert cli._wait_out_of_service(Signalled(environ={}), "config: test") is False
    finally:
        for sig, handler in before.items():
            signals.signal(sig, handler)
