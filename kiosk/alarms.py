"""Alarms: conditions a person should know about, each raised once when it starts and cleared
once when it ends, however often the kiosk looks at it in between.

The daemon (and the journal worker, and the journal's state changes) feed one `AlarmBoard`;
the log, MQTT telemetry and the Prometheus textfile read it. The kinds are declared once, in
`ALARM_KINDS`: the telemetry payloads, the metric's `kind` label and the docs use that table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kiosk.log import event

log = logging.getLogger("kiosk.alarms")

# kind -> what it means (SPEC section 8, and the journal worker's retry ceiling).
ALARM_KINDS: dict[str, str] = {
    "attention": "a transaction needs a person (state attention)",
    "out_of_service": "the kiosk takes no payments; the message says why",
    "offline": "the gateway has been unreachable for longer than 5 minutes",
    "scanner_down": "the scanner is unplugged or its reader failed",
    "vend_link_down": "the link to the vending side is down",
    "disk_nearly_full": "the state directory's disk is nearly full",
    "clock_unsynchronised": "the clock is not set, or not synchronised from a time source",
    "retry_ceiling": "a transaction is still unfinished after many background retries",
}


@dataclass(frozen=True)
class Alarm:
    """One start (`active`) or end of an alarm. `key` tells apart alarms of one kind (a ref,
    an out-of-service reason's kind); `ref` is the transaction's, if it is about one."""

    kind: str
    key: str
    message: str
    ref: str | None
    active: bool
    at: datetime

    def payload(self) -> dict[str, object]:
        """The MQTT `alarm` payload (SPEC section 8), with `active` saying start or end."""
        return {
            "kind": self.kind,
            "message": self.message,
            "ref": self.ref,
            "at": iso_seconds(self.at),
            "active": self.active,
        }


def iso_seconds(moment: datetime) -> str:
    """ISO 8601 UTC to the second, as every telemetry payload writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


AlarmListener = Callable[[Alarm], None]


class AlarmBoard:
    """The alarms active now. Thread-safe: raised and cleared from the loop, the worker and
    a sale's thread. Listeners are called on the caller's thread, outside the lock, and must
    return at once (the telemetry sink only queues)."""

    def __init__(self, wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], Alarm] = {}
        self._listeners: list[AlarmListener] = []

    def listen(self, listener: AlarmListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def raise_(self, kind: str, message: str, *, key: str = "", ref: str | None = None) -> bool:
        """Start the alarm, unless it is active already (then nothing: no repeat on every
        pass). True when it started now."""
        if kind not in ALARM_KINDS:
            raise ValueError(f"unknown alarm kind {kind!r}")
        with self._lock:
            if (kind, key) in self._active:
                return False
            alarm = Alarm(kind, key, message, ref, True, self._wall())
            self._active[(kind, key)] = alarm
            listeners = list(self._listeners)
        event(log, "alarm.raised", level=logging.ERROR, kind=kind, ref=ref, message=message)
        self._tell(listeners, alarm)
        return True

    def clear(self, kind: str, key: str = "") -> bool:
        """End the alarm if it is active; True when it ended now."""
        with self._lock:
            started = self._active.pop((kind, key), None)
            if started is None:
                return False
            alarm = Alarm(kind, key, started.message, started.ref, False, self._wall())
            listeners = list(self._listeners)
        event(log, "alarm.cleared", kind=kind, ref=alarm.ref, message=alarm.message)
        self._tell(listeners, alarm)
        return True

    def update(
        self, kind: str, message: str | None, *, key: str = "", ref: str | None = None
    ) -> None:
        """Raise with `message`, or clear when it is None: for a check that runs every pass."""
        if message is None:
            self.clear(kind, key)
        else:
            self.raise_(kind, message, key=key, ref=ref)

    def keep_only(self, kind: str, keys: set[str]) -> None:
        """Clear every alarm of `kind` whose key is not in `keys`."""
        with self._lock:
            gone = [k for (k_kind, k) in self._active if k_kind == kind and k not in keys]
        for key in gone:
            self.clear(kind, key)

    def active(self) -> list[Alarm]:
        with self._lock:
            return list(self._active.values())

    def is_active(self, kind: str, key: str = "") -> bool:
        with self._lock:
            return (kind, key) in self._active

    def counts(self) -> dict[str, int]:
        """Active alarms per kind, every kind present (0 when none)."""
        found = dict.fromkeys(ALARM_KINDS, 0)
        with self._lock:
            for kind, _ in self._active:
                found[kind] += 1
        return found

    @staticmethod
    def _tell(listeners: list[AlarmListener], alarm: Alarm) -> None:
        for listener in listeners:
            try:
                listener(alarm)
            except Exception:  # a reader's bug must not stop the one who raised it
                log.exception("alarm listener failed")
