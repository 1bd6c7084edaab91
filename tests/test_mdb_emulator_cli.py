"""`kiosk mdb-emulator`: the board emulator as an integrator starts it, a subprocess on a pty."""

from __future__ import annotations

import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


class Emulator:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiosk", "mdb-emulator", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def printed(self, pattern: str) -> str:
        """The next line printed that matches PATTERN."""
        deadline = time.monotonic() + WAIT_S
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if re.fullmatch(pattern, line):
                return line

    def type(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()


def read_line(fd: int) -> str:
    data = b""
    deadline = time.monotonic() + WAIT_S
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line from the board (so far {data!r})"
        data += os.read(fd, 1)
    return data.decode().strip()


def test_the_emulator_prints_its_pty_and_answers_the_kiosk_there(tmp_path: Path) -> None:
    link = tmp_path / "ttyMDB"
    emulator = Emulator("--link", str(link), "--version-line", "v,9.9.9,BENCH")
    try:
        first = emulator.printed(r"MDB board emulator on .*")
        found = re.fullmatch(
            r"MDB board emulator on (/dev/pts/\d+) \(also (.+)\); set vend.port to it\. "
            r"'help' lists commands\.",
            first,
        )
        assert found, first
        pty, also = found.groups()
        assert also == str(link) and os.path.realpath(link) == pty
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            os.write(fd, b"V\n")
            assert read_line(fd) == "v,9.9.9,BENCH"
            emulator.printed(r"host> V")
            os.write(fd, b"C,0\n")
            assert read_line(fd) == "c,STATUS,INACTIVE"
            emulator.type("status")
            emulator.printed(r".*reader.*")
        finally:
            os.close(fd)
        emulator.type("quit")
        assert emulator.proc.wait(WAIT_S) == 0
        assert not link.exists() and not link.is_symlink()
    finally:
        if emulator.proc.poll() is None:
            emulator.proc.kill()
            emulator.proc.wait()


def test_a_wrong_flag_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kiosk", "mdb-emulator", "--baud", "9600"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("kiosk: unrecognized arguments: --baud 9600")
