"""The MDB board emulator on its own: what it answers a host on the pty, what the scripted
machine says, and the integrator's tool (`python -m drivers.mdb_board`) end to end."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from drivers.mdb_board import HELP, MdbBoard, main, run_command

WAIT_S = 5.0


class Host:
    """The kiosk's end of the pty, as raw lines."""

    def __init__(self, device: str) -> None:
        self.port = serial.Serial(device, 115200, timeout=WAIT_S, exclusive=True)

    def send(self, line: str) -> None:
        self.port.write(line.encode("ascii") + b"\n")

    def read_line(self) -> str:
        line = self.port.readline()
        assert line.endswith(b"\n"), f"no line from the board; got {line!r}"
        return line.decode("ascii").rstrip("\r\n")

    def ask(self, line: str, answers: int = 1) -> list[str]:
        self.send(line)
        return [self.read_line() for _ in range(answers)]

    def close(self) -> None:
        self.port.close()


@pytest.fixture
def board(tmp_path: Path) -> Iterator[MdbBoard]:
    with MdbBoard.on_pty(tmp_path / "ttyMDB") as emulator:
        yield emulator


@pytest.fixture
def host(board: MdbBoard) -> Iterator[Host]:
    assert board.device is not None
    side = Host(board.device)
    yield side
    side.close()


def configured_and_on(host: Host) -> None:
    assert host.ask("C,0") == ["c,STATUS,INACTIVE"]
    assert host.ask("C,SETCONF,mdb-addr=0x10") == ["c,SET,OK"]
    assert host.ask("C,1", answers=3) == [
        "c,STATUS,INACTIVE",
        "c,STATUS,DISABLED",
        "c,STATUS,ENABLED",
    ]


def test_the_symlink_points_at_the_pty(board: MdbBoard, tmp_path: Path) -> None:
    assert os.path.realpath(tmp_path / "ttyMDB") == board.device


def test_v_is_answered_with_a_version_line(host: Host) -> None:
    assert host.ask("V") == ["v,4.0.2.0,0123456789AB"]


def test_setconf_is_stored_and_confirmed_while_the_reader_is_off(
    board: MdbBoard, host: Host
) -> None:
    assert host.ask("C,0") == ["c,STATUS,INACTIVE"]
    assert host.ask("C,SETCONF,mdb-currency-code=0x1840") == ["c,SET,OK"]
    assert board.config() == {"mdb-currency-code": "0x1840"}
    assert board.host_lines() == ["C,0", "C,SETCONF,mdb-currency-code=0x1840"]


def test_setconf_while_the_reader_is_on_is_an_error(board: MdbBoard, host: Host) -> None:
    configured_and_on(host)
    assert host.ask("C,SETCONF,mdb-addr=0x60")[0].startswith("c,ERR,")
    assert board.config()["mdb-addr"] == "0x10"


def test_a_refused_setting_gets_the_scripted_answer_or_none(board: MdbBoard, host: Host) -> None:
    board.refuse("mdb-addr")
    board.refuse("mdb-always-idle", answer=None)
    assert host.ask("C,SETCONF,mdb-addr=0x10") == ["c,ERR,invalid parameter"]
    host.send("C,SETCONF,mdb-always-idle=1")
    assert host.ask("V") == ["v,4.0.2.0,0123456789AB"]  # nothing came before the version
    assert board.config() == {}


def test_a_reader_off_on_reader_on_is_enabled_by_the_machine(board: MdbBoard, host: Host) -> None:
    configured_and_on(host)
    assert board.reader_on()


def test_without_auto_enable_the_machine_enables_the_reader_when_told(tmp_path: Path) -> None:
    with MdbBoard.on_pty(auto_enable=False) as board:
        assert board.device is not None
        host = Host(board.device)
        try:
            assert host.ask("C,1") == ["c,STATUS,INACTIVE"]
            assert not board.select("1.50", "12")  # not enabled: the machine cannot ask
            assert board.enable()
            assert host.read_line() == "c,STATUS,ENABLED"
        finally:
            host.close()


def test_a_selection_approved_for_its_amount_then_dispensed(board: MdbBoard, host: Host) -> None:
    configured_and_on(host)
    assert board.select("1.50", "12")
    assert host.read_line() == "c,STATUS,VEND,1.50,12"
    host.send("C,VEND,1.50")
    assert board.wait_approved(WAIT_S) == "1.50"
    assert board.success()
    assert [host.read_line() for _ in range(3)] == [
        "c,VEND,SUCCESS",
        "c,STATUS,IDLE",
        "c,STATUS,ENABLED",
    ]
    assert not board.request_open()


