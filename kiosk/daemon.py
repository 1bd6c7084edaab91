"""`kiosk run`: one loop that waits on the scanner, the vend link, timers and the journal worker,
and turns what happens into sales, lights and systemd notifications.

Drivers call back from their own threads; every callback only puts an event on one queue, so
all decisions are made here, in order, on the main thread. A sale runs on the sale thread (it
blocks on the gateway and the vend output), started once and waiting between sales, and
reports back through the same queue.

What lives for the whole process, created once: the journal, the drivers, the refs in hand
and the journal worker. A reloaded config (SIGHUP) replaces only what it configures: the
Alipay clients and the flows' settings, between sales, never under one.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from kiosk.alarms import AlarmBoard
from kiosk.alipay.client import AlipayClient, GatewaySettings, QueryResult
from kiosk.alipay.signing import (
    Md5Signature,
    RsaSignature,
    SignType,
    load_private_key,
    load_public_key,
    read_secret_file,
)
from kiosk.clock import clock_synchronised
from kiosk.config import Config, payment_budget_s
from kiosk.errors import (
    GatewayUnreachable,
    JournalCorrupt,
    JournalError,
    KeyFileError,
    PaymentCodeError,
)
from kiosk.figures import FiguresReader
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.log import event
from kiosk.money import format_amount
from kiosk.payment import FlowSettings, PaymentFlow, RefsInHand, Sale, SaleResult
from kiosk.payment_code import PaymentCode, RecentCodes
from kiosk.ports import (
    Indicator,
    KioskState,
    Scanner,
    Sound,
    VendOutput,
    VendRequest,
    cancel_abandons_payment,
    link_up,
    set_available,
    vend_problem,
    vend_running,
)
from kiosk.systemd import Notifier
from kiosk.worker import JournalWorker

if TYPE_CHECKING:
    from kiosk.telemetry import TelemetrySink

log = logging.getLogger("kiosk.daemon")

OFFLINE_PROBE_S = 30.0  # offline: how often to try the gateway (at most; probe_interval_s caps)
WRITE_CHECK_S = 30.0  # a journal write fault: how often to try a durable write (at most)
CLOCK_RECHECK_OUT_S = 10.0  # out of service for the clock: how often to look again
CLOCK_RECHECK_S = 60.0  # otherwise
SWITCH_RETRY_S = 1.0  # a light or reader switch the driver refused: how often to ask again
# The parts of `Kiosk._switch` a refresh asks again (a beep, a start or a stop happens once).
SWITCHES_RETRIED = frozenset({"reader", "lights", "status", "systemd", "telemetry"})
# A Pi without an RTC boots in 1970 (or at the image's build date) until NTP syncs.
CLOCK_SANE_AFTER = datetime(2025, 1, 1, tzinfo=UTC)
SALES_KEPT = 100  # KioskStatus.sales: the most recent ones only
# The loop survives a failing handler; this many failures in a row of one kind of event within
# the window mean it can no longer do its job, and the systemd watchdog is withheld.
LOOP_FAILURES_LIMIT = 5
LOOP_FAILURES_WINDOW_S = 60.0

# Why the kiosk is out of service, by kind. Each kind is entered and left on its own terms;
# the first present in this order is the one shown.
JOURNAL = "journal"  # a write fault (re-checked by a durable write) or a corrupt journal (stays)
KEY = "key"  # unusable key files (re-checked by building the clients)
CLOCK = "clock"  # clock not set, or not synchronised (re-checked periodically)
MERCHANT = "merchant"  # Alipay refused the merchant set-up (re-checked by a probe)
REASON_ORDER = (JOURNAL, KEY, CLOCK, MERCHANT)

# Alarms (kiosk/alarms.py) the loop looks for itself, and how often.
ALARM_CHECK_S = 30.0
OFFLINE_ALARM_S = 300.0  # offline this long: an alarm (SPEC section 8)
LINK_ALARM_S = 30.0  # a scanner or vend link down this long: an alarm (a replug is quicker)
DISK_NEARLY_FULL = (0.05, 64 << 20)  # free below 5 % or below 64 MiB: nearly full
DISK_CLEAR_FACTOR = 1.25  # ... until free is back above this much more (no flapping)

# Keys a reload cannot apply: the journal and the drivers are opened once per process.
RELOADABLE_DRIVER_KEYS = {"indicators": ("declined_hold_s",), "vend": ("timeout_s",)}


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
        pin_sha256=a.pin_sha256,
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
        retry_max_s=config.alipay.retry_max_s,
        keep_days=config.journal.keep_days,
    )


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that differ between two configs and take effect only after a restart."""
    changed = []
    if old.kiosk.state_dir != new.kiosk.state_dir:
        changed.append("kiosk.state_dir")
    # The serial vend link formats and parses amounts in the currency it was opened with.
    if old.alipay.currency != new.alipay.currency:
        changed.append("alipay.currency")
    if old.telemetry != new.telemetry:
        changed.append("telemetry")  # the sink and its connection live for the process
    for section in ("scanner", "indicators", "vend"):
        before, after = getattr(old, section), getattr(new, section)
        for f in fields(before):
            if f.name in RELOADABLE_DRIVER_KEYS.get(section, ()):
                continue
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{section}.{f.name}")
    return changed


def keep_running_values(old: Config, new: Config) -> Config:
    """The new config with the restart-only keys (state_dir, drivers) as they run now."""
    drivers = {
        section: replace(
            getattr(old, section),
            **{
                key: getattr(getattr(new, section), key)
                for key in RELOADABLE_DRIVER_KEYS.get(section, ())
            },
        )
        for section in ("scanner", "indicators", "vend")
    }
    return replace(
        new,
        kiosk=replace(new.kiosk, state_dir=old.kiosk.state_dir),
        telemetry=old.telemetry,
        **drivers,
    )


def approve_within_s(config: Config) -> float | None:
    """How long after its VEND request the controller still takes an approval: MDB only
    (`vend.approve_within_s`); None for links that wait as long as the kiosk says."""
    if config.vend.driver != "mdb":
        return None
    return config.vend.approve_within_s


@dataclass
class _Selection:
    """vmc mode: what the controller asked for, waiting for a scan."""

    request: VendRequest
    deadline: float  # no scan after this: TIMEOUT
    approve_by: float | None = None  # MDB: no approval after this (monotonic)


