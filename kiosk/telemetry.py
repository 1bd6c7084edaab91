"""Telemetry (SPEC section 8): the kiosk's state, sales and alarms to an MQTT broker, Home
Assistant discovery, and the same figures in a Prometheus textfile.

One `TelemetrySink` per process, fed by the daemon with events (a state snapshot, a
transaction that changed state, an alarm). Feeding never blocks and never waits on the
network: it appends to a bounded queue and wakes the sink's own thread, which does all the
I/O. With the broker unreachable the kiosk sells as usual; sales and alarms wait in the queue
(the oldest dropped, and counted, when it is full), the state is kept as its latest value
only, and on every (re)connect the sink publishes availability and state again.

What leaves the kiosk: no payment code, masked or not (every string passes `drop_codes`),
no key, no password.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiosk import __version__
from kiosk.alarms import Alarm, AlarmBoard, iso_seconds
from kiosk.config import Config
from kiosk.errors import KeyFileError
from kiosk.figures import FiguresReader
from kiosk.ha_discovery import discovery_configs
from kiosk.journal import FINAL_STATES, JournalFigures, Transaction
from kiosk.log import drop_codes, event
from kiosk.metrics import Figures, render, samples_of, write_textfile
from kiosk.money import format_amount
from kiosk.ports import KioskState

if TYPE_CHECKING:
    from kiosk.mqtt_link import MqttLink

log = logging.getLogger("kiosk.telemetry")

QUEUE_SIZE = 1000  # sales and alarms kept while the broker is unreachable
WINDOW = 20  # messages handed to paho and not yet acknowledged by the broker
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 30.0
PROMETHEUS_MIN_INTERVAL_S = 1.0  # the textfile is rewritten at most this often
STOP_FLUSH_S = 3.0  # a clean stop waits this long for the broker to take the last messages


@dataclass(frozen=True)
class KioskSnapshot:
    """What the state payload says of the kiosk itself (the daemon's view)."""

    state: KioskState
    reason: str | None
    since: datetime


def _iso_of_journal(stamp: str | None) -> str | None:
    """A journal time (`...T12:00:00.123Z`) as the payloads write times (to the second)."""
    if not stamp:
        return None
    try:
        return iso_seconds(datetime.fromisoformat(stamp.replace("Z", "+00:00")))
    except ValueError:
        return None


def _epoch_of_journal(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def scrub(value: Any) -> Any:
    """Every string in a payload without anything that could be a payment code."""
    if isinstance(value, str):
        return drop_codes(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def sale_payload(txn: Transaction) -> dict[str, Any]:
    """The `sale` payload of a transaction that became final (SPEC section 8). `code` is the
    Alipay result code (or the kiosk's reason), never a payment code."""
    return {
        "ref": txn.ref,
        "state": txn.state.value,
        "amount": format_amount(txn.amount, txn.currency),
        "currency": txn.currency,
        "item": txn.item,
        "code": txn.error_code,
        "at": _iso_of_journal(txn.updated_at),
    }


class TelemetrySink:
    """The daemon's one telemetry object. `start()` once, feed it from any thread, `stop()`
    once; a sink without `mqtt_url` only writes the Prometheus textfile."""

    def __init__(
        self,
        config: Config,
        figures: FiguresReader,
        alarms: AlarmBoard,
        *,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        queue_size: int = QUEUE_SIZE,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        assert config.telemetry is not None
        self.settings = config.telemetry
        self.terminal_id = config.kiosk.terminal_id
        self.currency = config.alipay.currency
        self.base_topic = f"{self.settings.topic_prefix}/{self.terminal_id}"
        self.figures = figures
        self.alarms = alarms
        self._wall = wall_clock
        self.queue_size = queue_size
        self.reconnect_max_s = reconnect_max_s
        self._lock = threading.Lock()  # guards what the feeding threads touch
        self._events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._snapshot = KioskSnapshot(KioskState.STARTING, None, wall_clock())
        self._state_pending = True  # the state is to be published (and the textfile written)
        self._figures_stale = True
        self._sales_by_outcome: collections.Counter[str] = collections.Counter()
        self.dropped = 0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        # The thread's own state.
        self._link: MqttLink | None = None
        self._inflight: set[int] = set()
        self._connect_outbox: list[tuple[str, str, bool]] = []
        self._last_figures: JournalFigures | None = None
        self._next_connect = 0.0
        self._backoff = RECONNECT_FIRST_S
        self._last_link_error: str | None = None
        self._next_heartbeat = 0.0
        self._last_textfile = -PROMETHEUS_MIN_INTERVAL_S
        self._textfile_pending = bool(self.settings.prometheus_textfile)
        self.connected = threading.Event()  # for tests and the bench: the broker took us
        self.published = 0  # messages the broker acknowledged

    # -- fed by the daemon (any thread; never blocks) -----------------------------------------

    def state_changed(self, snapshot: KioskSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._state_pending = True
        self._wake()

    def transaction_changed(self, before: Transaction | None, after: Transaction) -> None:
        """The journal's watcher: one `sale` message for a transaction that became final."""
        became_final = after.state in FINAL_STATES and (
            before is None or before.state not in FINAL_STATES
        )
        with self._lock:
            self._figures_stale = True
            if became_final:
                self._sales_by_outcome[after.state.value] += 1
                self._queue("sale", sale_payload(after))
            self._state_pending = True  # the counts in the state payload moved
        self._wake()

    def alarm(self, alarm: Alarm) -> None:
        """The alarm board's listener: one `alarm` message for each start and end."""
        with self._lock:
            self._queue("alarm", alarm.payload())
            self._state_pending = True  # the textfile's alarm gauges moved
        self._wake()

    def _queue(self, suffix: str, payload: dict[str, Any]) -> None:
        # Called with the lock held. Without MQTT nothing is queued (the textfile needs none).
        if not self.settings.mqtt_url:
            return
        if len(self._events) >= self.queue_size:
            self._events.popleft()
            self.dropped += 1
        self._events.append((suffix, payload))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread. A password file that cannot be used is logged and MQTT stays off
        (the checker refuses it before; a file changed since is no reason to stop selling)."""
        if self.settings.mqtt_url:
            try:
                self._link = self._build_link()
            except KeyFileError as exc:
                event(log, "telemetry.disabled", level=logging.ERROR, error=str(exc))
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_FLUSH_S + 2.0) -> None:
        """A clean stop: the last state, `offline` on availability, a clean disconnect (so
        the broker does not send the last will), `kiosk_up 0` in the textfile."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self.figures.close()

    def _build_link(self) -> MqttLink:
        from kiosk.alipay.signing import read_secret_file
        from kiosk.mqtt_link import LinkSettings, MqttLink

        s = self.settings
        password = ""
        if s.password_file is not None:
            password = read_secret_file(s.password_file, "MQTT password file").decode().strip()
        return MqttLink(
            LinkSettings(
                url=s.mqtt_url,
                client_id=f"kiosk-{self.terminal_id}",
                username=s.username,
                password=password,
                ca_bundle=s.ca_bundle,
                will_topic=f"{self.base_topic}/availability",
            ),
            on_connected=self._link_connected,
            on_lost=self._link_lost,
            on_published=self._link_published,
        )

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    stopping = self._stopping
                if stopping:
                    break
                try:
                    self._pass()
                except Exception:  # a bug here must not end telemetry for good
                    log.exception("telemetry pass failed")
                    self._wait(1.0)
            self._final()
        except Exception:
            log.exception("telemetry stop failed")
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _pass(self) -> None:
        now = time.monotonic()
        link = self._link
        if link is not None and not link.busy and now >= self._next_connect:
            self._try_connect(link, now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_s
            with self._lock:
                self._state_pending = True
                self._figures_stale = True
        self._publish_due()
        self._write_textfile_if_due(now)
        self._wait(self._wait_s(time.monotonic()))

    def _wait_s(self, now: float) -> float:
        waits = [self._next_heartbeat - now]
        link = self._link
        if link is not None:
            if link.busy:
                waits.append(KEEPALIVE_STEP_S)
            else:
                waits.append(self._next_connect - now)
        if self._textfile_pending:
            waits.append(self._last_textfile + PROMETHEUS_MIN_INTERVAL_S - now)
        return max(min(waits), 0.0)

    def _wait(self, timeout: float) -> None:
        """Wait for the socket, a feed, or the timeout; do the link's network work."""
        link = self._link
        if link is not None and link.busy:
            woken = link.step(timeout, self._wake_r)
        else:
            import select

            readable, _, _ = select.select([self._wake_r], [], [], timeout)
            woken = bool(readable)
        if woken:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._wake_r, 4096):
                    pass

    def _try_connect(self, link: MqttLink, now: float) -> None:
        from kiosk.mqtt_link import LinkError

        try:
            link.connect()
        except LinkError as exc:
            self._connect_failed(str(exc), now)

    def _connect_failed(self, why: str, now: float) -> None:
        if why != self._last_link_error:  # once per distinct cause, not every retry
            event(
                log,
                "telemetry.connect_failed",
                level=logging.WARNING,
                broker=self.settings.mqtt_url,
                error=why,
                retry_s=round(self._backoff, 1),
            )
            self._last_link_error = why
        self._next_connect = now + self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max_s)

    def _link_connected(self) -> None:
        event(log, "telemetry.connected", broker=self.settings.mqtt_url)
        self._backoff = RECONNECT_FIRST_S
        self._last_link_error = None
        self._inflight.clear()  # paho sends again what it held; acks come as before
        outbox: list[tuple[str, str, bool]] = []
        if self.settings.homeassistant_discovery:
            for topic, payload in discovery_configs(
                self.terminal_id, self.base_topic, self.currency, __version__
            ):
                outbox.append((topic, json.dumps(scrub(payload), separators=(",", ":")), True))
        outbox.append((f"{self.base_topic}/availability", "online", True))
        self._connect_outbox = outbox
        with self._lock:
            self._state_pending = True  # republished after availability, on every connect
        self.connected.set()

    def _link_lost(self, why: str) -> None:
        self.connected.clear()
        self._connect_failed(why, time.monotonic())

    def _link_published(self, mid: int) -> None:
        if mid in self._inflight:
            self._inflight.discard(mid)
            self.published += 1

    def _publish_due(self) -> None:
        """Hand over what is due while the window has room: first what a connect owes
        (discovery, availability), then sales and alarms in order, then the latest state."""
        link = self._link
        connected = link is not None and link.connected
        with self._lock:
            state_due = self._state_pending
            if not connected:
                # Nothing to send: the textfile still follows the state.
                if state_due:
                    self._textfile_pending = bool(self.settings.prometheus_textfile)
                    self._state_pending = False
                return
        assert link is not None
        while self._connect_outbox and len(self._inflight) < WINDOW:
            topic, payload, retain = self._connect_outbox.pop(0)
            self._inflight.add(link.publish(topic, payload, retain))
        if self._connect_outbox:
            return
        while len(self._inflight) < WINDOW:
            with self._lock:
                if not self._events:
                    break
                suffix, body = self._events.popleft()
            text = json.dumps(scrub(body), separators=(",", ":"))
            self._inflight.add(link.publish(f"{self.base_topic}/{suffix}", text, False))
        with self._lock:
            state_due = self._state_pending and not self._events
        if state_due and len(self._inflight) < WINDOW:
            # Cleared before the payload is built: a change that comes meanwhile sets it again
            # and goes out next, rather than being cleared with the state it came after.
            with self._lock:
                self._state_pending = False
            payload = self._state_payload()
            self._textfile_pending = bool(self.settings.prometheus_textfile)
            self._inflight.add(link.publish(f"{self.base_topic}/state", payload, True))

    def _journal_figures(self) -> JournalFigures | None:
        with self._lock:
            stale, self._figures_stale = self._figures_stale, False
        if stale or self._last_figures is None:
            found = self.figures.read(self._wall())
            if found is not None:
                self._last_figures = found
            elif stale:
                self._last_figures = None
        return self._last_figures

    def _state_payload(self) -> str:
        with self._lock:
            snap = self._snapshot
            dropped = self.dropped
        found = self._journal_figures()
        payload = {
            "state": snap.state.value,
            "reason": snap.reason,
            "since": iso_seconds(snap.since),
            "firmware": __version__,
            "unfinished": found.unfinished if found else None,
            "attention": len(found.attention_refs) if found else None,
            "sales_today": {
                "count": found.sales_today if found else None,
                "amount": format_amount(found.amount_today, self.currency) if found else None,
                "currency": self.currency,
            },
            "last_sale_at": _iso_of_journal(found.last_sale_at) if found else None,
            "telemetry_dropped": dropped,
        }
        return json.dumps(scrub(payload), separators=(",", ":"))

    # -- Prometheus ---------------------------------------------------------------------------

    def _write_textfile_if_due(self, now: float) -> None:
        if not self._textfile_pending:
            return
        if now - self._last_textfile < PROMETHEUS_MIN_INTERVAL_S:
            return
        self._textfile_pending = False
        self._last_textfile = now
        self._write_textfile(up=True)

    def _write_textfile(self, up: bool) -> None:
        path = self.settings.prometheus_textfile
        if not path:
            return
        with self._lock:
            snap = self._snapshot
            dropped = self.dropped
            by_outcome = dict(self._sales_by_outcome)
        found = self._journal_figures()
        link = self._link
        figures = Figures(
            terminal_id=self.terminal_id,
            firmware=__version__,
            up=up,
            state=snap.state,
            state_since=snap.since.timestamp(),
            sales_by_outcome=by_outcome,
            sales_today=found.sales_today if found else 0,
            amount_today=str(
                format_amount(found.amount_today if found else Decimal(0), self.currency)
            ),
            currency=self.currency,
            last_sale_at=_epoch_of_journal(found.last_sale_at) if found else None,
            unfinished=found.unfinished if found else None,
            attention=len(found.attention_refs) if found else None,
            alarms=self.alarms.counts(),
            dropped=dropped,
            connected=None if link is None else link.connected,
            written_at=self._wall().timestamp(),
        )
        try:
            write_textfile(Path(path), render(samples_of(figures)))
        except OSError as exc:
            event(
                log,
                "telemetry.textfile_failed",
                level=logging.WARNING,
                path=path,
                error=exc.strerror or str(exc),
            )

    # -- a clean stop -------------------------------------------------------------------------

    def _final(self) -> None:
        link = self._link
        if link is not None and link.connected:
            with self._lock:
                self._state_pending = True
            self._connect_outbox = []
            self._publish_due()  # what is queued, and the last state
            self._inflight.add(link.publish(f"{self.base_topic}/availability", "offline", True))
            deadline = time.monotonic() + STOP_FLUSH_S
            while link.connected and (self._inflight or link.wants_write()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                link.step(min(left, 0.2), self._wake_r)
            link.disconnect()
        elif link is not None:
            link.disconnect()
        self._write_textfile(up=False)


KEEPALIVE_STEP_S = 15.0  # while connected: paho's keep-alive work at least this often
