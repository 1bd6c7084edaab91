"""`kiosk run` loads only what the daemon uses: the gateway simulator, the demo, the config
checker's suggestions (difflib) and the other commands' code load only in their own commands.
Every module a daemon imports stays resident for its life (on a 512 MB Pi, beside everything
else), so this is checked on a real `kiosk run`, with fake devices, from start to SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import MD5_KEY, PARTNER

ROOT = Path(__file__).resolve().parents[1]

# Loaded by other commands only (or by a config with a mistake in it), or by nothing the
# daemon does: requests' character set guessing (the kiosk reads answers as bytes), x509
# (only a pinned TLS connection needs it), ctypes.util and subprocess (libc is already loaded),
# ctypes itself (only while timesyncd has not said the clock is synchronised, and never with
# require_synced_clock = false), xml.sax (only writing an answer, the simulator's part, needs
# it), and telemetry without a [telemetry] section.
NOT_FOR_THE_DAEMON = (
    "charset_normalizer",
    "chardet",
    "cryptography.x509",
    "ctypes",
    "ctypes.util",
    "subprocess",
    "difflib",
    "kiosk.simulator",
    "kiosk.demo",
    "kiosk.selftest",
    "kiosk.provision",
    "kiosk.config_docs",
    "kiosk.bundle",
    "kiosk.keygen",
    "drivers.mdb_board",
    "http.server",
    "xml.sax",
    "socketserver",
    "kiosk.telemetry",
    "kiosk.ha_discovery",
    "kiosk.metrics",
    "kiosk.mqtt_link",
)

# Runs `kiosk run ARGS` in this interpreter and writes the names of every module it loaded,
# at exit, to the file named first.
_RUN = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(
    lambda: open(out, "w").write(json.dumps(sorted(k for k, v in sys.modules.items() if v)))
)
from kiosk.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def fake_device_config(tmp_path: Path) -> Path:
    key = tmp_path / "md5.key"
    key.write_bytes(MD5_KEY)
    key.chmod(0o600)
    config = tmp_path / "kiosk.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [kiosk]
            terminal_id = "VM-IMPORTS"
            state_dir = "{tmp_path / "state"}"
            require_synced_clock = false

            [alipay]
            gateway = "http://127.0.0.1:9/gateway.do"
            allow_http = true
            partner = "{PARTNER}"
            sign_type = "MD5"
            md5_key_file = "{key}"
            currency = "USD"

            [merchant]
            secondary_merchant_id = "M-1"
            store_id = "S-1"

            [sale]
            mode = "fixed"
            price = "1.50"
            item = "coffee"

            [scanner]
            driver = "fake"

            [indicators]
            driver = "fake"

            [vend]
            driver = "fake"
            """
        )
    )
    return config


def modules_of_kiosk_run(tmp_path: Path, config: Path) -> set[str]:
    """Every module a `kiosk run` with `config` loaded, from its start to SIGTERM."""
    loaded_file = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _RUN,
            str(loaded_file),
            "run",
            "--config",
            str(config),
            "--log-format",
            "json",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            seen.append(line)
            if '"kiosk.ready"' in line:
                break
        else:
            raise AssertionError(f"kiosk run ended before ready: {seen[-10:]}")
        ready = json.loads(seen[-1])
        assert ready["out_of_service"] is None, ready  # the whole daemon is up, not a fallback
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return set(json.loads(loaded_file.read_text()))


def test_kiosk_run_loads_nothing_of_the_other_commands(
    tmp_path: Path, fake_device_config: Path
) -> None:
    loaded = modules_of_kiosk_run(tmp_path, fake_device_config)
    assert {"kiosk.daemon", "kiosk.payment", "kiosk.alipay.client"} <= loaded
    unwanted = sorted(
        name
        for name in loaded
        if any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_FOR_THE_DAEMON)
    )
    assert unwanted == [], f"`kiosk run` loaded {unwanted}"


def test_the_image_compiles_every_module_of_the_kiosk_that_kiosk_run_loads(
    tmp_path: Path, fake_device_config: Path
) -> None:
    """The service runs from the *.opt-2.pyc the image compiled by importing DAEMON_MODULES
    (image-build/kiosk-layer.sh) on a read-only root: a module of the kiosk's that `kiosk run`
    loads beyond them is compiled from source at every start of the service."""
    layer = (ROOT / "image-build" / "kiosk-layer.sh").read_text()
    found = re.search(r"^DAEMON_MODULES=\((.*?)\)$", layer, re.M | re.S)
    assert found is not None, "kiosk-layer.sh names no DAEMON_MODULES"
    ours = [name for name in found.group(1).split() if name.split(".")[0] in ("kiosk", "drivers")]
    listing = "import json, sys\n" + "".join(f"import {name}\n" for name in ours)
    listing += "print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", listing], capture_output=True, text=True, check=True, cwd=ROOT
    )
    compiled = set(json.loads(done.stdout))
    loaded = modules_of_kiosk_run(tmp_path, fake_device_config)
    missed = sorted(
        name for name in loaded - compiled if name.split(".")[0] in ("kiosk", "drivers")
    )
    assert missed == [], f"`kiosk run` loads {missed}, which the image does not compile"
