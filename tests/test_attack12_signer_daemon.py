"""The real daemon when, for a moment, no thread can be had for the Alipay client's signer
(the service's task limit, memory): that scan is signed in place and sold, the kiosk sells
again after it, and stops on SIGTERM. Injected with a `sitecustomize` that refuses the
signer's first start."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest

from kiosk.simulator import GatewaySimulator
from tests.conftest import payment_code
from tests.daemon_rig import DaemonRig, service_python_env

pytestmark = pytest.mark.slow

REFUSE_SIGNER_ONCE = """
import threading

_start = threading.Thread.start
_refused = []


def _start_once_refused(self):
    if self.name == "alipay-signer" and not _refused:
        _refused.append(self.name)
        raise RuntimeError("can't start new thread")
    _start(self)


threading.Thread.start = _start_once_refused
"""


def test_a_signer_thread_refused_once_leaves_the_daemon_selling_and_stoppable(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(REFUSE_SIGNER_ONCE)
    rig = DaemonRig(tmp_path, simulator, declined_hold_s=0.5)
    approved: str | None = None
    try:
        rig.start(extra_env={**service_python_env(), "PYTHONPATH": str(inject)})
        rig.scanner.write_line(payment_code("0001", 1))
        first = rig.vmc.expect("APPROVED ", 15)  # no thread: signed in place, and sold
        rig.vmc.write_line(f"SUCCESS {first.split(' ')[1]}")
        assert rig.vmc.expect("ACK ", 10) == f"ACK {first.split(' ')[1]}"
        rig.wait_log(lambda e: e.get("event") == "alipay.signer_not_started", 10, "not started")
        done = rig.wait_log_after(
            0, lambda e: e.get("event") == "payment.result", 10, "first result"
        )
        rig.wait_log_after(done, lambda e: e.get("state") == "ready", 10, "indicator ready")
        # Threads are to be had again: the next scan is paid and approved.
        rig.scanner.write_line(payment_code("0001", 2))
        with contextlib.suppress(AssertionError):
            approved = rig.vmc.expect("APPROVED ", 15)
        if approved is not None:
            ref = approved.split(" ")[1]
            rig.vmc.write_line(f"SUCCESS {ref}")
            assert rig.vmc.expect("ACK ", 10) == f"ACK {ref}"
        rig.signal(signal.SIGTERM)
        try:
            stopped = rig.wait_exit(30) == 0
        except subprocess.TimeoutExpired:
            stopped = False
        rows = rig.journal() if stopped else []
    finally:
        rig.close()
    assert approved is not None, (
        f"the scan after the refused thread was never answered (SIGTERM stopped it: {stopped})"
    )
    assert stopped, "SIGTERM did not stop the daemon: it waits for a sale that never ends"
    assert [r["state"] for r in rows] == ["vended", "vended"]
