"""A user's mistake gets one line, `kiosk: ...`, and exit 2 — never a traceback. Each test runs
the command as a person would (a subprocess, real files, a terminal where it matters) and
asserts the exact first line."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kiosk.cli import UsageError, build_parser
from kiosk.config import IndicatorsSection, ScannerSection, VendSection
from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER
from tests.daemon_rig import DaemonRig
from tests.test_selftest import _config as selftest_config

ROOT = Path(__file__).resolve().parents[1]
NO_GPIO = (
    "kiosk: no GPIO on this machine (set GPIOZERO_PIN_FACTORY=mock to try selftest without "
    "hardware)"
)


def kiosk(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


class Terminal:
    """`kiosk ARGS` with stdin, stdout and stderr on a pseudo-terminal, as in an ssh session."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiosk", *args],
            cwd=ROOT,
            env=_env(env),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def read_until(self, pattern: str, timeout: float = 30) -> str:
        """Read until a whole line matches `pattern` (a regex); return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if re.fullmatch(pattern, line):
                    return line
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no line matching {pattern!r}; saw {self.lines()}")

    def finish(self, timeout: float = 30) -> int:
        """Read to the end and return the exit status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        return self.proc.wait(max(deadline - time.monotonic(), 1))

    def lines(self) -> list[str]:
        return self.output.decode(errors="replace").replace("\r\n", "\n").splitlines()

    def _read(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every holder of the terminal's other side has closed it
            return False
        self.output += data
        return bool(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(OSError):
            os.close(self.master)


@contextlib.contextmanager
def terminal(*args: str, env: dict[str, str] | None = None) -> Iterator[Terminal]:
    term = Terminal(*args, env=env)
    try:
        yield term
    finally:
        term.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- kiosk simulator ------------------------------------------------------------------------


def test_simulator_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = kiosk("simulator", "--partner", PARTNER, "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_simulator_with_a_missing_merchant_key_names_the_absolute_path(tmp_path: Path) -> None:
    done = kiosk("simulator", "--partner", PARTNER, "--merchant-key", "missing.pem", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: --merchant-key {tmp_path / 'missing.pem'}: No such file or directory"
    ]


def test_simulator_with_a_missing_config_says_so_instead_of_ignoring_it(tmp_path: Path) -> None:
    done = kiosk("simulator", "--config", "kiosk.toml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: --config {tmp_path / 'kiosk.toml'}: No such file or directory"
    ]


def test_simulator_with_an_unwritable_public_key_path_says_why(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "alipay_public.pem"
    done = kiosk(
        "simulator",
        "--partner",
        PARTNER,
        "--listen",
        f"127.0.0.1:{_free_port()}",
        "--write-alipay-public-key",
        str(target),
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: --write-alipay-public-key {target}: No such file or directory"
    ]


def test_simulator_refuses_an_ec_merchant_key_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "ec.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    done = kiosk("simulator", "--partner", PARTNER, "--merchant-key", str(key))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: --merchant-key {key}: an EC key; Alipay signs with RSA keys"
    ]


def test_simulator_refuses_a_garbage_merchant_key_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "garbage.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    done = kiosk("simulator", "--partner", PARTNER, "--merchant-key", str(key))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"kiosk: --merchant-key {key}: not a PEM RSA key"]


def test_simulator_logs_carry_timestamps_in_a_terminal() -> None:
    port = _free_port()
    with terminal("simulator", "--partner", PARTNER, "--listen", f"127.0.0.1:{port}") as term:
        term.read_until(r".*event=simulator\.listening.*")
        first = term.lines()[0]
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} info kiosk\.simulator\.gateway: "
            rf"event=simulator\.started url=http://127\.0\.0\.1:{port}/gateway\.do",
            first,
        ), first
        term.proc.send_signal(signal.SIGTERM)
        assert term.finish() == 0


# -- usage ----------------------------------------------------------------------------------


def test_demo_refuses_a_config_it_would_not_use() -> None:
    done = kiosk("demo", "--config", "kiosk.toml")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "kiosk: unrecognized arguments: --config kiosk.toml (see 'kiosk --help')"
    ]


def test_provision_config_must_name_the_installed_kiosk_toml(tmp_path: Path) -> None:
    done = kiosk("provision", "--from", "boot.toml", "--config", "other.toml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kiosk: provision --config must name a kiosk.toml, not {tmp_path / 'other.toml'}"
    ]