def _recent_sales() -> deque[Sale]:
    return deque(maxlen=SALES_KEPT)


@dataclass
class KioskStatus:
    """What the loop knows; read by tests and the demo."""

    state: KioskState = KioskState.STARTING
    out_of_service: str | None = None  # the reason shown (the first of `reasons`)
    reasons: dict[str, str] = field(default_factory=dict)  # kind -> reason, every one present
    offline: bool = False
    # The vend output's own reason it cannot take payments (an MDB board that refused its
    # configuration or stopped answering): out of service while set, cleared by the driver.
    vend_problem: str | None = None
    backlog: int = 0
    sales: deque[Sale] = field(default_factory=_recent_sales)  # the last SALES_KEPT
    sales_total: int = 0  # every sale since start


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
        clock_synced: Callable[[], bool] = clock_synchronised,
    ) -> None:
        """`client_factory` builds an Alipay client from the running config (`self.config`);
        `clock_synced` says whether the system clock is synchronised (SPEC: no sales on a
        clock nobody set), asked only while `kiosk.require_synced_clock` is true."""
        self.config = config
        self.scanner = scanner
        self.indicator = indicator
        self.vend = vend
        self.journal = journal
        self.notifier = notifier or Notifier()
        self._reload_config = reload_config
        self._wall = wall_clock
        self._clock_synced = clock_synced
        self._client_factory = client_factory or (
            lambda: AlipayClient(gateway_settings(self.config))
        )
        self.status = KioskStatus()
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # Failures of requests told to the loop, and heard by it (see `reachable`).
        self._gateway_news = threading.Lock()
        self._failures_told = 0
        self._failures_heard = 0
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.ready = threading.Event()
        # Rule 7 across a restart: the journal keeps the key and the hashes of codes sold.
        self.recent_codes = RecentCodes(key=journal.code_key or None)
        self._seed_recent_codes()
        self.clock_recheck_out_s = CLOCK_RECHECK_OUT_S
        self.clock_recheck_s = CLOCK_RECHECK_S
        # Created once, for the whole process: every flow shares these refs in hand, and the
        # one worker takes each new flow through `use()`.
        self.in_hand = RefsInHand()
        self.worker = JournalWorker(
            None,
            journal,
            on_backlog=lambda n: self.events.put(("backlog", n)),
            on_journal_error=lambda e: self.events.put(("journal_error", e)),
            on_retry_ceiling=self._retry_ceiling,
        )
        # Alarms and telemetry (SPEC section 8), for the whole process: one board that the
        # loop, the worker and the journal's changes feed; one sink that reports the kiosk,
        # only with a [telemetry] section. Feeding the sink never blocks.
        self.alarms = AlarmBoard(wall_clock)
        self.figures = FiguresReader(journal.path.parent)
        self.telemetry: TelemetrySink | None = None
        if config.telemetry is not None:
            # Loaded only here: a kiosk without a [telemetry] section never loads the sink,
            # Home Assistant's discovery or the Prometheus writer (a [telemetry] section added
            # later needs a restart anyway).
            from kiosk.telemetry import TelemetrySink

            self.telemetry = TelemetrySink(config, self.figures, self.alarms, wall_clock=wall_clock)
            self.alarms.listen(self.telemetry.alarm)
        journal.watch(self._journal_changed)
        self.alarm_check_s = ALARM_CHECK_S
        self.offline_alarm_s = OFFLINE_ALARM_S
        self.link_alarm_s = LINK_ALARM_S
        self._next_alarm_check: float | None = None  # the first check runs at start
        self._offline_since: float | None = None  # monotonic
        self._link_down_since: dict[str, float] = {}
        self._status_sent: str | None = None  # STATUS= as systemd has it
        self._reported: tuple[KioskState, str | None] | None = None
        self._state_since = wall_clock()
        self.flow: PaymentFlow | None = None  # the foreground's; None until keys are usable
        self._sales = _SaleThread()
        self._sale_in_hand = False  # from the scan until its "sale_done" is handled
        self._sale_started = 0.0
        self._sale_vending = False
        # Set when the controller dropped the request a sale is paying for (MDB), or its
        # approve_within_s passed: the flow then vends nothing and reverses.
        self._sale_abandoned: threading.Event | None = None
        self._sale_approve_by: float | None = None
        self._reader_available: bool | None = None  # what the vend output was last told
        self._declined_until: float | None = None
        self._selection: _Selection | None = None
        self._pending_config: Config | None = None  # a reload waiting for the sale to end
        self._generation = 0  # counts applied configs; a probe answers for the one it asked with
        self._next_probe: float | None = None
        self._probing = False
        self._next_key_retry: float | None = None
        self._next_write_check: float | None = None
        self._checking_writable = False
        self._journal_corrupt = False
        self._next_clock_check: float | None = None  # set by the first check, in run()
        self._next_watchdog = 0.0
        self._failures: dict[str, deque[float]] = {}  # event kind -> failures in a row
        self._said = False  # the current handler already answered the controller
        self._shown: KioskState | None = None
        self._state_logged: KioskState | None = None
        # Parts whose driver refused the last call (`_switch`); those in SWITCHES_RETRIED are
        # asked again at each refresh and each tick until they take it.
        self._switches_failing: set[str] = set()

    # -- callbacks from drivers and threads (any thread; they only enqueue) ----------------

    def _seed_recent_codes(self) -> None:
        """The codes sold in the window before this start, aged by the journal's boot clock
        (those of this boot) or the wall clock (the others; all of them without a boot clock,
        which is said once)."""
        now = self._wall().timestamp()
        boot = self.journal.boot_stamp()
        if boot is None:
            event(
                log,
                "kiosk.no_boot_clock",
                level=logging.WARNING,
                reason=self.journal.boot_clock_unavailable,
                effect="a code's age across a restart follows the wall clock alone",
            )
        try:
            seen = self.journal.recent_codes(
                since=now - self.recent_codes.window_s,
                boot_id=None if boot is None else boot.boot_id,
            )
        except JournalError as exc:
            event(log, "journal.error", level=logging.ERROR, error=str(exc))
            return
        self.recent_codes.seed(seen, now, boot)

    def on_scan(self, text: str) -> None:
        self.events.put(("scan", text))

    def on_vend_request(self, request: VendRequest) -> None:
        self.events.put(("vend_request", request))

    def on_vend_cancel(self) -> None:
        self.events.put(("vend_cancel", None))

    def on_vend_problem(self, problem: str | None) -> None:
        self.events.put(("vend_problem", problem))

    def reachable(self) -> None:
        # Every answered request says so, the pay's on its way to the VENDING commit too. The
        # loop is woken only when the news can change something: it is offline, or a failure
        # told before this answer is still on its way to it (the news keeps its order).
        with self._gateway_news:
            if not self.status.offline and self._failures_told == self._failures_heard:
                return
            self.events.put(("gateway", "reachable"))

    def unreachable(self) -> None:
        self._tell_failure(("gateway", "unreachable"))

    def _tell_failure(self, news: tuple[str, Any]) -> None:
        """Post news of a request that found no gateway, counted (see `reachable`)."""
        with self._gateway_news:
            self._failures_told += 1
            self.events.put(news)

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

    def _build_flows(self) -> bool:
        """Clients and flows for the running config: one for the foreground, one handed to the
        worker (a requests.Session is not for two threads), both sharing the one set of refs
        in hand. Only between sales. False, and out of service, when no client can be built."""
        try:
            client = self._client_factory()
            try:
                worker_client = self._client_factory()
            except BaseException:
                client.close()
                raise
        except KeyFileError as exc:
            self._set_reason(KEY, f"key: {exc}")
            return False
        except Exception as exc:  # a client that cannot be built is the same trouble
            log.exception("building the Alipay client failed")
            self._set_reason(KEY, f"key: cannot build the Alipay client ({exc})")
            return False
        settings = flow_settings(self.config)
        old, self.flow = self.flow, self._flow(client, settings)
        self.worker.use(self._flow(worker_client, settings))
        if old is not None:
            old.client.close()
        self._clear_reason(KEY)
        return True

    def _flow(self, client: AlipayClient, settings: FlowSettings) -> PaymentFlow:
        return PaymentFlow(
            client,
            self.journal,
            self.vend,
            settings,
            watch=self,
            stopping=self.stopping,
            wall_clock=self._wall,
            in_hand=self.in_hand,
        )

    def run(self) -> int:
        if self.telemetry is not None:
            self.telemetry.start()
        self._next_alarm_check = time.monotonic()
        self._switch("lights", functools.partial(self._show, KioskState.STARTING))
        self._check_clock()
        self._build_flows()
        self.worker.start()
        self._sales.start()
        self.scanner.start(self.on_scan)
        # A kiosk that starts out of service keeps the reader off from the first moment.
        self._switch("reader", self._update_reader)
        self.vend.start(self)
        self.status.vend_problem = vend_problem(self.vend)
        self._status_sent = self._status_text()
        self._switch("systemd", functools.partial(self.notifier.ready, self._status_sent))
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
            waits: list[float] = []
            self._guarded("tick", None, functools.partial(self._tick_into, waits))
            timeout = waits[0] if waits else 1.0  # a failed tick: look again soon, not busily
            try:
                kind, payload = self.events.get(timeout=timeout)
            except queue.Empty:
                continue
            if kind == "stop":
                if not self._sale_busy():
                    return
                # The machine sells for cash while the sale winds down.
                self._switch("reader", self._update_reader)
                continue  # the sale finishes (or parks) and reports "sale_done"
            self._guarded(kind, payload, functools.partial(self._handle, kind, payload))
            if self.stopping.is_set() and not self._sale_busy():
                return

    def _shutdown(self) -> None:
        # A device that fails as it closes must not keep the journal from its last checkpoint.
        self._switch("systemd", self.notifier.stopping)
        event(log, "kiosk.stopping")
        self._switch("scanner", self.scanner.close)
        self._sales.stop()  # after the sale in hand, if any, has ended
        # The worker closes its own flow's client once it has stopped.
        self.worker.stop(timeout=self.config.vend.timeout_s + 30)
        if self.flow is not None:
            self.flow.client.close()
        self._switch("vend", self.vend.close)
        self._switch("lights", self.indicator.close)
        try:
            self.journal.forget_codes()  # past their window: not left on disk (rule 6)
            self.journal.checkpoint()
        except JournalError as exc:
            event(log, "journal.error", level=logging.ERROR, error=str(exc))
        if self.telemetry is not None:
            self.telemetry.stop()  # the last state, then "offline": a clean stop
        self.figures.close()
        self.stopped.set()
        event(log, "kiosk.stopped")

    # -- surviving a failing handler --------------------------------------------------------

    def _guarded(self, kind: str, payload: Any, action: Callable[[], object]) -> bool:
        """Run one handler. An exception in it must not end the loop (under systemd that is a
        crash loop, and every other part stops with it): log it with its traceback, raise an
        alarm, leave the kiosk in a safe state, and go on."""
        self._said = False
        try:
            action()
        except Exception as exc:
            self._loop_error(kind, payload, exc)
            return False
        self._failures.pop(kind, None)
        return True

    def _loop_error(self, kind: str, payload: Any, exc: Exception) -> None:
        failures = self._failures.setdefault(kind, deque(maxlen=LOOP_FAILURES_LIMIT))
        failures.append(time.monotonic())
        event(
            log,
            "alarm",
            level=logging.ERROR,
            kind="loop_error",
            handler=kind,
            error=f"{type(exc).__name__}: {exc}",
            in_a_row=len(failures),
            traceback="".join(traceback.format_exception(exc)).rstrip(),
        )
        self._make_safe(kind, payload)

    def _make_safe(self, kind: str, payload: Any) -> None:
        """After a failed handler: no half-answered controller, no sale left hanging, lights
        that say what is true. Every step on its own; one failing does not stop the next."""
        steps: list[Callable[[], None]] = []
        if kind == "sale_done":
            sale = payload if isinstance(payload, Sale) else None
            answered = sale is not None and sale.result in (
                SaleResult.VENDED,
                SaleResult.REVERSED,
                SaleResult.STOPPED,
            )
            steps.append(self._forget_finished_sale)
            if not answered and not self._said:
                steps.append(lambda: self._deny("ERROR"))
            # A reload that waited for this sale first, then the worker (see _handle_sale_done).
            steps += [self._hold_declined, self._apply_pending_config, self.worker.wake]
        elif kind == "vend_request":
            steps.append(self._clear_selection)
            if not self._said:
                steps.append(lambda: self._answer_vend("OUT_OF_SERVICE ERROR"))
        elif kind == "vend_cancel":
            steps.append(self._clear_selection)
            if cancel_abandons_payment(self.vend):
                steps.append(self._abandon_sale)  # MDB: the request is gone either way
            if not self._said:
                steps.append(lambda: self._answer_vend("CANCELLED"))
        elif kind == "probe":
            steps.append(self._probe_done)
        elif kind == "writable":
            steps.append(self._write_check_done)
        elif kind == "journal_error":
            steps.append(lambda: self._set_reason(JOURNAL, f"journal: {payload}"))
        steps += [self._schedule_checks, self._refresh_lights]
        for step in steps:
            try:
                step()
            except Exception as exc:
                event(
                    log,
                    "loop.safe_state_failed",
                    level=logging.ERROR,
                    handler=kind,
                    error=f"{type(exc).__name__}: {exc}",
                )

    def _loop_broken(self) -> str | None:
        """The kind of event whose handler failed LOOP_FAILURES_LIMIT times in a row within
        LOOP_FAILURES_WINDOW_S, if any: then the loop can no longer do its job."""
        for kind, failures in self._failures.items():
            if (
                len(failures) == LOOP_FAILURES_LIMIT
                and failures[-1] - failures[0] <= LOOP_FAILURES_WINDOW_S
            ):
                return kind
        return None

    # -- the loop's work ----------------------------------------------------------------------

    def _tick_into(self, waits: list[float]) -> None:
        waits.append(self._tick())

    def _tick(self) -> float:
        """Run what is due (timers, watchdog) and return how long the loop may wait. Each
        timer runs guarded: one failing does not stop the others or the watchdog."""
        now = time.monotonic()
        waits = [60.0]
        if self._switches_failing & SWITCHES_RETRIED:  # a light or the reader owes a switch
            self._refresh_lights()
            waits.append(SWITCH_RETRY_S)
        if self._declined_until is not None:
            if now >= self._declined_until:
                self._declined_until = None
                self._guarded("timer.declined", None, self._refresh_lights)
            else:
                waits.append(self._declined_until - now)
        if self._sale_approve_by is not None and self._sale_busy():
            if now >= self._sale_approve_by:
                self._sale_approve_by = None
                self._guarded("timer.approval", None, self._approval_too_late)
            else:
                waits.append(self._sale_approve_by - now)
        if self._selection is not None:
            if now >= self._selection.deadline and not self._sale_busy():
                self._guarded("timer.selection", None, self._selection_timed_out)
            elif now < self._selection.deadline:
                waits.append(self._selection.deadline - now)
        timers: list[tuple[str, str, Callable[[], None]]] = [
            ("timer.probe", "_next_probe", self._probe),
            ("timer.keys", "_next_key_retry", self._retry_keys),
            ("timer.journal", "_next_write_check", self._check_writable),
            ("timer.clock", "_next_clock_check", self._check_clock),
            ("timer.alarms", "_next_alarm_check", self._check_alarms),
        ]
        for name, attr, action in timers:
            due: float | None = getattr(self, attr)
            if due is None:
                continue
            if now >= due:
                setattr(self, attr, None)  # the action schedules the next one if needed
                self._guarded(name, None, action)
                if name == "timer.clock" and self._next_clock_check is None:
                    self._next_clock_check = now + self.clock_recheck_s  # it failed: later
                again: float | None = getattr(self, attr)
                if again is not None:
                    waits.append(again - now)
            else:
                waits.append(due - now)
        if self._pending_config is not None and not self._sale_busy():
            self._guarded("timer.reload", None, self._apply_pending_config)
        interval = self.notifier.watchdog_interval_s
        if interval is not None:
            if now >= self._next_watchdog:
                if self._healthy(now):
                    self.notifier.watchdog()
                self._next_watchdog = now + interval
            waits.append(max(self._next_watchdog - now, 0.01))
        return max(min(waits), 0.0)

    def _selection_timed_out(self) -> None:
        self._selection = None  # first: a failing answer must not repeat every tick
        self._answer_vend("TIMEOUT")
        event(log, "vend.scan_timeout")

    def _approval_too_late(self) -> None:
        """approve_within_s has passed since the VEND this sale pays for: the machine no longer
        takes an approval, so the sale must not vend (the driver refuses one all the same)."""
        if not self._sale_vending:
            self._abandon_sale("approve_within_s passed")

    def _healthy(self, now: float) -> bool:
        """Every part shows progress; otherwise let systemd's watchdog restart the kiosk."""
        a, v = self.config.alipay, self.config.vend
        request_s = 3.0 + max(a.pay_timeout_s, 5.0)
        allowance = self.worker.idle_s + v.timeout_s + 6 * request_s + 30
        if not self.worker.alive() or now - self.worker.last_beat > allowance:
            event(log, "watchdog.withheld", part="journal worker")
            return False
        if self._sale_busy():
            allowance = request_s + a.query_deadline_s + v.timeout_s + 6 * request_s + 30
            if now - self._sale_started > allowance:
                event(log, "watchdog.withheld", part="sale")
                return False
        broken = self._loop_broken()
        if broken is not None:
            event(log, "watchdog.withheld", part=f"event loop ({broken})")
            return False
        # A vend output's own problem (an MDB board refusing its configuration) is out of
        # service, not a reason to restart: the driver retries by itself while it runs.
        if not self.scanner.healthy() or not vend_running(self.vend):
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
            case "vend_problem":
                self._handle_vend_problem(payload)
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
                self._handle_journal_error(payload)
            case "reload":
                self._handle_reload()
            case "probe":
                self._handle_probe(*payload)
            case "writable":
                self._handle_writable(payload)
            case "wake":
                pass  # a signal arrived: its handler has run, and queued what it asks for

    def _sale_busy(self) -> bool:
        """From the scan until its "sale_done" is handled (the thread may have just ended:
        its last events, like "vending", are still to be handled in order)."""
        return self._sale_in_hand

    # -- talking to the controller: always protocol tokens ---------------------------------

    def _deny(self, reason: str) -> None:
        self.vend.deny(_token(reason))
        self._said = True

    def _answer_vend(self, answer: str) -> None:
        verb, _, reason = answer.partition(" ")
        self.vend.answer_vend(f"{verb} {_token(reason)}" if reason else verb)
        self._said = True

    # -- sales ------------------------------------------------------------------------------

    def _handle_scan(self, text: str) -> None:
        if self.stopping.is_set():
            return
        try:
            code = PaymentCode.parse(text)
        except PaymentCodeError as exc:
            self._sound(Sound.ERROR)
            event(log, "scan.rejected", reason=str(exc))
            return
        if self._sale_busy() or self._declined_until is not None:
            # Never queued: codes are single-use and go stale.
            self._sound(Sound.ERROR)
            event(log, "scan.ignored", reason="busy", code=code.masked)
            return
        if self._unavailable() is not None or self.flow is None:
            self._sound(Sound.ERROR)
            event(log, "scan.ignored", reason="out of service", code=code.masked)
            return
        if self.config.sale.mode == "vmc":
            if self._selection is None:
                self._sound(Sound.ERROR)
                event(log, "scan.ignored", reason="no selection on the machine", code=code.masked)
                return
            amount, item = self._selection.request.amount, self._selection.request.item
            approve_by = self._selection.approve_by
            if self._over_max_price(self._selection.request):
                # The cap was lowered (a reload) after this selection: checked again here,
                # where the money would move.
                self._selection = None
                self._deny("MAX_PRICE")
                self._hold_declined()
                return
            if approve_by is not None and approve_by - time.monotonic() < payment_budget_s(
                self.config.alipay
            ):
                # The machine would stop waiting before a paid sale could be approved:
                # refuse rather than charge.
                self._selection = None
                event(log, "scan.refused", reason="TIMEOUT", code=code.masked)
                self._answer_vend("TIMEOUT")
                self._hold_declined()
                return
        else:
            approve_by = None
            assert self.config.sale.price is not None
            amount, item = self.config.sale.price, self.config.sale.item
        if self.recent_codes.seen_recently(code):
            event(log, "scan.refused", reason="CODE_REUSED", code=code.masked)
            self._deny("CODE_REUSED")
            self._hold_declined()
            return
        self._selection = None
        self._sound(Sound.SCAN)
        self._start_sale(code, amount, item, approve_by)

    def _start_sale(
        self, code: PaymentCode, amount: Decimal, item: str, approve_by: float | None = None
    ) -> None:
        flow = self.flow
        assert flow is not None
        abandoned = threading.Event()

        def sell() -> None:
            try:
                sale = flow.sell(code, amount, item, abandoned=abandoned)
            except JournalError as exc:
                self.events.put(("journal_error", exc))
                sale = None
            except Exception:
                log.exception("sale failed")
                sale = None
            self.events.put(("sale_done", sale))

        self._sale_started = time.monotonic()
        self._sale_vending = False
        self._sale_abandoned = abandoned
        self._sale_approve_by = approve_by
        self._sale_in_hand = True
        self._refresh_lights()
        # Last: from here the sale thread wants the interpreter, and this one only goes back
        # to waiting.
        self._sales.run(sell)

    def _forget_finished_sale(self) -> None:
        self._sale_in_hand = False
        self._sale_vending = False
        self._sale_abandoned = None
        self._sale_approve_by = None

    def _handle_sale_done(self, sale: Sale | None) -> None:
        self._forget_finished_sale()
        if sale is None:
            # The sale could not be journaled (or a bug stopped it): nothing was charged
            # that the journal does not know of; the controller hears a refusal.
            self._deny("OUT_OF_SERVICE" if self.status.out_of_service else "ERROR")
            if self.status.out_of_service is None:
                self._hold_declined()
        else:
            self.status.sales.append(sale)
            self.status.sales_total += 1
            match sale.result:
                case SaleResult.VENDED:
                    pass
                case SaleResult.DECLINED | SaleResult.UNRESOLVED:
                    self._deny(sale.reason or "DECLINED")
                    self._hold_declined()
                case SaleResult.REVERSED:
                    self._hold_declined()
                case SaleResult.OUT_OF_SERVICE:
                    self._deny(sale.reason or "OUT_OF_SERVICE")
                    self._set_reason(
                        MERCHANT, f"Alipay refused the merchant set-up ({sale.reason})"
                    )
                case SaleResult.STOPPED:
                    pass
        # A reload that waited for this sale first: the worker woken below for it must sign
        # with the new config's key, not send one more request under the old.
        self._apply_pending_config()
        if sale is not None and sale.result is not SaleResult.VENDED:
            self.worker.wake()
        self._refresh_lights()

    def _over_max_price(self, request: VendRequest) -> bool:
        """A VEND above `sale.max_price` (as configured now) is refused, and logged."""
        max_price = self.config.sale.max_price
        if max_price is None or request.amount <= max_price:
            return False
        event(
            log,
            "vend.refused",
            level=logging.WARNING,
            reason="MAX_PRICE",
            item=request.item,
            amount=str(request.amount),
            max_price=format_amount(max_price, self.config.alipay.currency),
        )
        return True

    def _handle_vend_request(self, request: VendRequest) -> None:
        if self.stopping.is_set():
            self._answer_vend("OUT_OF_SERVICE stopping")
        elif self._unavailable() is not None or self.flow is None:
            self._answer_vend(f"OUT_OF_SERVICE {self._unavailable() or 'starting'}")
        elif self._sale_busy():
            self._answer_vend("BUSY")
        elif self._over_max_price(request):
            self._selection = None  # the customer chose again; the old choice is gone too
            self._deny("MAX_PRICE")
        else:
            now = time.monotonic()
            deadline = now + self.config.sale.scan_timeout_s
            patience = approve_within_s(self.config)
            approve_by = None if patience is None else now + patience
            if approve_by is not None:
                # A scan later than this could not be paid before the machine stops waiting.
                deadline = min(deadline, approve_by - payment_budget_s(self.config.alipay))
            self._selection = _Selection(request, deadline, approve_by)
            self._answer_vend("OK")
            event(log, "vend.selection", item=request.item, amount=str(request.amount))

    def _handle_vend_cancel(self) -> None:
        if self._sale_busy():
            if cancel_abandons_payment(self.vend):
                # MDB: the machine dropped the request before approval. The payment in flight
                # is cancelled (query, then cancel) and nothing is approved late.
                self._abandon_sale("the controller dropped the request")
                self._answer_vend("CANCELLED")
            else:
                # Serial link (SPEC section 4): too late, the payment is in flight and will be
                # settled (a paid sale then vends or is reversed).
                self._answer_vend("BUSY")
            return
        self._selection = None
        self._answer_vend("CANCELLED")

    def _abandon_sale(self, why: str = "the controller dropped the request") -> None:
        abandoned = self._sale_abandoned
        if abandoned is None or abandoned.is_set():
            return
        abandoned.set()
        event(log, "sale.abandoned", why=why)

    def _handle_vend_problem(self, problem: str | None) -> None:
        if problem == self.status.vend_problem:
            return
        self.status.vend_problem = problem
        if problem is not None:
            event(log, "kiosk.out_of_service", level=logging.ERROR, kind="vend", reason=problem)
        else:
            event(log, "kiosk.reason_cleared", kind="vend", still=self._unavailable())
            if self._unavailable() is None:
                event(log, "kiosk.back_in_service", cleared="vend")
        self._refresh_lights()

    def _clear_selection(self) -> None:
        self._selection = None

    # -- the gateway --------------------------------------------------------------------------

    def _handle_gateway(self, what: str) -> None:
        if what == "reachable":
            self._gateway_reachable()
        elif what == "unreachable":
            self._gateway_unreachable()
            self._failures_heard += 1  # after offline is set: see `reachable`
        elif what.startswith("merchant:"):
            self._set_reason(MERCHANT, f"Alipay refused the merchant set-up ({what[9:]})")
        self._refresh_lights()

    def _gateway_reachable(self) -> None:
        if self.status.offline:
            self.status.offline = False
            self._offline_since = None
            self.alarms.clear("offline")
            event(log, "gateway.online")
            # Everything waiting is due now; no journal writes on the loop's thread.
            self.worker.wake(resume_all=True)
        self._schedule_checks()
        self._refresh_lights()

    def _gateway_unreachable(self) -> None:
        if not self.status.offline:
            self.status.offline = True
            self._offline_since = time.monotonic()
            event(log, "gateway.offline")
        self._schedule_checks()  # offline: the probe stays scheduled until an answer comes
        self._refresh_lights()

    def _probe(self) -> None:
        """Offline, or out of service for the merchant set-up: is a signed request accepted
        again? Asked on a thread of its own with a client of its own, so the loop never waits
        on the network."""
        if self._probing:
            return
        self._probing = True
        generation = self._generation
        threading.Thread(
            target=self._ask_gateway, args=(generation,), name="probe", daemon=True
        ).start()

    def _ask_gateway(self, generation: int) -> None:
        result: QueryResult | None = None
        key_problem: str | None = None
        try:
            client = self._client_factory()
            try:
                result = client.query(f"{self.config.kiosk.terminal_id}-probe")
            finally:
                client.close()
        except GatewayUnreachable:
            result = None
        except KeyFileError as exc:
            key_problem = str(exc)
        except Exception:  # the probe must report back, whatever happened
            log.exception("gateway probe failed")
        news = ("probe", (generation, result, key_problem))
        if result is None and key_problem is None:
            self._tell_failure(news)
        else:
            self.events.put(news)

    def _probe_done(self) -> None:
        self._probing = False

    def _handle_probe(
        self, generation: int, result: QueryResult | None, key_problem: str | None
    ) -> None:
        self._probe_done()
        if generation != self._generation:
            # Asked with a config that has since been replaced (another gateway, another
            # key): its answer, failure or key problem says nothing of this one. Ask again.
            if result is None and key_problem is None:
                self._failures_heard += 1  # heard, and left aside: see `reachable`
            event(log, "gateway.probe_stale", answered=result is not None)
            if MERCHANT in self.status.reasons or self.status.offline:
                self._next_probe = time.monotonic()
            return
        if key_problem is not None:
            self._set_reason(KEY, f"key: {key_problem}")
            return
        if result is None:
            self._gateway_unreachable()  # schedules the next probe
            self._failures_heard += 1  # after offline is set: see `reachable`
            return
        # A signed, verified answer (even "no such trade") proves the key and partner are
        # accepted; an unsigned rejection proves nothing.
        accepted = result.verified
        event(log, "gateway.probe", accepted=accepted, error=result.error, detail=result.detail)
        self._gateway_reachable()
        if accepted:
            self._clear_reason(MERCHANT)
        self._schedule_checks()

    # -- the journal --------------------------------------------------------------------------

    def _handle_journal_error(self, error: JournalError | str) -> None:
        if isinstance(error, JournalCorrupt):
            self._journal_corrupt = True  # never written again by this process
        self._set_reason(JOURNAL, f"journal: {error}")

    def _check_writable(self) -> None:
        """Out of service for a journal write fault: try a real durable write, on a thread of
        its own (an fsync on a failing card can take long)."""
        if self._checking_writable or JOURNAL not in self.status.reasons:
            return
        self._checking_writable = True

        def check() -> None:
            error: Exception | None = None
            try:
                self.journal.check_writable()
            except Exception as exc:
                error = exc
            self.events.put(("writable", error))

        threading.Thread(target=check, name="journal-check", daemon=True).start()

    def _write_check_done(self) -> None:
        self._checking_writable = False

    def _handle_writable(self, error: Exception | None) -> None:
        self._write_check_done()
        if error is None:
            if JOURNAL in self.status.reasons and not self._journal_corrupt:
                event(log, "journal.writable")
                self._clear_reason(JOURNAL)
                self.worker.wake(resume_all=True)
        else:
            event(log, "journal.still_failing", error=str(error))
            if isinstance(error, JournalCorrupt):
                self._handle_journal_error(error)
        self._schedule_checks()

    # -- the clock and the keys ---------------------------------------------------------------

    def _check_clock(self) -> None:
        if self._wall() < CLOCK_SANE_AFTER:
            reason: str | None = "clock not set"
        elif self.config.kiosk.require_synced_clock and not self._clock_synced():
            reason = "clock not synchronised"
        else:
            reason = None
        now = time.monotonic()
        if reason is None:
            self._next_clock_check = now + self.clock_recheck_s
            self._clear_reason(CLOCK)
        else:
            self._next_clock_check = now + self.clock_recheck_out_s
            self._set_reason(CLOCK, reason)

    def _retry_keys(self) -> None:
        if KEY not in self.status.reasons:
            return
        if self._sale_busy():  # flows are replaced only between sales
            self._next_key_retry = time.monotonic() + 1.0
            return
        if self._build_flows():
            event(log, "kiosk.keys_usable")
        else:
            self._next_key_retry = time.monotonic() + self.config.alipay.probe_interval_s

    # -- reload -------------------------------------------------------------------------------

    def _handle_reload(self) -> None:
        if self._reload_config is None:
            return
        try:
            config = self._reload_config()
        except Exception as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                event(log, "config.reload_failed", level=logging.ERROR, error=line)
            event(log, "config.kept", level=logging.ERROR, why="the new config is not valid")
            return
        self._pending_config = config
        if self._sale_busy():
            # Never under a sale: the sale in flight finishes with the config it began with.
            event(log, "config.reload_deferred", why="a sale is in progress")
            return
        self._apply_pending_config()

    def _apply_pending_config(self) -> None:
        """Apply a reloaded config, between sales: new clients and flow settings for the
        foreground and the worker; out-of-service reasons re-evaluated where the new config
        could have changed them."""
        config, self._pending_config = self._pending_config, None
        if config is None or self.stopping.is_set():
            return
        if self._sale_busy():
            # The callers wait for the sale's end, which applies it; checked in code, not by
            # an assert, which the service's `python -OO` drops.
            self._pending_config = config
            return
        old = self.config
        restart = restart_only_changes(old, config)
        if "alipay.currency" in restart:
            # Prices are amounts in the currency; the vend link cannot change it while open.
            event(
                log,
                "config.restart_needed",
                level=logging.ERROR,
                keys=", ".join(restart),
                applied=False,
                why="alipay.currency changes only with a restart; the running config is kept",
            )
            return
        if restart:
            event(
                log,
                "config.restart_needed",
                level=logging.ERROR,
                keys=", ".join(restart),
                applied=True,
                why="the journal and the drivers are opened once; these keep their running "
                "values until a restart, the rest is applied",
            )
            config = keep_running_values(old, config)
        self.config = config
        self._generation += 1
        self._build_flows()  # a key problem is re-evaluated here
        self._check_clock()  # kiosk.require_synced_clock may have changed
        if MERCHANT in self.status.reasons:
            self._next_probe = time.monotonic()  # ask at once, with the new config
        self._schedule_checks()
        event(log, "config.reloaded")
        self._refresh_lights()

    # -- out of service -----------------------------------------------------------------------

    def _set_reason(self, kind: str, reason: str) -> None:
        if self.status.reasons.get(kind) == reason:
            return
        self.status.reasons[kind] = reason
        self._show_reasons()
        event(log, "kiosk.out_of_service", level=logging.ERROR, kind=kind, reason=reason)
        self._schedule_checks()
        self._refresh_lights()

    def _clear_reason(self, kind: str) -> None:
        if self.status.reasons.pop(kind, None) is None:
            return
        self._show_reasons()
        if self.status.out_of_service is None:
            event(log, "kiosk.back_in_service", cleared=kind)
        else:
            event(log, "kiosk.reason_cleared", kind=kind, still=self.status.out_of_service)
        self._schedule_checks()
        self._refresh_lights()

    def _show_reasons(self) -> None:
        reasons = self.status.reasons
        shown = [reasons[kind] for kind in REASON_ORDER if kind in reasons]
        self.status.out_of_service = shown[0] if shown else None

    def _schedule_checks(self) -> None:
        """Keep exactly the re-checks that the present reasons (and being offline) need."""
        now = time.monotonic()
        reasons = self.status.reasons
        a = self.config.alipay
        if MERCHANT in reasons or self.status.offline:
            interval = a.probe_interval_s
            if self.status.offline:
                interval = min(OFFLINE_PROBE_S, interval)
            if self._next_probe is None and not self._probing:
                self._next_probe = now + interval
        else:
            self._next_probe = None
        if KEY in reasons:
            if self._next_key_retry is None:
                self._next_key_retry = now + a.probe_interval_s
        else:
            self._next_key_retry = None
        if JOURNAL in reasons and not self._journal_corrupt:
            if self._next_write_check is None and not self._checking_writable:
                self._next_write_check = now + min(WRITE_CHECK_S, a.probe_interval_s)
        else:
            self._next_write_check = None

    # -- lights -----------------------------------------------------------------------------

    def _hold_declined(self) -> None:
        self._declined_until = time.monotonic() + self.config.indicators.declined_hold_s
        self._refresh_lights()

    def _unavailable(self) -> str | None:
        """Why no payment can be taken now: an out-of-service reason, or the vend output's."""
        return self.status.out_of_service or self.status.vend_problem

    def _update_reader(self) -> None:
        """Tell a vend output with a reader switch (MDB) whether the kiosk can take payments
        now, so the machine sells for cash meanwhile; only when that changes."""
        if self.stopping.is_set():
            reason: str | None = "stopping"
        elif self.flow is None and self.status.out_of_service is None:
            reason = "starting"
        else:
            reason = self._unavailable() or ("offline" if self.status.offline else None)
        available = reason is None
        if available == self._reader_available:
            return
        set_available(self.vend, available, reason)
        self._reader_available = available  # only once the reader took it, as for the lights

    def _refresh_lights(self) -> None:
        """The reader switch, the lights and systemd's status, from what the loop knows now.
        Each part on its own: a driver that refuses (a GPIO write, the MDB reader) is logged
        once and asked again at each refresh and tick until it takes it. A light never stops
        a sale, a stop or the loop."""
        self._switch("reader", self._update_reader)
        self._switch("lights", lambda: self._show(self._current_state()))
        self._switch("status", self._report_status)

    def _sound(self, sound: Sound) -> None:
        """A beep; a buzzer that refuses is logged as a failing part, never stops what beeps,
        and is not asked again (a late beep would mean nothing)."""
        self._switch("buzzer", functools.partial(self.indicator.sound, sound))

    def _switch(self, part: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            if part not in self._switches_failing:
                self._switches_failing.add(part)
                event(
                    log,
                    "indicator.failed",
                    level=logging.ERROR,
                    part=part,
                    error=f"{type(exc).__name__}: {exc}",
                )
            return
        if part in self._switches_failing:
            self._switches_failing.discard(part)
            event(log, "indicator.recovered", part=part)

    def _current_state(self) -> KioskState:
        """The state the lights show, from what the loop knows now (SPEC section 6)."""
        if self._unavailable() is not None:
            return KioskState.OUT_OF_SERVICE
        if self._sale_busy():
            return KioskState.VENDING if self._sale_vending else KioskState.PAYING
        if self._declined_until is not None:
            return KioskState.DECLINED
        if self.status.offline:
            return KioskState.OFFLINE
        return KioskState.READY

    def _show(self, state: KioskState) -> None:
        self.status.state = state  # what the kiosk is, whatever the lights managed to show
        if state is not self._state_logged:  # once per change, however often it is retried
            self._state_logged = state
            event(log, "indicator", state=state.value)
        if state is self._shown:
            return
        self.indicator.show(state)
        self._shown = state  # only once the lights took it: a refused switch is tried again

    def _status_text(self) -> str:
        """systemd's STATUS=: the state now, with why when it takes no payments."""
        unavailable = self._unavailable()
        if unavailable:
            return f"out of service: {unavailable}"
        state = self._current_state()
        if state is KioskState.OFFLINE:
            return f"offline: gateway unreachable, {self.status.backlog} unfinished"
        return state.value

    # -- reporting: systemd, alarms, telemetry --------------------------------------------------

    def _report_status(self) -> None:
        """The one place that tells the outside what the kiosk is now: STATUS= (so it never
        goes stale after a recovery), the out-of-service alarms and telemetry's state, each
        only when it changed."""
        text = self._status_text()
        if text != self._status_sent:
            self._switch("systemd", functools.partial(self._tell_systemd, text))
        self._sync_reason_alarms()
        state = self.status.state
        reason = self._unavailable() or (
            "gateway unreachable" if state is KioskState.OFFLINE else None
        )
        if self._reported is None or self._reported[0] is not state:
            self._state_since = self._wall()
        if (state, reason) != self._reported:
            self._switch("telemetry", functools.partial(self._tell_telemetry, state, reason))

    def _tell_systemd(self, text: str) -> None:
        self.notifier.status(text)
        self._status_sent = text  # only once told: a failed telling is tried again

    def _tell_telemetry(self, state: KioskState, reason: str | None) -> None:
        if self.telemetry is not None:
            from kiosk.telemetry import KioskSnapshot  # loaded with the sink

            self.telemetry.state_changed(KioskSnapshot(state, reason, self._state_since))
        self._reported = (state, reason)

    def _sync_reason_alarms(self) -> None:
        """One out_of_service alarm per reason present (its kind is the key), and the clock's."""
        reasons = dict(self.status.reasons)
        if self.status.vend_problem is not None:
            reasons["vend"] = self.status.vend_problem
        for kind in (*REASON_ORDER, "vend"):
            self.alarms.update("out_of_service", reasons.get(kind), key=kind)
        self.alarms.update("clock_unsynchronised", self.status.reasons.get(CLOCK))

    def _check_alarms(self) -> None:
        """What no event tells: offline for long, a link down for long, the disk, and the
        journal's attention rows (a person may have settled one with the CLI)."""
        now = time.monotonic()
        self._next_alarm_check = now + self.alarm_check_s
        since = self._offline_since
        if since is not None and now - since >= self.offline_alarm_s:
            minutes = (now - since) / 60
            self.alarms.raise_("offline", f"gateway unreachable for {minutes:.0f} min")
        for kind, part in (("scanner_down", self.scanner), ("vend_link_down", self.vend)):
            if link_up(part):
                self._link_down_since.pop(kind, None)
                self.alarms.clear(kind)
                continue
            down = self._link_down_since.setdefault(kind, now)
            if now - down >= self.link_alarm_s:
                what = "scanner" if kind == "scanner_down" else "vend link"
                self.alarms.raise_(kind, f"{what} down for {now - down:.0f} s")
        self._check_disk()
        attention = self.figures.attention_refs()
        if attention is not None:
            refs = set(attention)
            for ref in refs:
                self.alarms.raise_("attention", "a transaction needs a person", key=ref, ref=ref)
            self.alarms.keep_only("attention", refs)

    def _check_disk(self) -> None:
        try:
            stats = os.statvfs(self.journal.path.parent)
        except OSError:
            return  # the journal's own checks report a state directory that is gone
        total = stats.f_blocks * stats.f_frsize
        free = stats.f_bavail * stats.f_frsize
        share, floor = DISK_NEARLY_FULL
        limit = max(total * share, float(floor)) if total else float(floor)
        if free < limit:
            self.alarms.raise_(
                "disk_nearly_full", f"{free >> 20} MiB free of {total >> 20} MiB in the state dir"
            )
        elif free >= limit * DISK_CLEAR_FACTOR:
            self.alarms.clear("disk_nearly_full")

    def _journal_changed(self, before: Transaction | None, after: Transaction) -> None:
        """The journal's watcher (on the committing thread: queue only). A transaction that
        needs a person raises an alarm; telemetry hears of every change of state."""
        if after.state is TxnState.ATTENTION:
            why = after.note or after.error_code or "needs a person"
            self.alarms.raise_("attention", why, key=after.ref, ref=after.ref)
        elif before is not None and before.state is TxnState.ATTENTION:
            self.alarms.clear("attention", after.ref)
        if self.telemetry is not None:
            self.telemetry.transaction_changed(before, after)

    def _retry_ceiling(self, ref: str, message: str | None) -> None:
        """The worker: a transaction past its retry ceiling (message), or finished (None)."""
        self.alarms.update("retry_ceiling", message, key=ref, ref=ref)


class _SaleThread:
    """The thread sales run on: started once, waiting on its queue between sales, so a scan
    hands its sale over instead of starting a thread (which costs more than a journal write's
    CPU time on a Pi). One sale at a time; the loop never hands over a second while one is in
    hand."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="sale", daemon=True)
        self._thread.start()

    def run(self, sale: Callable[[], None]) -> None:
        self._jobs.put(sale)

    def stop(self) -> None:
        """Let the sale in hand end, then the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (sale := self._jobs.get()) is not None:
            sale()  # reports back itself, whatever happens ("sale_done")


def _token(text: str | None) -> str:
    """One protocol field (SPEC section 4): printable ASCII without spaces, at most 40
    characters; a reason's text up to its first colon."""
    head = (text or "").split(":")[0].strip()
    token = "".join(ch if "!" <= ch <= "~" else "-" for ch in head)[:40]
    return token or "unknown"
