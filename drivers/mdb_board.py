"""A Qibixx MDB board in cashless-device mode with a scripted vending machine behind it.

Two uses: the MDB driver's fake twin (tests put it on the master end of a pty and the real
driver on the slave end), and an integrator's tool: `python -m drivers.mdb_board` opens a pty,
prints its path, and lets a person play the machine from the keyboard (`select 1.50 12`,
`success`, `fail`, `drop`, `reset`, ...) while the kiosk talks to the pty as to a board.

It plays what MDB.md and Qibixx's public documentation describe: `C,0` / `C,1` answered with
the reader's status lines, `C,SETCONF` with `c,SET,OK` (only while the reader is off), `V` with
a version line, `C,VEND` approving the open request for its amount, `C,STOP` ending it. What the
documentation leaves open (the wording of error lines, the status after `C,STOP`) is this
module's choice, written in docs/mdb.md. It is not an MDB bus simulator: no polls, no timing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import sys
import threading
import tty
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

VERSION_LINE = "v,4.0.2.0,0123456789AB"  # v,<firmware>,<cpu id>, as the board answers V
REFUSED = "c,ERR,invalid parameter"  # the emulator's refusal of a C,SETCONF (see docs/mdb.md)
READ_CHUNK = 4096
MAX_HOST_LINE = 256  # a longer host line is cut here (the board's buffer is small)

Echo = Callable[[str, str], None]  # (direction "host" or "board", line)


class _FdWire:
    """A pty master (or any fd) as the board's wire; a pipe wakes a blocked read for close()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()

    def read(self) -> bytes | None:
        """Bytes from the host; b"" when there are none for now; None when woken to stop."""
        readable, _, _ = select.select([self.fd, self._wake_r], [], [])
        if self._wake_r in readable:
            return None
        try:
            return os.read(self.fd, READ_CHUNK)
        except OSError as exc:
            if exc.errno == errno.EIO:  # nobody holds the slave end open
                select.select([self._wake_r], [], [], 0.1)
                return b""
            raise

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


