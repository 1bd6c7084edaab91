"""The command line as a technician or integrator meets it: exit codes, `FILE:LINE` problems,
the journal export, the simulator for rigs, and a daemon that never crash-loops on a bad
config."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from kiosk import __version__
from kiosk.alipay.client import AlipayClient, GatewaySettings, Outcome
from kiosk.alipay.signing import RsaSignature, SignType, load_public_key
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, named_key
from tests.daemon_rig import DaemonRig

ROOT = Path(__file__).resolve().parents[1]


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


def test_journal_without_a_journal_is_a_runtime_failure(tmp_path: Path) -> None:
    done = kiosk("journal", "--state-dir", str(tmp_path / "none"))
    assert done.returncode == 1 and "no journal" in done.stderr


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
