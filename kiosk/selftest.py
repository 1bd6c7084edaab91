"""`kiosk selftest`: a technician at the machine checks each part in turn and sees each step
reported — the gateway's DNS and TLS, the clock, a signed request Alipay accepts, every light,
the buzzer, one scan, one vend output pulse.

What the kiosk cannot see for itself (a light, the buzzer, a relay without a sense input) is
asked of the technician when a terminal is attached (`ask`); without one the step only says
where to look.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiosk.clock import clock_synchronised
from kiosk.config import Config, load_config
from kiosk.errors import KioskError, PaymentCodeError
from kiosk.payment_code import PaymentCode
from kiosk.ports import KioskState, Sound, VendResult

STEP_S = 1.5
MDB_CONFIGURE_S = 10.0  # the board confirms its three settings within a second or two
MDB_ENABLE_S = 5.0  # then the machine enables the reader on its next polls
NETWORK_TIMEOUT_S = 10.0

Step = Callable[..., None]  # step(name, ok, detail="", mark=None)
Ask = Callable[[str], bool]  # a yes/no question to the technician

# What a technician should see for each state the selftest shows (drivers/indicator_gpio.py).
LOOK_FOR = {
    KioskState.READY: "did the green light come on?",
    KioskState.PAYING: "is the amber light blinking?",
    KioskState.DECLINED: "did the red light come on?",
    KioskState.OUT_OF_SERVICE: "is the red light on steadily?",
}
LISTEN_FOR = {
    Sound.SCAN: "did the buzzer beep once?",
    Sound.ERROR: "did the buzzer sound the error pattern?",
}


def run_selftest(
    config_path: Path,
    scan_timeout_s: float = 30.0,
    vend: bool = False,
    out: Callable[[str], None] = print,
    step_s: float = STEP_S,
    ask: Ask | None = None,
    clock_synced: Callable[[], bool] = clock_synchronised,
) -> int:
    import drivers

    config = load_config(config_path)
    failures = 0

    def step(name: str, ok: bool, detail: str = "", mark: str | None = None) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        mark = mark or ("ok" if ok else "FAIL")
        out(f"[{mark}] {name}{': ' + detail if detail else ''}")

    # Built first, so a machine without GPIO or a hardware library says so at once.
    indicator = drivers.build_indicator(config)
    pause = threading.Event()
    try:
        # What needs nobody at the machine comes next: the technician sees a network or key
        # problem before walking to the panel.
        for gateway in (config.alipay.gateway, config.alipay.backup_gateway):
            if gateway:
                check_gateway(gateway, config.alipay.ca_bundle, step, config.alipay.pin_sha256)
        check_clock(config, clock_synced, step)
        check_signed_request(config, step)
        check_mdb_board(config, step)

        for state in (
            KioskState.READY,
            KioskState.PAYING,
            KioskState.DECLINED,
            KioskState.OUT_OF_SERVICE,
        ):
            indicator.show(state)
            if ask is None:
                step(f"lights: {state.value}", True, "look at the panel")
                pause.wait(step_s)
            else:
                seen = ask(LOOK_FOR[state])
                step(f"lights: {state.value}", seen, "seen" if seen else "not seen")
        for sound in (Sound.SCAN, Sound.ERROR):
            indicator.sound(sound)
            if ask is None:
                step(f"buzzer: {sound.value}", True, "listen")
                pause.wait(step_s)
            else:
                heard = ask(LISTEN_FOR[sound])
                step(f"buzzer: {sound.value}", heard, "heard" if heard else "not heard")
        indicator.show(KioskState.READY)

        scanner = drivers.build_scanner(config)
        scans: queue.SimpleQueue[str] = queue.SimpleQueue()
        scanner.start(scans.put)
        out(f"scan any Alipay payment code within {scan_timeout_s:g} s (nothing is charged)...")
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

        if config.vend.driver == "mdb":
            pass  # the MDB board was checked above; a vend needs the machine's own selection
        elif config.vend.driver == "relay" or vend:
            output = drivers.build_vend_output(config)
            ref = f"SELFTEST-{int(time.time())}"
            started = time.monotonic()
            result = output.dispense(
                ref, config.sale.price or Decimal("0.01"), config.vend.timeout_s
            )
            detail = f"{result.value} after {time.monotonic() - started:.1f} s"
            unseen = config.vend.driver == "relay" and config.vend.sense_pin is None
            if ask is not None and unseen and result is VendResult.VENDED:
                # Without a sense input "vended" only means the pulse went out.
                seen = ask("did the relay click (or the machine dispense)?")
                detail = f"pulse sent, {'seen' if seen else 'not seen'}"
                step("vend output", seen, detail)
            else:
                step("vend output", result is VendResult.VENDED, detail)
            output.close()
        else:
            output = drivers.build_vend_output(config)
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


# -- the steps that need nobody at the machine ----------------------------------------------


def check_gateway(gateway: str, ca_bundle: str, step: Step, pins: Collection[str] = ()) -> None:
    """DNS, then (https) a TLS handshake verified against the config's trust store, and the
    verified chain against the pinned keys when there are any."""
    from kiosk.alipay.pinning import chain_pins

    url = urlsplit(gateway)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        step(f"gateway DNS {host}", False, f"does not resolve ({_reason(exc)})")
        step(f"gateway TLS {host}", False, "skipped: no address", mark="skip")
        return
    addresses = sorted({str(info[4][0]) for info in infos})
    step(f"gateway DNS {host}", True, ", ".join(addresses))
    if url.scheme != "https":
        step(f"gateway TLS {host}", True, "plain http (alipay.allow_http): no TLS", mark="skip")
        return
    context = ssl.create_default_context(cafile=ca_bundle or None)
    try:
        with (
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            version = tls.version()
            seen = chain_pins(tls) if pins else []
    except ssl.SSLCertVerificationError as exc:
        step(f"gateway TLS {host}", False, f"certificate not trusted ({exc.verify_message})")
    except (OSError, ssl.SSLError) as exc:
        step(f"gateway TLS {host}", False, _reason(exc))
    else:
        if not pins:
            step(f"gateway TLS {host}", True, f"{version}, certificate verified")
        elif set(pins).isdisjoint(seen):
            chain = ", ".join(seen) or "no certificate"
            step(f"gateway TLS {host}", False, f"no pinned key; the chain has {chain} (leaf first)")
        else:
            step(f"gateway TLS {host}", True, f"{version}, certificate verified, pinned key found")


def check_clock(config: Config, clock_synced: Callable[[], bool], step: Step) -> None:
    if clock_synced():
        step("clock", True, "synchronised")
    elif config.kiosk.require_synced_clock:
        step("clock", False, "not synchronised: no payments until NTP or timesyncd sets it")
    else:
        step("clock", True, "not synchronised (kiosk.require_synced_clock = false)", mark="skip")


def check_signed_request(config: Config, step: Step) -> None:
    """A query for a reference that does not exist: a signed, verified `TRADE_NOT_EXIST`
    proves the partner, the keys and the sign type, and charges nobody."""
    from kiosk.alipay.client import AlipayClient
    from kiosk.daemon import gateway_settings

    ref = f"SELFTEST-{config.kiosk.terminal_id}-{int(time.time())}"
    try:
        with AlipayClient(gateway_settings(config)) as client:
            result = client.query(ref)
    except (KioskError, OSError) as exc:
        step("Alipay signed request", False, _reason(exc))
        return
    if result.verified:
        step("Alipay signed request", True, "accepted; the answer's signature verified")
    else:
        why = result.error or result.outcome.value
        step("Alipay signed request", False, f"not accepted: {why} ({result.detail})")


class _NoSales:
    """The selftest's listener: a customer who selects meanwhile is refused (C,STOP)."""

    def __init__(self) -> None:
        self.output: Any = None

    def on_vend_request(self, request: object) -> None:
        self.output.answer_vend("OUT_OF_SERVICE selftest")

    def on_vend_cancel(self) -> None:
        self.output.answer_vend("CANCELLED")

    def on_vend_problem(self, problem: str | None) -> None:
        pass


