"""Logs as journald and a log collector need them: under journald each line carries its syslog
priority (`<3>` ...), so `journalctl -p err` finds the errors; with `--log-format json` every
line on stderr is one JSON object, library warnings included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import logging, sys, threading, warnings
from kiosk.log import event, setup_logging
setup_logging(sys.argv[1])
log = logging.getLogger("kiosk.test")
event(log, "test.info", what="fine")
event(log, "test.warning", level=logging.WARNING, what="odd")
event(log, "test.error", level=logging.ERROR, what="broken")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("with a traceback")
warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")
logging.getLogger("paho.mqtt.client").warning("paho says something")
def die():
    raise ValueError("a thread died")
t = threading.Thread(target=die, name="doomed"); t.start(); t.join()
"""


def run(log_format: str, tmp_path: Path, journal: bool) -> list[str]:
    """Run SCRIPT with stderr to a file; with `journal`, $JOURNAL_STREAM names that file,
    as systemd names the stream it connects to a service's stderr."""
    out = tmp_path / f"stderr-{log_format}-{journal}"
    with out.open("wb") as err:
        env = {**os.environ, "PYTHONWARNINGS": "default"}
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-c", SCRIPT, log_format],
            cwd=ROOT,
            env=env,
            stderr=err,
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )
    return out.read_text().splitlines()


def test_under_journald_every_line_carries_its_priority(tmp_path: Path) -> None:
    lines = run("text", tmp_path, journal=True)
    assert all(line[:3] in {"<2>", "<3>", "<4>", "<6>", "<7>"} for line in lines), lines
    by_event = {line.split("event=")[1].split()[0]: line[:3] for line in lines if "event=" in line}
    assert by_event == {"test.info": "<6>", "test.warning": "<4>", "test.error": "<3>"}
    # A traceback's lines carry its record's priority: `journalctl -p err` shows it whole.
    traceback = [line for line in lines if "RuntimeError: boom" in line or "Traceback" in line]
    assert traceback and all(line.startswith("<3>") for line in traceback)
    assert any(line.startswith("<4>") and "deprecation" in line for line in lines)
    assert any(line.startswith("<3>") and "thread doomed died" in line for line in lines)


def test_without_journald_no_prefix(tmp_path: Path) -> None:
    lines = run("text", tmp_path, journal=False)
    assert lines and not any(line.startswith("<") for line in lines)


def test_json_output_is_pure_json_with_library_warnings_in_it(tmp_path: Path) -> None:
    lines = run("json", tmp_path, journal=False)
    objects = [json.loads(line) for line in lines]  # every line, or this raises
    assert all(isinstance(o, dict) and "level" in o and "ts" in o for o in objects)
    messages = [o.get("message", "") for o in objects]
    assert any("a library's deprecation" in m for m in messages)
    assert any("Retrying after connection broken" in m for m in messages)
    assert any("paho says something" in m for m in messages)
    died = [o for o in objects if "thread doomed died" in o.get("message", "")]
    assert died and "ValueError: a thread died" in died[0]["exception"]
    assert {"test.info", "test.warning", "test.error"} <= {o.get("event") for o in objects}


def test_json_under_journald_is_json_after_the_priority(tmp_path: Path) -> None:
    lines = run("json", tmp_path, journal=True)
    for line in lines:
        assert line[0] == "<" and line[2] == ">", line
        json.loads(line[3:])
