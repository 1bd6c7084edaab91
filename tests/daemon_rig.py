"""A hardware-in-the-loop rig for the whole daemon: `kiosk run` as a subprocess, a serial
scanner and a vending controller on real ptys, the gateway simulator on loopback.

The test plays the customer (writes codes to the scanner's pty) and the vending controller
(reads `APPROVED`, writes `SUCCESS`/`FAILURE`), and reads the daemon's JSON log lines.
"""

from __future__ import annotations

import contextlib
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
        self, tmp: Path, simulator: GatewaySimulator, declined_hold_s: float = 3.0, **alipay: Any
    ) -> None:
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
        self._write_config(alipay)

    def _write_config(self, alipay: dict[str, Any]) -> None:
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
        settings = {
            "pay_timeout_s": 1.0,
            "query_interval_s": 0.2,
            "query_deadline_s": 2.0,
            "probe_interval_s": 1.0,
            "retry_max_s": 5.0,  # background retries compressed like the other timings
            **alipay,
        }
        extra = "\n".join(f"{k} = {v}" for k, v in settings.items())
        self.config_path.write_text(f"""
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
""")

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
        self.wait_log(lambda e: e.get("event") == "vend.link_up", 10, "vend.link_up")

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                self.raw_log.append(line)
                try:
                    self.logs.append(json.loads(line))
                except json.JSONDecodeError:
                    self.logs.append({"event": "unparsed", "line": line})
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