def check_mdb_board(
    config: Config,
    step: Step,
    configure_s: float = MDB_CONFIGURE_S,
    enable_s: float = MDB_ENABLE_S,
) -> None:
    """The MDB board, when the config names one: the driver configures it (reader off, address,
    currency, always idle, reader on), then the machine should enable the reader. Reports the
    board's problem if it has one, and the reader as the machine sees it."""
    if config.vend.driver != "mdb":
        return
    import drivers

    v = config.vend
    where = f"{v.port} at {v.baud} baud"
    try:
        output: Any = drivers.build_mdb_vend_output(config)
    except (KioskError, OSError, ValueError) as exc:
        step("MDB board", False, f"{where}: {_reason(exc)}")
        return
    listener = _NoSales()
    listener.output = output
    try:
        output.start(listener)
        deadline = time.monotonic() + configure_s
        configured, problem = False, None
        # Either the board confirms, or the driver names its problem (then it retries with
        # backoff, which the technician need not wait for).
        while problem is None and time.monotonic() < deadline:
            configured = output.wait_configured(min(0.2, max(0.0, deadline - time.monotonic())))
            problem = output.problem()
            if configured:
                break
        if not configured or problem is not None:
            why = problem or f"did not confirm its configuration within {configure_s:g} s"
            step("MDB board", False, f"{where}: {why}")
            step("MDB reader", False, "skipped: the board is not configured", mark="skip")
            return
        step("MDB board", True, f"configured on {where}, cashless #{v.mdb_address}")
        output.wait_reader_state("ENABLED", enable_s)
        state = output.reader_state()
        if state == "ENABLED":
            step("MDB reader", True, "the machine has enabled it (ENABLED)")
        else:
            step(
                "MDB reader",
                False,
                f"the machine shows it {state}: enable the cashless device (address "
                f"{v.mdb_address}, always idle) in its service menu",
            )
    finally:
        output.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def ask_in_terminal(question: str) -> bool:
    """Ask until the answer is y or n."""
    while True:
        try:
            answer = input(f"{question} [y/n] ").strip().lower()
        except EOFError:  # the terminal went away: nobody saw it
            return False
        if answer in ("y", "yes", "n", "no"):
            return answer.startswith("y")
