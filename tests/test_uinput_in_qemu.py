"""The uinput scanner tests inside a real kernel under qemu, for machines whose kernel lacks
/dev/uinput (this build machine, CI). Boots with tests/qemu/run-in-kernel.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "qemu" / "run-in-kernel.sh"
CANNOT_RUN = 77  # the script's "prerequisites missing" status

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _missing_tools() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    if shutil.which("busybox") is None:
        return "busybox missing (apt-get install busybox-static)"
    if shutil.which("apt-cache") is None or shutil.which("dpkg") is None:
        return "no apt/dpkg to fetch the kernel package"
    return None


@pytest.mark.skipif(_missing_tools() is not None, reason=str(_missing_tools()))
def test_uinput_scanner_tests_pass_in_a_real_kernel() -> None:
    python = Path(sys.executable)
    if not python.is_relative_to(REPO):
        pytest.skip(f"the guest runs the host's python through 9p; {python} is outside {REPO}")
    command = [
        str(SCRIPT),
        str(python),
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",  # its import costs ~25 s under emulation; unused here
        "-m",
        "uinput",
        "tests/test_scanner_uinput.py",
    ]
    env = {**os.environ, "KIOSK_QEMU_TIMEOUT": os.environ.get("KIOSK_QEMU_TIMEOUT", "300")}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode == CANNOT_RUN:
        pytest.skip("qemu run impossible here: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, output[-4000:]
    assert "4 passed" in output, output[-4000:]
    assert "skipped" not in output, output[-4000:]  # the guest must really have /dev/uinput
