"""Shared pieces of the kiosk's benchmarks: statistics, result hand-off to run_all.py, the
gateway simulator with its keys, and a rig running `kiosk run` with its serial devices on ptys.

The rig follows tests/daemon_rig.py but is its own copy, so the benchmarks do not break when
the tests' helpers change.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.log import JsonFormatter
from kiosk.simulator import GatewaySimulator, MerchantAccount

ROOT = Path(__file__).resolve().parents[1]
PARTNER = "2088101122334455"
RESULT_ENV = "KIOSK_BENCH_RESULT"  # run_all.py names a file here to collect each bench's figures


# -- figures -------------------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: with N samples, p99 is the max once N < 100."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


def summary(samples_s: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, mean, min and max of durations in seconds, as milliseconds."""
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def fmt_ms(value: float) -> str:
    return f"{value:8.3f} ms" if value < 100 else f"{value:8.1f} ms"


def report(name: str, figures: dict[str, Any]) -> None:
    """Hand the bench's headline figures to run_all.py (a no-op when run alone)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps({"bench": name, **figures}, default=str))


def quiet_json_logging() -> None:
    """Log as `kiosk run --log-format json` does, into /dev/null: the formatting cost is real,
    the output is not wanted. The simulator stands in for Alipay; its own lines are dropped."""
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (lives with the bench)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("kiosk.simulator").setLevel(logging.WARNING)


# -- the simulated gateway -----------------------------------------------------------------


@functools.cache
def bench_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit RSA key per name ("merchant", "alipay"), made once per process."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def start_simulator() -> GatewaySimulator:
    """The gateway simulator on 127.0.0.1, knowing the merchant's RSA2 public key."""
    sim = GatewaySimulator(
        [MerchantAccount(PARTNER, merchant_public_key=bench_key("merchant").public_key())],
        alipay_private_key=bench_key("alipay"),
    )
    sim.start()
    return sim


def unique_code(n: int) -> str:
    """The n-th distinct 18-digit payment code the simulator pays at once (last 4: 0001)."""
    return f"28{n:012d}0001"


# -- `kiosk run` on ptys -------------------------------------------------------------------


class Pty:
    """One serial line: the daemon opens `port`, the bench uses the master end."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.port = os.ttyname(slave)
        tty.setraw(slave)  # no echo, no line discipline
        self._slave = slave  # kept open so the master never sees a hang-up between opens
        self._buffer = b""

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
        return line.decode(errors="replace").rstrip("\r")

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """Read lines until one starts with `prefix`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while (line := self.read_line(deadline - time.monotonic())) is not None:
            if line.startswith(prefix):
                return line
            seen.append(line)
        raise RuntimeError(f"no line starting {prefix!r} within {timeout}s; saw {seen}")

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class KioskRig:
    """`kiosk run` as a subprocess: serial scanner and vending controller on ptys, the gateway
    simulator on loopback, fake lights, state and keys in `tmp`."""

    def __init__(self, tmp: Path, sim: GatewaySimulator) -> None:
        self.tmp = tmp
        self.sim = sim
        self.scanner = Pty()
        self.vmc = Pty()
        self.state_dir = tmp / "state"
        self.config_path = tmp / "kiosk.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[dict[str, Any]] = []
        self.raw_log: list[str] = []
        self._changed = threading.Condition()
        self._write_config()

    def _write_config(self) -> None:
        keys = self.tmp / "keys"
        keys.mkdir(exist_ok=True)
        private = keys / "merchant_private_key.pem"
        private.write_bytes(
            bench_key("merchant").private_bytes(
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
        self.config_path.write_text(f"""
[kiosk]
terminal_id = "VM-BENCH"
state_dir = "{self.state_dir}"

[alipay]
gateway = "{self.sim.url}"
allow_http = true
partner = "{PARTNER}"
sign_type = "RSA2"
private_key_file = "{private}"
alipay_public_key_file = "{public}"
currency = "USD"

[merchant]
secondary_merchant_id = "M-BENCH"
store_id = "S-BENCH"

[sale]
mode = "fixed"
price = "1.50"
item = "coffee"

[scanner]
driver = "serial"
port = "{self.scanner.port}"

[indicators]
driver = "fake"

[vend]
driver = "serial"
port = "{self.vmc.port}"
timeout_s = 10
""")

    def spawn(self, **env_extra: str) -> subprocess.Popen[bytes]:
        """Start `kiosk run` (JSON logs read on a thread); return without waiting."""
        self.logs.clear()
        self.raw_log.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", RESULT_ENV):
            env.pop(name, None)
        env.update(env_extra)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiosk",
                "run",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
            ],
            # From the checkout, as the tests do: the venv's editable install may predate
            # drivers/__init__.py and then finds `drivers` only through the working directory.
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        return self.proc

    def start(self) -> None:
        """Start and wait until the kiosk is ready with both serial ports open."""
        self.spawn()
        self.wait_log(0, lambda e: e.get("event") == "kiosk.ready", 30, "kiosk.ready")
        # pyserial flushes a port's input when it opens it: talk only once both are open.
        self.wait_log(0, lambda e: e.get("event") == "scanner.opened", 10, "scanner.opened")
        self.wait_log(0, lambda e: e.get("event") == "vend.link_up", 10, "vend.link_up")
        self.wait_log(
            0,
            lambda e: e.get("event") == "indicator" and e.get("state") == "ready",
            10,
            "indicator ready",
        )

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

    def log_mark(self) -> int:
        """A point in the log; `wait_log(mark, ...)` looks only at lines after it."""
        with self._changed:
            return len(self.logs)

    def wait_log(
        self, mark: int, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> int:
        """The position of the first log line after `mark` that matches, once it is read."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for position in range(mark, len(self.logs)):
                    if predicate(self.logs[position]):
                        return position
                remaining = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if remaining <= 0 or exited:
                    raise RuntimeError(
                        f"log event {what} not seen in {timeout}s"
                        f"{' (kiosk exited)' if exited else ''}; "
                        f"last lines: {self.raw_log[-10:]}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.scanner.close()
        self.vmc.close()


def read_proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmRSS, VmHWM, Threads, ...)."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Fields after the command name (which may hold spaces) start at state, field 3.
    after = stat.rsplit(")", 1)[1].split()
    utime, stime = int(after[11]), int(after[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")