def test_provision_config_and_etc_dir_must_agree(tmp_path: Path) -> None:
    done = kiosk(
        "provision",
        "--from",
        "boot.toml",
        "--config",
        "etc/kiosk.toml",
        "--etc-dir",
        "elsewhere",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        f"kiosk: provision --config {tmp_path / 'etc' / 'kiosk.toml'} and --etc-dir "
        f"{tmp_path / 'elsewhere'} disagree: give one"
    )


def test_every_flag_of_every_command_has_help_text() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and a.dest == "command")
    assert isinstance(subparsers.choices, dict)
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in [("kiosk", parser), *subparsers.choices.items()]
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "--config", "/etc/kiosk/kiosk.toml", "--log-format", "json"],
        ["run", "--log-format=text", "--config=k.toml"],
    ],
)
def test_kiosk_run_parses_alike_with_the_run_command_alone(argv: list[str]) -> None:
    """`kiosk run` builds only its own command's parser (every start of the service)."""
    whole = build_parser().parse_args(argv)
    alone = build_parser(run_only=True).parse_args(argv)
    assert vars(alone) == vars(whole)


@pytest.mark.parametrize(
    "argv", [["run", "--log-format", "xml"], ["run", "--bogus"], ["run", "extra"], ["run", "-h"]]
)
def test_kiosk_run_refuses_alike_with_the_run_command_alone(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    said = []
    for parser in (build_parser(), build_parser(run_only=True)):
        with pytest.raises((UsageError, SystemExit)) as raised:
            parser.parse_args(argv)
        said.append((type(raised.value), str(raised.value), capsys.readouterr()))
    assert said[0] == said[1]


# -- pipes ----------------------------------------------------------------------------------


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`kiosk journal --json | head -0`: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kiosk", "journal", "--json", "--state-dir", str(tmp_path)],
            cwd=ROOT,
            env=_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")


def test_check_into_a_closed_pipe_ends_quietly(tmp_path: Path, simulator: GatewaySimulator) -> None:
    """`kiosk check | head -2` once the reader has gone: no BrokenPipeError."""
    rig = DaemonRig(tmp_path, simulator)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kiosk", "check", "--config", str(rig.config_path)],
            cwd=ROOT,
            env=_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
        rig.close()
    assert "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1


# -- kiosk journal --------------------------------------------------------------------------


def test_journal_before_the_first_run_says_no_transactions_yet(tmp_path: Path) -> None:
    done = kiosk("journal", "--state-dir", "state", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == (
        f"no transactions yet (no journal in {tmp_path / 'state'})"
    )


# -- kiosk run ------------------------------------------------------------------------------


def test_run_in_a_terminal_without_a_config_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    with terminal("run", "--config", str(path)) as term:
        assert term.finish() == 2
        assert term.lines()[0] == (
            f"kiosk: no config at {path} (give --config PATH or set $KIOSK_CONFIG)"
        )


def test_run_in_a_terminal_with_a_bad_config_exits_2_with_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text("[kiosk]\nterminal_id = 5\n")
    with terminal("run", "--config", str(path)) as term:
        assert term.finish() == 2
        lines = term.lines()
        # Every problem, one a line, each naming the file (the checker owns the wording).
        assert lines[0].startswith(f"kiosk: {path}:"), lines
        assert all(line.startswith(f"kiosk: {path}:") for line in lines), lines
        assert any("terminal_id" in line for line in lines), lines


def test_run_under_systemd_with_a_bad_config_waits_out_of_service(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text("[kiosk]\nterminal_id = 5\n")
    with terminal("run", "--config", str(path), env={"INVOCATION_ID": "0123abcd"}) as term:
        term.read_until(r".*event=kiosk\.out_of_service.*")
        assert term.proc.poll() is None  # no crash loop: it waits for SIGHUP
        first, second = term.lines()[:2]
        assert first.startswith("info kiosk: event=kiosk.starting version=")  # which firmware
        assert second.startswith("error kiosk: event=config.invalid problem=")
        term.proc.send_signal(signal.SIGTERM)
        assert term.finish() == 0


def test_run_without_the_hardware_extra_names_the_pip_install(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    # A Python without pyserial: a `serial` that cannot be imported, first on the path.
    shadow = tmp_path / "no-pyserial"
    shadow.mkdir()
    (shadow / "serial.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'serial'\", name='serial')\n"
    )
    rig = DaemonRig(tmp_path, simulator)
    try:
        env = {"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
        with terminal("run", "--config", str(rig.config_path), env=env) as term:
            assert term.finish() == 2
            assert term.lines()[-1] == (
                "kiosk: the serial scanner needs pyserial, which is not installed: "
                "pip install 'kiosk[hardware]'"
            )
    finally:
        rig.close()


# -- kiosk selftest -------------------------------------------------------------------------


def test_selftest_without_gpio_names_the_mock_pin_factory(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        env = {k: v for k, v in _env().items() if k != "GPIOZERO_PIN_FACTORY"}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kiosk",
                "selftest",
                "--config",
                str(selftest_config(tmp_path, os.ttyname(slave))),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [NO_GPIO]


def test_selftest_in_a_terminal_checks_the_gateway_first_and_asks_about_the_lights(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    scanner_master, scanner_slave = os.openpty()
    config = selftest_config(tmp_path, os.ttyname(scanner_slave), simulator.url)
    try:
        with terminal(
            "selftest",
            "--config",
            str(config),
            "--scan-timeout",
            "0.2",
            env={"GPIOZERO_PIN_FACTORY": "mock"},
        ) as term:
            for question in (
                "did the green light come on?",
                "is the amber light blinking?",
                "did the red light come on?",
                "is the red light on steadily?",
                "did the buzzer beep once?",
                "did the buzzer sound the error pattern?",
                "did the relay click (or the machine dispense)?",
            ):
                term.read_until(re.escape(f"{question} [y/n] ") + ".*")
                os.write(term.master, b"y\n")
            assert term.finish() == 1  # nobody scanned
            lines = term.lines()
    finally:
        os.close(scanner_master)
        os.close(scanner_slave)
    assert lines[0] == "[ok] gateway DNS 127.0.0.1: 127.0.0.1"
    assert "[ok] Alipay signed request: accepted; the answer's signature verified" in lines
    assert "[ok] lights: ready: seen" in lines
    assert "[ok] buzzer: error: heard" in lines
    assert "[FAIL] scanner: no scan arrived" in lines
    assert "[ok] vend output: pulse sent, seen" in lines


# -- each hardware driver without its library -----------------------------------------------


@pytest.mark.parametrize(
    ("library", "module", "section", "build", "message"),
    [
        ("evdev", "drivers.scanner_evdev", ScannerSection(driver="evdev"), "build_scanner",
         "the evdev scanner needs evdev"),
        ("serial", "drivers.scanner_serial", ScannerSection(driver="serial", port="/dev/ttyS9"),
         "build_scanner", "the serial scanner needs pyserial"),
        ("gpiozero", "drivers.indicator_gpio",
         IndicatorsSection(driver="gpio", green=17, red=27, amber=22),
         "build_indicator", "the GPIO indicator needs gpiozero"),
        ("serial", "drivers.vend_serial", VendSection(driver="serial", port="/dev/ttyS9"),
         "build_vend_output", "the serial vend link needs pyserial"),
        ("gpiozero", "drivers.vend_relay", VendSection(driver="relay", relay_pin=23),
         "build_vend_output", "the GPIO vend relay needs gpiozero"),
    ],
)  # fmt: skip
def test_a_driver_without_its_library_names_the_hardware_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    library: str,
    module: str,
    section: object,
    build: str,
    message: str,
) -> None:
    import drivers
    from kiosk.demo import demo_config

    monkeypatch.setitem(sys.modules, library, None)  # `import library` fails, as uninstalled
    monkeypatch.delitem(sys.modules, module, raising=False)
    field = {
        ScannerSection: "scanner",
        IndicatorsSection: "indicators",
        VendSection: "vend",
    }[type(section)]
    config = dataclasses.replace(demo_config(tmp_path, "http://127.0.0.1:9"), **{field: section})
    with pytest.raises(drivers.DriverUnavailable) as raised:
        getattr(drivers, build)(config)
    assert str(raised.value) == f"{message}, which is not installed: pip install 'kiosk[hardware]'"
