"""`kiosk run`: one loop that waits on the scanner, the vend link, timers and the journal worker,
and turns what happens into sales, lights and systemd notifications.

Drivers call back from their own threads; every callback only puts an event on one queue, so
all decisions are made here, in order, on the main thread. A sale runs on its own thread (it
blocks on the gateway and the vend output) and reports back through the same queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kiosk.alipay.client import AlipayClient, GatewaySettings, QueryResult
from kiosk.alipay.signing import (
    Md5Signature,
    RsaSignature,
    SignType,
    load_private_key,
    load_public_key,
    read_secret_file,
)
from kiosk.config import Config
from kiosk.errors import GatewayUnreachable, JournalError, KeyFileError, PaymentCodeError
from kiosk.journal import Journal
from kiosk.log import event
from kiosk.payment import FlowSettings, PaymentFlow, Sale, SaleResult
from kiosk.payment_code import PaymentCode, RecentCodes
from kiosk.ports import Indicator, KioskState, Scanner, Sound, VendOutput, VendRequest
from kiosk.systemd import Notifier
from kiosk.worker import JournalWorker

log = logging.getLogger("kiosk.daemon")

OFFLINE_PROBE_S = 30.0
# A Pi without an RTC boots in 1970 (or at the image's build date) until NTP syncs.
CLOCK_SANE_AFTER = datetime(2025, 1, 1, tzinfo=UTC)


def gateway_settings(config: Config) -> GatewaySettings:
    """The Alipay client's settings from the config, keys loaded (KeyFileError if unusable)."""
    a = config.alipay
    if a.sign_type is SignType.MD5:
        if a.md5_key_file is None:
            raise KeyFileError("sign_type MD5 needs alipay.md5_key_file")
        signature: Any = Md5Signature(read_secret_file(a.md5_key_file, "MD5 key file"))
    else:
        if a.private_key_file is None or a.alipay_public_key_file is None:
            raise KeyFileError(
                f"sign_type {a.sign_type} needs private_key_file and alipay_public_key_file"
            )
        private = load_private_key(
            read_secret_file(a.private_key_file, "private key file"), str(a.private_key_file)
        )
        try:
            public_pem = a.alipay_public_key_file.read_bytes()
        except OSError as exc:
            raise KeyFileError(
                f"Alipay public key {a.alipay_public_key_file}: {exc.strerror}"
            ) from None
        public = load_public_key(public_pem, str(a.alipay_public_key_file))
        signature = RsaSignature(a.sign_type, private_key=private, public_key=public)
    return GatewaySettings(
        gateway=a.gateway,
        partner=a.partner,
        seller_id=a.effective_seller_id,
        signature=signature,
        backup_gateway=a.backup_gateway,
        verify_tls=a.ca_bundle or True,
        pay_timeout_s=a.pay_timeout_s,
        read_timeout_s=max(a.pay_timeout_s, 5.0),
    )


def flow_settings(config: Config) -> FlowSettings:
    m = config.merchant
    extend = {
        "secondary_merchant_id": m.secondary_merchant_id,
        "secondary_merchant_name": m.secondary_merchant_name,
        "secondary_merchant_industry": m.secondary_merchant_industry,
        "store_id": m.store_id,
        "store_name": m.store_name,
        "terminal_id": config.kiosk.terminal_id,
    }
    return FlowSettings(
        terminal_id=config.kiosk.terminal_id,
        currency=config.alipay.currency,
        trans_name=config.alipay.trans_name,
        extend_info={k: v for k, v in extend.items() if v},
        query_interval_s=config.alipay.query_interval_s,
        query_deadline_s=config.alipay.query_deadline_s,
        vend_timeout_s=config.vend.timeout_s,
        retry_base_s=min(2.0, config.alipay.query_interval_s),
    )


@dataclass
class _Selection:
    """vmc mode: what the controller asked for, waiting for a scan."""

    request: VendRequest
    deadline: float


@dataclass
class KioskStatus:
    """What the loop knows; read by tests and the demo."""

    state: KioskState = KioskState.STARTING
    out_of_service: str | None = None
    offline: bool = False
    backlog: int = 0
    sales: list[Sale] = field(default_factory=list)


