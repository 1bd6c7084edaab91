"""A hardware-in-the-loop rig for the whole daemon: `kiosk run` as a subprocess, a serial
scanner and a vending controller on real ptys, the gateway simulator on loopback.

The test plays the customer (writes codes to the scanner's pty) and the vending controller
(reads `APPROVED`, writes `SUCCESS`/`FAILURE`), and reads the daemon's JSON log lines.

With `faketime=True` the daemon runs under libfaketime (Debian: `faketime`), so a test can move
the daemon's wall clock (`time.time()`, `datetime.now()`) while its monotonic clock, which its
timeouts use, runs on: `set_wall_offset(seconds)`. `faketime_problem()` says why that cannot
work here, or None (KIOSK_RIG_NO_FAKETIME=1 plays a machine without libfaketime).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from kiosk.simulator import GatewaySimulator
from tests.conftest import PARTNER, named_key

ROOT = Path(__file__).resolve().parents[1]

# libfaketime, as Debian's `libfaketime` package installs it (also pulled in by `faketime`).
FAKETIME_LIBS = (
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
    Path("/usr/local/lib/faketime/libfaketime.so.1"),
)
FAKETIME_PACKAGE = "faketime (Debian/Ubuntu: apt-get install faketime)"


def service_python_env() -> dict[str, str]:
    """The Python and locale settings systemd/kiosk.service runs the daemon with (its
    `Environment=PYTHON*` and `Environment=LC_*` lines: no bytecode written, `python -OO`, the
    C locale in UTF-8 mode): to run the daemon as a kiosk runs it."""
    found: dict[str, str] = {}
    for line in (ROOT / "systemd" / "kiosk.service").read_text().splitlines():
        if line.startswith(("Environment=PYTHON", "Environment=LC_")):
            name, _, value = line.removeprefix("Environment=").partition("=")
            found[name] = value
    return found


def faketime_library() -> Path | None:
    return next((lib for lib in FAKETIME_LIBS if lib.exists()), None)


def faketime_env(offset_file: Path) -> dict[str, str]:
    """Environment that runs a process with its wall clock offset by what `offset_file` says
    (`+7200`, `-10800`) and its monotonic clock untouched. The file is re-read every second,
    so a change reaches a running process within about 2 s (FAKETIME_NO_CACHE=1, a read on
    every clock call, made the daemon six times slower per request)."""
    lib = faketime_library()
    if lib is None:
        raise RuntimeError(f"libfaketime not found; install {FAKETIME_PACKAGE}")
    return {
        "LD_PRELOAD": str(lib),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "0",
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_offset(offset_file: Path, seconds: float) -> None:
    """Atomically: a process under libfaketime reads the file on every clock call."""
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(f"{seconds:+.3f}\n")
    os.replace(tmp, offset_file)


_PROBE = """
import sys, threading, time
before = (time.time(), time.monotonic())
open(sys.argv[1] + ".tmp", "w").write("+7200\\n")
__import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
while time.time() - before[0] < 3600 and time.monotonic() - before[1] < 10:
    threading.Event().wait(0.05)