class _SerialWire:
    """A pyserial-like port (e.g. a real UART jumpered to the Pi's) as the board's wire."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self._stopping = False

    def read(self) -> bytes | None:
        data: bytes = self.port.read(self.port.in_waiting or 1)
        return None if self._stopping else data

    def write(self, data: bytes) -> None:
        self.port.write(data)

    def wake(self) -> None:
        self._stopping = True
        if hasattr(self.port, "cancel_read"):
            self.port.cancel_read()

    def close(self) -> None:
        pass


class MdbBoard:
    """The board and the machine behind it. Thread-safe; every line the host sent is kept in
    `host_lines()` so a test can assert on it."""

    def __init__(
        self,
        port: int | Any,
        *,
        version_line: str = VERSION_LINE,
        auto_enable: bool = True,
        echo: Echo | None = None,
    ) -> None:
        self._wire: _FdWire | _SerialWire = (
            _FdWire(port) if isinstance(port, int) else _SerialWire(port)
        )
        self.version_line = version_line
        self.auto_enable = auto_enable  # the machine enables the reader as soon as it is on
        self._echo = echo
        # One reentrant lock over the state and the wire: a change of state and the lines that
        # announce it go out together, never overtaken by another thread's line.
        self._changed = threading.Condition(threading.RLock())
        self._received: list[str] = []
        self._cursor = 0
        self._config: dict[str, str] = {}
        self._refusals: dict[str, str | None] = {}
        self._reader_on = False
        self._machine = "INACTIVE"  # the reader as the machine sees it
        self._request: tuple[str, str] | None = None  # (amount, item) asked and not settled
        self._approved: str | None = None
        self._silent = False
        self._resets = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._owned_fds: list[int] = []
        self.device: str | None = None  # the slave's path, when the board opened the pty

    @classmethod
    def on_pty(cls, link: Path | None = None, **options: Any) -> MdbBoard:
        """A board on a new pty; the host opens `board.device` (or `link`, a symlink to it)."""
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or line editing before the host opens and sets the port
        board = cls(master, **options)
        board._owned_fds = [master, slave]  # the slave stays open: no EIO between host opens
        board.device = os.ttyname(slave)
        if link is not None:
            fresh = link.with_name(link.name + ".new")
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(board.device)
            os.replace(fresh, link)
        return board

    # -- running ------------------------------------------------------------------------------

    def start(self) -> MdbBoard:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mdb-board", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering and release the pty it opened. Safe twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wire.wake()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._wire.close()
        for fd in self._owned_fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> MdbBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scripting the board ------------------------------------------------------------------

    def refuse(self, name: str, answer: str | None = REFUSED) -> None:
        """Answer `C,SETCONF,<name>=...` with `answer` instead of `c,SET,OK` (None: no answer)."""
        with self._changed:
            self._refusals[name] = answer

    def accept_all(self) -> None:
        with self._changed:
            self._refusals.clear()

    def go_silent(self) -> None:
        """A hung board: it reads and records, and answers nothing, until `speak()` or a reset."""
        with self._changed:
            self._silent = True

    def speak(self) -> None:
        with self._changed:
            self._silent = False

    def reset(self, announce: bool = True) -> None:
        """The board restarts: configuration forgotten, reader off, any request gone. With
        `announce`, it says `c,STATUS,INACTIVE` unasked, which is how the host notices."""
        with self._changed:
            self._config.clear()
            self._reader_on = False
            self._machine = "INACTIVE"
            self._request = None
            self._approved = None
            self._silent = False
            self._resets += 1
            self._changed.notify_all()
            if announce:
                self.send_line("c,STATUS,INACTIVE")

    # -- playing the vending machine ----------------------------------------------------------

    def enable(self) -> bool:
        """The machine enables the reader (only a reader the host switched on)."""
        with self._changed:
            if not self._reader_on:
                return False
            self._machine = "ENABLED"
            self.send_line("c,STATUS,ENABLED")
        return True

    def disable(self) -> bool:
        with self._changed:
            if not self._reader_on:
                return False
            self._machine = "DISABLED"
            self._request = None
            self._approved = None
            self.send_line("c,STATUS,DISABLED")
        return True

    def select(self, amount: str, item: str) -> bool:
        """The customer picks `item` at `amount` (e.g. "1.50"); only on an enabled reader."""
        with self._changed:
            if not self._reader_on or self._machine != "ENABLED":
                return False
            self._request = (amount, item)
            self._approved = None
            self._machine = "VEND"
            self.send_line(f"c,STATUS,VEND,{amount},{item}")
        return True

    def success(self) -> bool:
        """The machine reports the product out. Sent even without an approval the board saw
        (a report for a vend approved before the host restarted); True if there was one."""
        return self._finish(["c,VEND,SUCCESS", "c,STATUS,IDLE", "c,STATUS,ENABLED"])

    def fail(self) -> bool:
        """The machine reports the vend failed (`c,ERR,VEND 3`)."""
        return self._finish(["c,ERR,VEND 3", "c,STATUS,IDLE", "c,STATUS,ENABLED"])

    def drop(self) -> bool:
        """The machine drops the open request (the customer cancelled, or it timed out)."""
        return self._finish(["c,STATUS,IDLE", "c,STATUS,ENABLED"])

    def send_line(self, line: str) -> None:
        """A line from the board, as is (for unknown or malformed lines in tests)."""
        self.send_bytes(line.encode("ascii", "replace") + b"\n")

    def send_bytes(self, data: bytes) -> None:
        with self._changed:
            if self._echo is not None:
                for line in data.decode("ascii", "replace").splitlines():
                    self._echo("board", line)
            self._wire.write(data)

    # -- what the host did --------------------------------------------------------------------

    def host_lines(self) -> list[str]:
        with self._changed:
            return list(self._received)

    def next_line(self, timeout: float) -> str | None:
        """The host's next line after the one this returned last (None if none in time)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._received) > self._cursor, timeout):
                return None
            line = self._received[self._cursor]
            self._cursor += 1
            return line

    def next_lines(self, count: int, timeout: float) -> list[str]:
        lines = []
        for _ in range(count):
            line = self.next_line(timeout)
            if line is None:
                break
            lines.append(line)
        return lines

    def skip_to_end(self) -> None:
        """Forget the host's lines so far: `next_line` returns only new ones."""
        with self._changed:
            self._cursor = len(self._received)

    def wait_for_line(self, line: str, timeout: float, count: int = 1) -> bool:
        """Wait until the host has sent `line` at least `count` times in all."""
        with self._changed:
            return self._changed.wait_for(lambda: self._received.count(line) >= count, timeout)

    def config(self) -> dict[str, str]:
        with self._changed:
            return dict(self._config)

    def reader_on(self) -> bool:
        with self._changed:
            return self._reader_on

    def wait_reader(self, on: bool, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._reader_on is on, timeout)

    def approved(self) -> str | None:
        """The amount the host approved for the open request, if it did."""
        with self._changed:
            return self._approved

    def wait_approved(self, timeout: float) -> str | None:
        with self._changed:
            self._changed.wait_for(lambda: self._approved is not None, timeout)
            return self._approved

    def request_open(self) -> bool:
        with self._changed:
            return self._request is not None

    def status(self) -> str:
        with self._changed:
            request = f" request={self._request[0]},{self._request[1]}" if self._request else ""
            approved = f" approved={self._approved}" if self._approved else ""
            return (
                f"reader={'on' if self._reader_on else 'off'} machine={self._machine}"
                f"{request}{approved} silent={self._silent} config={self._config}"
            )

    # -- the board's side of the wire ---------------------------------------------------------

    def _finish(self, lines: list[str]) -> bool:
        with self._changed:
            had = self._approved is not None
            self._request = None
            self._approved = None
            if self._reader_on:
                self._machine = "ENABLED"
            self._changed.notify_all()
            for line in lines:
                self.send_line(line)
        return had

    def _run(self) -> None:
        pending = b""
        while not self._stopping.is_set():
            try:
                data = self._wire.read()
            except OSError:
                return
            if data is None:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            pending = pending[-MAX_HOST_LINE:]
            for raw in lines:
                text = raw[:MAX_HOST_LINE].decode("ascii", "replace").rstrip("\r")
                if text:
                    self._answer(text)

    def _answer(self, line: str) -> None:
        if self._echo is not None:
            self._echo("host", line)
        with self._changed:
            self._received.append(line)
            self._changed.notify_all()
            if self._silent:
                return
            for reply in self._reply_locked(line):
                self.send_line(reply)
            self._changed.notify_all()

    def _reply_locked(self, line: str) -> list[str]:
        fields = line.split(",")
        match fields:
            case ["V"]:
                return [self.version_line]
            case ["C", "0"]:
                self._reader_on = False
                self._machine = "INACTIVE"
                self._request = None  # the machine sees the reader vanish
                self._approved = None
                return ["c,STATUS,INACTIVE"]
            case ["C", "1"]:
                self._reader_on = True
                if not self.auto_enable:
                    self._machine = "INACTIVE"
                    return ["c,STATUS,INACTIVE"]
                self._machine = "ENABLED"
                return ["c,STATUS,INACTIVE", "c,STATUS,DISABLED", "c,STATUS,ENABLED"]
            case ["C", "SETCONF", setting]:
                name, equals, value = setting.partition("=")
                if not equals or not name:
                    return ["c,ERR,bad SETCONF"]
                if self._reader_on:
                    return ["c,ERR,reader is on"]
                if name in self._refusals:
                    refusal = self._refusals[name]
                    return [] if refusal is None else [refusal]
                self._config[name] = value
                return ["c,SET,OK"]
            case ["C", "VEND", amount]:
                if self._request is None or self._approved is not None:
                    return ["c,ERR,no request to approve"]
                if not _same_amount(amount, self._request[0]):
                    return [f"c,ERR,amount {amount} is not {self._request[0]}"]
                self._approved = amount
                return []
            case ["C", "STOP"]:
                had = self._request is not None
                self._request = None
                self._approved = None
                if had and self._reader_on:
                    self._machine = "ENABLED"
                    return ["c,STATUS,ENABLED"]
                return []
        return [f"c,ERR,unknown command {line[:32]}"]