class Kiosk:
    """The daemon. `run()` returns the exit status once `stop()` was called (or SIGTERM)."""

    def __init__(
        self,
        config: Config,
        *,
        scanner: Scanner,
        indicator: Indicator,
        vend: VendOutput,
        journal: Journal,
        client_factory: Callable[[], AlipayClient] | None = None,
        notifier: Notifier | None = None,
        reload_config: Callable[[], Config] | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.scanner = scanner
        self.indicator = indicator
        self.vend = vend
        self.journal = journal
        self.notifier = notifier or Notifier()
        self._reload_config = reload_config
        self._wall = wall_clock
        self._client_factory = client_factory or (
            lambda: AlipayClient(gateway_settings(self.config))
        )
        self.status = KioskStatus()
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self.recent_codes = RecentCodes()
        self._sale_thread: threading.Thread | None = None
        self._sale_started = 0.0
        self._sale_vending = False
        self._declined_until: float | None = None
        self._selection: _Selection | None = None
        self._next_probe: float | None = None
        self._probing = False
        self._next_watchdog = 0.0
        self._shown: KioskState | None = None
        self.flow: PaymentFlow | None = None
        self.worker: JournalWorker | None = None

    # -- callbacks from drivers and threads (any thread; they only enqueue) ----------------

    def on_scan(self, text: str) -> None:
        self.events.put(("scan", text))

    def on_vend_request(self, request: VendRequest) -> None:
        self.events.put(("vend_request", request))

    def on_vend_cancel(self) -> None:
        self.events.put(("vend_cancel", None))

    def reachable(self) -> None:
        self.events.put(("gateway", "reachable"))

    def unreachable(self) -> None:
        self.events.put(("gateway", "unreachable"))

    def merchant_problem(self, code: str) -> None:
        self.events.put(("gateway", f"merchant:{code}"))

    def vending(self, ref: str) -> None:
        self.events.put(("vending", ref))

    def stop(self) -> None:
        """Stop taking scans and wind down (SIGTERM). Safe from a signal handler."""
        self.stopping.set()
        self.events.put(("stop", None))

    def reload(self) -> None:
        """Re-read the config (SIGHUP)."""
        self.events.put(("reload", None))

    # -- start and stop ---------------------------------------------------------------------

    def _build_flow(self) -> None:
        try:
            client: AlipayClient | None = self._client_factory()
            worker_client: AlipayClient | None = self._client_factory()
        except KeyFileError as exc:
            client = worker_client = None
            self._enter_out_of_service(f"key: {exc}")
        if client is None or worker_client is None:
            return
        settings = flow_settings(self.config)
        self.flow = PaymentFlow(
            client,
            self.journal,
            self.vend,
            settings,
            watch=self,
            stopping=self.stopping,
            wall_clock=self._wall,
        )
        # The worker has its own client (a requests.Session is not for two threads at once).
        worker_flow = PaymentFlow(
            worker_client,
            self.journal,
            self.vend,
            settings,
            watch=self,
            stopping=self.stopping,
            wall_clock=self._wall,
            in_hand=self.flow.in_hand,
        )
        if self.worker is not None:
            self.worker.stop(timeout=5)
        self.worker = JournalWorker(
            worker_flow,
            self.journal,
            on_backlog=lambda n: self.events.put(("backlog", n)),
            on_journal_error=lambda e: self.events.put(("journal_error", str(e))),
        )
        self.worker.start()

    def run(self) -> int:
        self._show(KioskState.STARTING)
        if self._wall() < CLOCK_SANE_AFTER:
            self._enter_out_of_service("clock not set")
        self._build_flow()
        self.scanner.start(self.on_scan)
        self.vend.start(self)
        self.notifier.ready(self._status_text())
        self.ready.set()
        event(
            log,
            "kiosk.ready",
            terminal_id=self.config.kiosk.terminal_id,
            mode=self.config.sale.mode,
            out_of_service=self.status.out_of_service,
        )
        self._refresh_lights()
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        while True:
            timeout = self._tick()
            try:
                kind, payload = self.events.get(timeout=timeout)
            except queue.Empty:
                continue
            if kind == "stop":
                if self._sale_thread is None or not self._sale_thread.is_alive():
                    return
                continue  # the sale finishes (or parks) and reports "sale_done"
            self._handle(kind, payload)
            if self.stopping.is_set() and (
                self._sale_thread is None or not self._sale_thread.is_alive()
            ):
                return

    def _shutdown(self) -> None:
        self.notifier.stopping()
        event(log, "kiosk.stopping")
        self.scanner.close()
        if self._sale_thread is not None:
            self._sale_thread.join()
        if self.worker is not None:
            self.worker.stop(timeout=self.config.vend.timeout_s + 30)
        for client in (
            self.flow.client if self.flow else None,
            self.worker.flow.client if self.worker else None,
        ):
            if client is not None:
                client.close()
        self.vend.close()
        self.indicator.close()
        try:
            self.journal.checkpoint()
        except JournalError as exc:
            event(log, "journal.error", level=logging.ERROR, error=str(exc))
        self.stopped.set()
        event(log, "kiosk.stopped")

    # -- the loop's work ----------------------------------------------------------------------

    def _tick(self) -> float:
        """Run what is due (timers, watchdog) and return how long the loop may wait."""
        now = time.monotonic()
        waits = [60.0]
        if self._declined_until is not None:
            if now >= self._declined_until:
                self._declined_until = None
                self._refresh_lights()
            else:
                waits.append(self._declined_until - now)
        if self._selection is not None:
            if now >= self._selection.deadline and not self._sale_busy():
                self._selection = None
                self.vend.answer_vend("TIMEOUT")
                event(log, "vend.scan_timeout")
            elif now < self._selection.deadline:
                waits.append(self._selection.deadline - now)
        if self._next_probe is not None:
            if now >= self._next_probe:
                self._probe()
            else:
                waits.append(self._next_probe - now)
        interval = self.notifier.watchdog_interval_s
        if interval is not None:
            if now >= self._next_watchdog:
                if self._healthy(now):
                    self.notifier.watchdog()
                self._next_watchdog = now + interval
            waits.append(max(self._next_watchdog - now, 0.01))
        return max(min(waits), 0.0)

    def _healthy(self, now: float) -> bool:
        """Every part shows progress; otherwise let systemd's watchdog restart the kiosk."""
        a, v = self.config.alipay, self.config.vend
        request_s = 3.0 + max(a.pay_timeout_s, 5.0)
        if self.worker is not None:
            allowance = self.worker.idle_s + v.timeout_s + 6 * request_s + 30
            if not self.worker.alive() or now - self.worker.last_beat > allowance:
                event(log, "watchdog.withheld", part="journal worker")
                return False
        if self._sale_busy():
            allowance = request_s + a.query_deadline_s + v.timeout_s + 6 * request_s + 30
            if now - self._sale_started > allowance:
                event(log, "watchdog.withheld", part="sale")
                return False
        if not self.scanner.healthy() or not self.vend.healthy():
            event(
                log,
                "watchdog.withheld",
                part="scanner" if not self.scanner.healthy() else "vend output",
            )
            return False
        return True

    def _handle(self, kind: str, payload: Any) -> None:
        match kind:
            case "scan":
                self._handle_scan(payload)
            case "vend_request":
                self._handle_vend_request(payload)
            case "vend_cancel":
                self._handle_vend_cancel()
            case "vending":
                self._sale_vending = True
                self._refresh_lights()
            case "sale_done":
                self._handle_sale_done(payload)
            case "gateway":
                self._handle_gateway(payload)
            case "backlog":
                self.status.backlog = payload
                self._refresh_lights()
            case "journal_error":
                self._enter_out_of_service(f"journal: {payload}")
            case "reload":
                self._handle_reload()
            case "probe":
                self._handle_probe(payload)

    def _sale_busy(self) -> bool:
        return self._sale_thread is not None and self._sale_thread.is_alive()

    def _handle_scan(self, text: str) -> None:
        if self.stopping.is_set():
            return
        try:
            code = PaymentCode.parse(text)
        except PaymentCodeError as exc:
            self.indicator.sound(Sound.ERROR)
            event(log, "scan.rejected", reason=str(exc))
            return
        if self._sale_busy() or self._declined_until is not None:
            # Never queued: codes are single-use and go stale.
            self.indicator.sound(Sound.ERROR)
            event(log, "scan.ignored", reason="busy", code=code.masked)
            return
        if self.status.out_of_service is not None or self.flow is None:
            self.indicator.sound(Sound.ERROR)
            event(log, "scan.ignored", reason="out of service", code=code.masked)
            return
        if self.config.sale.mode == "vmc":
            if self._selection is None:
                self.indicator.sound(Sound.ERROR)
                event(log, "scan.ignored", reason="no selection on the machine", code=code.masked)
                return
            amount, item = self._selection.request.amount, self._selection.request.item
        else:
            assert self.config.sale.price is not None
            amount, item = self.config.sale.price, self.config.sale.item
        if self.recent_codes.seen_recently(code):
            event(log, "scan.refused", reason="CODE_REUSED", code=code.masked)
            self.vend.deny("CODE_REUSED")
            self._hold_declined()
            return
        self._selection = None
        self.indicator.sound(Sound.SCAN)
        self._start_sale(code, amount, item)

    def _start_sale(self, code: PaymentCode, amount: Decimal, item: str) -> None:
        flow = self.flow
        assert flow is not None

        def sell() -> None:
            try:
                sale = flow.sell(code, amount, item)
            except JournalError as exc:
                self.events.put(("journal_error", str(exc)))
                sale = None
            except Exception:
                log.exception("sale failed")
                sale = None
            self.events.put(("sale_done", sale))

        self._sale_started = time.monotonic()
        self._sale_vending = False
        self._sale_thread = threading.Thread(target=sell, name="sale", daemon=True)
        self._sale_thread.start()
        self._refresh_lights()

    def _handle_sale_done(self, sale: Sale | None) -> None:
        if self._sale_thread is not None:
            self._sale_thread.join()
        self._sale_vending = False
        if sale is None:
            # The sale could not be journaled (or a bug stopped it): nothing was charged
            # that the journal does not know of; the controller hears a refusal.
            self.vend.deny("OUT_OF_SERVICE" if self.status.out_of_service else "ERROR")
            if self.status.out_of_service is None:
                self._hold_declined()
            self._refresh_lights()
            return
        self.status.sales.append(sale)
        match sale.result:
            case SaleResult.VENDED:
                pass
            case SaleResult.DECLINED | SaleResult.UNRESOLVED:
                self.vend.deny(sale.reason or "DECLINED")
                self._hold_declined()
            case SaleResult.REVERSED:
                self._hold_declined()
            case SaleResult.OUT_OF_SERVICE:
                self.vend.deny(sale.reason)
                self._enter_out_of_service(f"Alipay refused the merchant set-up ({sale.reason})")
            case SaleResult.STOPPED:
                pass
        if sale.result is not SaleResult.VENDED and self.worker is not None:
            self.worker.wake()
        self._refresh_lights()

    def _handle_vend_request(self, request: VendRequest) -> None:
        if self.stopping.is_set():
            self.vend.answer_vend("OUT_OF_SERVICE stopping")
        elif self.status.out_of_service is not None or self.flow is None:
            self.vend.answer_vend("OUT_OF_SERVICE " + _token(self.status.out_of_service))
        elif self._sale_busy():
            self.vend.answer_vend("BUSY")
        else:
            deadline = time.monotonic() + self.config.sale.scan_timeout_s
            self._selection = _Selection(request, deadline)
            self.vend.answer_vend("OK")
            event(log, "vend.selection", item=request.item, amount=str(request.amount))

    def _handle_vend_cancel(self) -> None:
        if self._sale_busy():
            self.vend.answer_vend("BUSY")  # too late: the payment is in flight
            return
        self._selection = None
        self.vend.answer_vend("CANCELLED")

    def _handle_gateway(self, what: str) -> None:
        if what == "reachable":
            if self.status.offline:
                self.status.offline = False
                self._next_probe = None
                event(log, "gateway.online")
                if self.worker is not None:
                    # Everything waiting is due now; no journal writes on the loop's thread.
                    self.worker.wake(resume_all=True)
        elif what == "unreachable":
            if not self.status.offline:
                self.status.offline = True
                event(log, "gateway.offline")
            if self._next_probe is None:
                self._next_probe = time.monotonic() + min(
                    OFFLINE_PROBE_S, self.config.alipay.probe_interval_s
                )
        elif what.startswith("merchant:"):
            self._enter_out_of_service(f"Alipay refused the merchant set-up ({what[9:]})")
        self._refresh_lights()

    def _handle_reload(self) -> None:
        if self._reload_config is None:
            return
        try:
            config = self._reload_config()
        except Exception as exc:
            event(log, "config.reload_failed", level=logging.ERROR, error=str(exc))
            return
        self.config = config
        self.status.out_of_service = None
        self._next_probe = None
        if self._sale_busy():
            # The sale in flight keeps its flow; the new one takes the next scan.
            event(log, "config.reload_deferred")
        self._build_flow()
        event(log, "config.reloaded")
        self._refresh_lights()

    def _enter_out_of_service(self, reason: str) -> None:
        first = self.status.out_of_service is None
        self.status.out_of_service = reason
        if first:
            event(log, "kiosk.out_of_service", level=logging.ERROR, reason=reason)
            self.notifier.status(f"out of service: {reason}")
        self._next_probe = time.monotonic() + self.config.alipay.probe_interval_s
        self._refresh_lights()

    def _probe(self) -> None:
        """Out of service or offline: is a signed request accepted again? Asked on a thread
        of its own with a client of its own, so the loop never waits on the network."""
        self._next_probe = None
        if self.worker is None:  # the keys were unusable: try building the flow again
            try:
                self._build_flow()
            finally:
                self._next_probe = time.monotonic() + self.config.alipay.probe_interval_s
            return
        if not self._probing:
            self._probing = True
            threading.Thread(target=self._ask_gateway, name="probe", daemon=True).start()

    def _ask_gateway(self) -> None:
        result: QueryResult | None = None
        try:
            client = self._client_factory()
            try:
                result = client.query(f"{self.config.kiosk.terminal_id}-probe")
            finally:
                client.close()
        except (GatewayUnreachable, KeyFileError):
            result = None
        self.events.put(("probe", result))

    def _handle_probe(self, result: QueryResult | None) -> None:
        self._probing = False
        if result is None:
            self._handle_gateway("unreachable")  # schedules the next probe
            return
        # A signed answer (even "no such trade") proves the key and partner are accepted.
        accepted = result.error == "TRADE_NOT_EXIST" or result.outcome.value == "success"
        event(log, "gateway.probe", accepted=accepted, error=result.error, detail=result.detail)
        self._handle_gateway("reachable")
        if (
            accepted
            and self.status.out_of_service
            and self._wall() >= CLOCK_SANE_AFTER
            and not self.status.out_of_service.startswith("journal")
        ):
            self.status.out_of_service = None
            event(log, "kiosk.back_in_service")
            self._refresh_lights()
        elif self.status.out_of_service:
            self._next_probe = time.monotonic() + self.config.alipay.probe_interval_s

    # -- lights -----------------------------------------------------------------------------

    def _hold_declined(self) -> None:
        self._declined_until = time.monotonic() + self.config.indicators.declined_hold_s
        self._refresh_lights()

    def _refresh_lights(self) -> None:
        if self.status.out_of_service is not None:
            state = KioskState.OUT_OF_SERVICE
        elif self._sale_busy():
            state = KioskState.VENDING if self._sale_vending else KioskState.PAYING
        elif self._declined_until is not None:
            state = KioskState.DECLINED
        elif self.status.offline:
            state = KioskState.OFFLINE
        else:
            state = KioskState.READY
        self._show(state)

    def _show(self, state: KioskState) -> None:
        if state is self._shown:
            return
        self._shown = state
        self.status.state = state
        event(log, "indicator", state=state.value)
        self.indicator.show(state)

    def _status_text(self) -> str:
        if self.status.out_of_service:
            return f"out of service: {self.status.out_of_service}"
        return "ready"


def _token(text: str | None) -> str:
    """One protocol field: no spaces."""
    return (text or "unknown").split(":")[0].replace(" ", "-")[:40]