after = (time.time(), time.monotonic())
print(after[0] - before[0], after[1] - before[1])
"""


@functools.cache
def faketime_problem() -> str | None:
    """None when libfaketime moves a Python subprocess's `time.time()` on a change of its
    offset file while `time.monotonic()` runs on; else why not."""
    if os.environ.get("KIOSK_RIG_NO_FAKETIME"):
        return "turned off by KIOSK_RIG_NO_FAKETIME"
    lib = faketime_library()
    if lib is None:
        return f"libfaketime is not installed (package {FAKETIME_PACKAGE})"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        offset = Path(tmp) / "offset"
        write_offset(offset, 0)
        try:
            out = subprocess.run(
                [sys.executable, "-c", _PROBE, str(offset)],
                env={**os.environ, **faketime_env(offset)},
                capture_output=True,
                text=True,
                timeout=30,
            )
            wall, mono = (float(x) for x in out.stdout.split())
        except (subprocess.SubprocessError, ValueError) as exc:
            return f"libfaketime at {lib} did not run a Python probe ({exc})"
    if not 7190 < wall < 7230 or not 0 <= mono < 5:
        return f"libfaketime at {lib} moved time.time() by {wall:.0f}s, monotonic by {mono:.1f}s"
    return None


class Pty:
    """One end of a serial line: the daemon opens `port`, the test uses the master."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.port = os.ttyname(slave)
        # Raw mode on the slave side: no echo, no line discipline surprises.
        import tty

        tty.setraw(slave)
        self._slave = slave  # kept open so the master never sees a hang-up between opens
        self._buffer = b""
        self.lines: list[str] = []

    def write_line(self, text: str, end: str = "\r\n") -> None:
        os.write(self.master, (text + end).encode())

    def read_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    self._buffer += os.read(self.master, 1024)
                except OSError:
                    return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode(errors="replace").rstrip("\r")
        self.lines.append(text)
        return text

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """Read lines until one starts with `prefix`; fail with what was seen instead."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.read_line(deadline - time.monotonic())
            if line is None:
                break
            if line.startswith(prefix):
                return line
            seen.append(line)
        raise AssertionError(f"no line starting {prefix!r} within {timeout}s; saw {seen}")

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class DaemonRig:
    def __init__(
        self,
        tmp: Path,
        simulator: GatewaySimulator,
        declined_hold_s: float = 3.0,
        *,
        faketime: bool = False,
        extra_config: dict[str, dict[str, Any]] | None = None,
        **alipay: Any,
    ) -> None:
        """`alipay` sets [alipay] keys; `extra_config` adds (or overrides) keys of any section,
        e.g. {"vend": {"timeout_s": 1}}; `faketime` runs the daemon under libfaketime."""
        self.declined_hold_s = declined_hold_s
        self.tmp = tmp
        self.sim = simulator
        self.scanner = Pty()
        self.vmc = Pty()
        self.state_dir = tmp / "state"
        self.config_path = tmp / "kiosk.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[dict[str, Any]] = []
        self.raw_log: list[str] = []
        self._changed = threading.Condition()
        self._alipay = dict(alipay)
        self._extra = {section: dict(keys) for section, keys in (extra_config or {}).items()}
        self.wall_offset_s = 0.0
        self.wall_offset_file: Path | None = None
        if faketime:
            self.wall_offset_file = tmp / "wall-offset"
            write_offset(self.wall_offset_file, 0)
        self._write_config(alipay)

    def set_wall_offset(self, seconds: float) -> None:
        """Move the daemon's wall clock to this far from the real one (needs faketime=True):
        for a daemon started next at once, for a running one within about 2 s."""
        assert self.wall_offset_file is not None, "DaemonRig(faketime=True) needed"
        self.wall_offset_s = seconds
        write_offset(self.wall_offset_file, seconds)

    def rewrite_config(
        self, alipay: dict[str, Any] | None = None, extra: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Write the config again with these keys changed (a value of None drops the key), in
        one rename, so a daemon reloading on SIGHUP never reads half a file."""
        for key, value in (alipay or {}).items():
            if value is None:
                self._alipay.pop(key, None)
            else:
                self._alipay[key] = value
        for section, keys in (extra or {}).items():
            for key, value in keys.items():
                if value is None:
                    self._extra.get(section, {}).pop(key, None)
                else:
                    self._extra.setdefault(section, {})[key] = value
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self._config_text(self._alipay))
        os.replace(tmp, self.config_path)

    def _write_config(self, alipay: dict[str, Any]) -> None:
        self._write_keys()
        self.config_path.write_text(self._config_text(alipay))

    def _write_keys(self) -> None:
        keys = self.tmp / "keys"
        keys.mkdir(exist_ok=True)
        private = keys / "merchant_private_key.pem"
        private.write_bytes(
            named_key("merchant").private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        public = keys / "alipay_public_key.pem"
        public.write_bytes(
            self.sim.alipay_public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _config_text(self, alipay: dict[str, Any]) -> str:
        keys = self.tmp / "keys"
        private = keys / "merchant_private_key.pem"
        public = keys / "alipay_public_key.pem"
        settings = {
            "pay_timeout_s": 1.0,
            "query_interval_s": 0.2,
            "query_deadline_s": 2.0,
            "probe_interval_s": 1.0,
            "retry_max_s": 5.0,  # background retries compressed like the other timings
            **alipay,
        }
        settings.update(self._extra.get("alipay", {}))
        extra = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
        text = f"""
[kiosk]
terminal_id = "VM-RIG"
state_dir = "{self.state_dir}"
require_synced_clock = false  # this host's clock is not the kiosk's to judge

[alipay]
gateway = "{self.sim.url}"
allow_http = true
partner = "{PARTNER}"
sign_type = "RSA2"
private_key_file = "{private}"
alipay_public_key_file = "{public}"
currency = "USD"
{extra}

[merchant]
secondary_merchant_id = "M-RIG"
store_id = "S-RIG"

[sale]
mode = "fixed"
price = "1.50"
item = "coffee"

[scanner]
driver = "serial"
port = "{self.scanner.port}"

[indicators]
driver = "fake"
declined_hold_s = {self.declined_hold_s}

[vend]
driver = "serial"
port = "{self.vmc.port}"
timeout_s = 2
"""
        return _with_extra(text, {k: v for k, v in self._extra.items() if k != "alipay"})

    # -- the daemon -------------------------------------------------------------------------

    def start(
        self,
        wait_ready: bool = True,
        wrap: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """Start `kiosk run`; `wrap` prefixes the command (e.g. `unshare` to remount)."""
        self.logs.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        if self.wall_offset_file is not None:
            env.update(faketime_env(self.wall_offset_file))
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [
                *(wrap or []),
                sys.executable,
                "-m",
                "kiosk",
                "run",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        if not wait_ready:
            return
        self.wait_log(lambda e: e.get("event") == "kiosk.ready", 30, "kiosk.ready")
        # pyserial flushes a port's input when it opens it: talk only once both are open.
        self.wait_log(lambda e: e.get("event") == "scanner.opened", 10, "scanner.opened")
        # The serial link is up; an MDB board (vend.driver = "mdb") is configured.
        self.wait_log(
            lambda e: e.get("event") in ("vend.link_up", "mdb.configured"), 10, "vend.link_up"
        )

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                self.raw_log.append(line)
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    entry = {"event": "unparsed", "line": line}
                if isinstance(entry, dict):
                    entry.setdefault("_rx", time.time())  # when the rig read it (real clock)
                self.logs.append(entry)
                self._changed.notify_all()

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for entry in self.logs:
                    if predicate(entry):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and not any(predicate(e) for e in self.logs)
                ):
                    if remaining > 0:
                        self._changed.wait(0.2)  # let the reader drain the last lines
                        if any(predicate(e) for e in self.logs):
                            continue
                    raise AssertionError(
                        f"log event {what} not seen in {timeout}s; last lines: {self.raw_log[-15:]}"
                    )
                self._changed.wait(remaining)

    def wait_log_after(
        self, start: int, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> int:
        """Like wait_log, for entries at index >= start; returns the matching entry's index."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self.logs)):
                    if predicate(self.logs[index]):
                        return index
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"log event {what} not seen in {timeout}s; last lines: {self.raw_log[-15:]}"
                    )
                self._changed.wait(remaining)

    def count_after(self, start: int, predicate: Callable[[dict[str, Any]], bool]) -> int:
        with self._changed:
            return sum(1 for e in self.logs[start:] if predicate(e))

    def wait_count_after(
        self,
        start: int,
        predicate: Callable[[dict[str, Any]], bool],
        count: int,
        timeout: float,
    ) -> int:
        """Wait until `count` entries at index >= start match; returns how many matched (fewer
        when `timeout` passed first). Reads each new entry once."""
        deadline = time.monotonic() + timeout
        seen, index = 0, start
        with self._changed:
            while True:
                while index < len(self.logs):
                    seen += bool(predicate(self.logs[index]))
                    index += 1
                remaining = deadline - time.monotonic()
                if seen >= count or remaining <= 0:
                    return seen
                self._changed.wait(remaining)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit()

    def journal(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kiosk",
                "journal",
                "--json",
                "--all",
                "--config",
                str(self.config_path),
            ],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        )
        return json.loads(out.stdout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.scanner.close()
        self.vmc.close()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return str(value)


def _with_extra(text: str, extra: dict[str, dict[str, Any]]) -> str:
    """The config text with extra keys set in their sections (replacing a key given there; a
    value of None drops the key)."""
    lines = text.split("\n")
    for section, keys in extra.items():
        header = f"[{section}]"
        if header not in lines:
            lines += ["", header]
        start = lines.index(header) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        body = [line for line in lines[start:end] if line.split("=", 1)[0].strip() not in keys]
        body = [line for line in body if line.strip()]
        body += [f"{key} = {_toml(value)}" for key, value in keys.items() if value is not None]
        lines[start:end] = [*body, ""]
    return "\n".join(lines)