def _same_amount(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


# -- the integrator's tool ----------------------------------------------------------------------

HELP = """commands (the machine's side):
  select <amount> <item>   the customer picks, e.g. select 1.50 12
  success | fail | drop    report the vend out / failed, or drop the open request
  enable | disable         the machine enables / disables the reader
  reset                    the board restarts (configuration forgotten)
  silent | speak           the board hangs / answers again
  refuse <name> | accept   refuse C,SETCONF,<name>=... / accept everything again
  raw <line>               send a line as the board, as is
  status | help | quit"""


def run_command(board: MdbBoard, line: str, out: Callable[[str], None]) -> bool:
    """Carry out one command typed at the tool's prompt. False means quit."""
    words = line.split()
    if not words:
        return True
    verb, args = words[0].lower(), words[1:]
    if verb == "select" and len(args) == 2:
        if not board.select(args[0], args[1]):
            out("the reader is not enabled: the machine cannot ask it (host sends C,1 first)")
    elif verb in ("success", "fail", "drop") and not args:
        approved = getattr(board, verb)()
        if verb != "drop" and not approved:
            out("(no approved vend: reported all the same)")
    elif verb in ("enable", "disable") and not args:
        if not getattr(board, verb)():
            out("the reader is off (the host has not sent C,1)")
    elif verb == "reset" and not args:
        board.reset()
    elif verb == "silent" and not args:
        board.go_silent()
    elif verb == "speak" and not args:
        board.speak()
    elif verb == "refuse" and len(args) == 1:
        board.refuse(args[0])
    elif verb == "accept" and not args:
        board.accept_all()
    elif verb == "raw" and args:
        board.send_line(line.split(None, 1)[1])
    elif verb == "status" and not args:
        out(board.status())
    elif verb in ("quit", "exit") and not args:
        return False
    else:
        out(HELP)
    return True


DESCRIPTION = (
    "Emulate a Qibixx MDB board (cashless device) with a vending machine behind it, on a pty "
    "the kiosk can open as vend.port. Type 'select 1.50 12', 'success', 'fail', 'drop', 'reset', "
    "'silent', 'speak', 'status' or 'help' on standard input; every line the kiosk sends is "
    "printed as 'host> ...'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tool's flags, for its own parser and for `kiosk mdb-emulator`."""
    parser.add_argument(
        "--link",
        type=Path,
        metavar="PATH",
        help="also make this symlink to the pty (a stable name for vend.port)",
    )
    parser.add_argument(
        "--refuse",
        action="append",
        default=[],
        metavar="NAME",
        help="refuse C,SETCONF for this parameter (repeatable)",
    )
    parser.add_argument(
        "--manual-enable",
        action="store_true",
        help="after C,1 wait for 'enable' instead of enabling the reader at once",
    )
    parser.add_argument(
        "--version-line",
        default=VERSION_LINE,
        metavar="LINE",
        help=f"the board's answer to V (default: {VERSION_LINE})",
    )


def main(
    argv: Sequence[str] | None = None,
    prog: str = "mdb-board",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> int:
    """`python -m drivers.mdb_board` and `kiosk mdb-emulator` (whose parser class says a
    mistake the kiosk's way): a board on a pty, played from standard input; prints the pty's
    path first."""
    parser = parser_class(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)

    def out(text: str) -> None:
        print(text, flush=True)

    def echo(direction: str, line: str) -> None:
        out(f"{direction}> {line}")

    board = MdbBoard.on_pty(
        args.link, version_line=args.version_line, auto_enable=not args.manual_enable, echo=echo
    )
    for name in args.refuse:
        board.refuse(name)
    with board:
        where = f"{board.device}" + (f" (also {args.link})" if args.link else "")
        out(f"MDB board emulator on {where}; set vend.port to it. 'help' lists commands.")
        try:
            for line in sys.stdin:
                if not run_command(board, line, out):
                    break
        except KeyboardInterrupt:
            pass
    if args.link is not None:
        with contextlib.suppress(OSError):
            if args.link.is_symlink():
                args.link.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
