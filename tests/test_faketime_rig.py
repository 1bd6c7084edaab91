"""The rig's wall-clock mechanism: the daemon under libfaketime, its wall clock moved by a file
while its monotonic clock (its timeouts) runs on. The campaign's clock faults rest on this."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiosk.simulator import GatewaySimulator
from tests.daemon_rig import DaemonRig, faketime_env, faketime_problem, write_offset

pytestmark = pytest.mark.skipif(
    faketime_problem() is not None, reason=f"wall-clock faults: {faketime_problem()}"
)

_SHOW = "import json, time; print(json.dumps([time.time(), time.monotonic()]))"


def _clocks(offset_file: Path) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", _SHOW],
        env={**os.environ, **faketime_env(offset_file)},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    wall, mono = json.loads(out.stdout)
    return wall, mono


@pytest.mark.parametrize("offset", [2 * 3600.0, -3 * 3600.0, 30 * 3600.0, 0.0])
def test_the_offset_moves_time_time_and_not_monotonic(tmp_path: Path, offset: float) -> None:
    offset_file = tmp_path / "offset"
    write_offset(offset_file, offset)
    mono_before = time.monotonic()
    wall, mono = _clocks(offset_file)
    assert abs(wall - time.time() - offset) < 20
    assert mono_before <= mono <= time.monotonic()  # one system-wide monotonic clock


def test_a_running_daemon_follows_the_offset_file(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    rig = DaemonRig(tmp_path, simulator, faketime=True)
    try:
        rig.set_wall_offset(30 * 3600)
        rig.start()
        start = len(rig.logs)
        rig.scanner.write_line("281234567890120001")
        rig.vmc.expect("APPROVED ", 10)
        index = rig.wait_log_after(start, lambda e: e.get("event") == "payment.start", 5, "start")
        stamp = str(rig.logs[index]["ref"]).split("-")[2]  # VM-RIG-<yyyymmddHHMMSS>-<hex>
        assert abs(_epoch(stamp, "%Y%m%d%H%M%S") - time.time() - 30 * 3600) < 60
        # No answer from the controller: the vend times out on the monotonic clock, in 2 s.
        rig.wait_log_after(start, lambda e: e.get("event") == "vend.result", 10, "vend.result")

        # Back to the real time while it runs: its log stamps follow within seconds.
        rig.set_wall_offset(0)
        deadline = time.monotonic() + 15
        while True:
            mark = len(rig.logs)
            rig.scanner.write_line("not a code")
            index = rig.wait_log_after(
                mark, lambda e: e.get("event") == "scan.rejected", 5, "scan.rejected"
            )
            shown = _epoch(str(rig.logs[index]["ts"])[:19], "%Y-%m-%dT%H:%M:%S")
            if abs(shown - time.time()) < 60:
                break
            assert time.monotonic() < deadline, "the daemon's wall clock did not come back"
            threading.Event().wait(0.25)  # libfaketime re-reads the offset file every second
    finally:
        rig.close()


def _epoch(text: str, fmt: str) -> float:
    return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