def test_an_approval_for_another_amount_or_no_request_approves_nothing(
    board: MdbBoard, host: Host
) -> None:
    configured_and_on(host)
    assert host.ask("C,VEND,1.50")[0].startswith("c,ERR,")
    assert board.select("1.50", "12")
    assert host.read_line() == "c,STATUS,VEND,1.50,12"
    assert host.ask("C,VEND,2.00")[0].startswith("c,ERR,")
    assert board.approved() is None
    host.send("C,VEND,1.5")  # the same decimal: approved, and nothing to say
    assert board.wait_approved(WAIT_S) == "1.5"


def test_stop_ends_the_request(board: MdbBoard, host: Host) -> None:
    configured_and_on(host)
    assert board.select("1.50", "12")
    assert host.read_line() == "c,STATUS,VEND,1.50,12"
    assert host.ask("C,STOP") == ["c,STATUS,ENABLED"]
    assert not board.request_open()


def test_fail_and_drop_say_what_the_documentation_says(board: MdbBoard, host: Host) -> None:
    configured_and_on(host)
    assert board.select("1.50", "12")
    assert host.read_line() == "c,STATUS,VEND,1.50,12"
    host.send("C,VEND,1.50")
    assert board.wait_approved(WAIT_S) == "1.50"
    assert board.fail()
    assert [host.read_line() for _ in range(3)] == [
        "c,ERR,VEND 3",
        "c,STATUS,IDLE",
        "c,STATUS,ENABLED",
    ]
    assert board.select("1.50", "12")
    assert host.read_line() == "c,STATUS,VEND,1.50,12"
    assert not board.drop()  # nothing was approved
    assert [host.read_line(), host.read_line()] == ["c,STATUS,IDLE", "c,STATUS,ENABLED"]


def test_reset_forgets_the_configuration_and_announces_inactive(
    board: MdbBoard, host: Host
) -> None:
    configured_and_on(host)
    board.reset()
    assert host.read_line() == "c,STATUS,INACTIVE"
    assert board.config() == {}
    assert not board.reader_on()


def test_a_silent_board_records_but_answers_nothing_until_it_speaks(
    board: MdbBoard, host: Host
) -> None:
    board.go_silent()
    host.send("V")
    assert board.wait_for_line("V", WAIT_S)
    board.speak()
    assert host.ask("V") == ["v,4.0.2.0,0123456789AB"]


def test_unknown_commands_get_an_error_and_garbage_is_survived(board: MdbBoard, host: Host) -> None:
    assert host.ask("HELLO")[0].startswith("c,ERR,")
    host.port.write(b"\xff\x00" * 300 + b"\n")
    assert host.read_line().startswith("c,ERR,")
    assert host.ask("V") == ["v,4.0.2.0,0123456789AB"]


def test_close_is_safe_twice(tmp_path: Path) -> None:
    board = MdbBoard.on_pty().start()
    board.close()
    board.close()


# -- the integrator's tool --------------------------------------------------------------------


def test_commands_drive_the_machine_and_bad_ones_print_the_help(board: MdbBoard) -> None:
    said: list[str] = []
    assert run_command(board, "select 1.50 12", said.append)
    assert said == ["the reader is not enabled: the machine cannot ask it (host sends C,1 first)"]
    assert run_command(board, "frobnicate", said.append)
    assert said[-1] == HELP
    assert run_command(board, "status", said.append)
    assert said[-1].startswith("reader=off")
    assert not run_command(board, "quit", said.append)


def test_main_prints_the_pty_and_quits_on_quit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("status\nquit\n"))
    assert main(["--link", str(tmp_path / "ttyMDB")]) == 0
    out = capsys.readouterr().out
    assert "MDB board emulator on /dev/pts/" in out
    assert "reader=off" in out
    assert not (tmp_path / "ttyMDB").exists()  # the symlink goes with the tool


def test_the_tool_as_a_process_answers_a_host_on_its_pty(tmp_path: Path) -> None:
    link = tmp_path / "ttyMDB"
    tool = subprocess.Popen(
        [sys.executable, "-m", "drivers.mdb_board", "--link", str(link)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert tool.stdin is not None and tool.stdout is not None
    try:
        banner = read_line_within(tool.stdout, WAIT_S)
        assert "MDB board emulator on" in banner
        host = Host(str(link))
        try:
            assert host.ask("C,1", answers=3)[-1] == "c,STATUS,ENABLED"
            tool.stdin.write("select 2.00 7\n")
            tool.stdin.flush()
            assert host.read_line() == "c,STATUS,VEND,2.00,7"
        finally:
            host.close()
        tool.stdin.write("quit\n")
        tool.stdin.flush()
        assert tool.wait(WAIT_S) == 0
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def read_line_within(stream: io.TextIOBase | object, timeout: float) -> str:
    fileno = stream.fileno()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    readable, _, _ = select.select([fileno], [], [], max(deadline - time.monotonic(), 0))
    assert readable, "the tool printed nothing"
    return stream.readline()  # type: ignore[attr-defined,no-any-return]
