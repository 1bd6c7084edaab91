"""`kiosk selftest`: a technician at the machine checks each part in turn and sees each step
reported — every light, the buzzer, one scan, one vend output pulse."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from kiosk.config import load_config
from kiosk.errors import PaymentCodeError
from kiosk.payment_code import PaymentCode
from kiosk.ports import KioskState, Sound, VendResult

STEP_S = 1.5


def run_selftest(
    config_path: Path,
    scan_timeout_s: float = 30.0,
    vend: bool = False,
    out: Callable[[str], None] = print,
    step_s: float = STEP_S,
) -> int:
    import drivers

    config = load_config(config_path)
    failures = 0

    def step(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += 0 if ok else 1
        out(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")

    pause = threading.Event()
    indicator = drivers.build_indicator(config)
    try:
        for state in (
            KioskState.READY,
            KioskState.PAYING,
            KioskState.DECLINED,
            KioskState.OUT_OF_SERVICE,
        ):
            indicator.show(state)
            step(f"lights: {state.value}", True, "look at the panel")
            pause.wait(step_s)
        for sound in (Sound.SCAN, Sound.ERROR):
            indicator.sound(sound)
            step(f"buzzer: {sound.value}", True, "listen")
            pause.wait(step_s)
        indicator.show(KioskState.READY)

        scanner = drivers.build_scanner(config)
        scans: queue.SimpleQueue[str] = queue.SimpleQueue()
        scanner.start(scans.put)
        out(f"scan any Alipay payment code within {scan_timeout_s:.0f} s (nothing is charged)...")
        try:
            text = scans.get(timeout=scan_timeout_s)
        except queue.Empty:
            step("scanner", False, "no scan arrived")
        else:
            try:
                code = PaymentCode.parse(text)
                step("scanner", True, f"read a payment code {code.masked}")
            except PaymentCodeError as exc:
                step("scanner", True, f"read {len(text)} characters, but {exc}")
        finally:
            scanner.close()

        output = drivers.build_vend_output(config)
        if config.vend.driver == "relay" or vend:
            ref = f"SELFTEST-{int(time.time())}"
            started = time.monotonic()
            result = output.dispense(
                ref, config.sale.price or Decimal("0.01"), config.vend.timeout_s
            )
            step(
                "vend output",
                result is VendResult.VENDED,
                f"{result.value} after {time.monotonic() - started:.1f} s",
            )
        else:
            step(
                "vend link",
                output.healthy(),
                f"{config.vend.driver} port open (use --vend to approve one test vend)",
            )
        output.close()
    finally:
        indicator.close()
    out(f"selftest: {'all good' if not failures else f'{failures} step(s) failed'}")
    return 0 if not failures else 1
