"""The daemon's loop in-process for tests: fake scanner, lights and vend output, the gateway
simulator on loopback, the real flow, worker and journal, and the kiosk's log events as they
happen (waited on, never slept for)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from drivers.indicator_fake import FakeIndicator
from drivers.scanner_fake import FakeScanner
from drivers.vend_fake import FakeVendOutput
from kiosk import vmc_protocol
from kiosk.alipay.client import AlipayClient
from kiosk.config import Config
from kiosk.daemon import Kiosk
from kiosk.demo import PARTNER, demo_config
from kiosk.errors import GatewayUnreachable
from kiosk.journal import Journal, Transaction, TxnState
from kiosk.systemd import Notifier


class EventLog(logging.Handler):
    """The `event(...)` fields of every log record, in order; waitable."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._changed = threading.Condition()
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "kiosk_fields", None)
        if fields is None:
            return
        with self._changed:
            self.events.append(dict(fields))
            self._changed.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e.get("event") == name]

    def index(self, name: str, after: int = -1, **fields: Any) -> int | None:
        with self._changed:
            for i in range(after + 1, len(self.events)):
                e = self.events[i]
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                    return i
        return None

    def wait_for(self, name: str, timeout: float = 10.0, after: int = -1, **fields: Any) -> int:
        """The index of the first `name` event (with these fields) after index `after`."""
        found: list[int] = []

        def seen() -> bool:
            for i in range(after + 1, len(self.events)):
                e = self.events[i]
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()):
                    found.append(i)
                    return True
            return False

        with self._changed:
            if not self._changed.wait_for(seen, timeout):
                tail = [e.get("event") for e in self.events[-20:]]
                raise AssertionError(f"no {name} {fields} within {timeout} s; last: {tail}")
        return found[0]

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until `condition` holds, looking again at every log event (and at least every
        0.05 s for state that changes without one)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.05))
        return True

    @property
    def size(self) -> int:
        with self._changed:
            return len(self.events)


class ProtocolVendOutput(FakeVendOutput):
    """A fake controller that, like the serial link, refuses a line that is not protocol."""

    def deny(self, reason: str) -> None:
        vmc_protocol.denied(reason)  # ValueError for a reason that is not one token
        super().deny(reason)

    def answer_vend(self, answer: str) -> None:
        vmc_protocol.vend_answer(answer)
        super().answer_vend(answer)


class Rig:
    def __init__(
        self,
        kiosk: Kiosk,
        scanner: FakeScanner,
        lights: FakeIndicator,
        vend: Any,  # a FakeVendOutput, or a real driver (MDB on a pty)
        log: EventLog,
    ) -> None:
        self.kiosk, self.scanner, self.lights, self.vend = kiosk, scanner, lights, vend
        self.log = log
        self.thread = threading.Thread(target=kiosk.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        assert self.kiosk.ready.wait(10)

    def stop(self) -> None:
        self.kiosk.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


def rig_config(state_dir: Path, gateway: str, **sections: dict[str, Any]) -> Config:
    """The demo's config (fast timings, fake devices), red light shortened, sections edited."""
    config = demo_config(state_dir, gateway)
    config = replace(config, indicators=replace(config.indicators, declined_hold_s=0.3))
    for name, changes in sections.items():
        config = replace(config, **{name: replace(getattr(config, name), **changes)})
    return config


@contextmanager
def rig_factory(
    tmp_path: Path, gateway: str, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    """`make(...)` builds and starts a kiosk; every one is stopped at the end."""
    rigs: list[Rig] = []
    root = logging.getLogger()
    log = EventLog()
    root.addHandler(log)
    level = root.level
    root.setLevel(logging.DEBUG)

    def make(
        config: Config | None = None,
        *,
        wall: datetime | None = None,
        client_factory: Callable[[], AlipayClient] | None = None,
        notifier: Notifier | None = None,
        vend: Any = None,  # default FakeVendOutput(); any VendOutput (e.g. MDB on a pty)
        reload_config: Callable[[], Config] | None = None,
        clock_synced: Callable[[], bool] | None = None,
        clock_recheck_s: tuple[float, float] | None = None,
        journal: Journal | None = None,
    ) -> Rig:
        config = config or rig_config(tmp_path / "state", gateway)
        scanner, lights, vend = FakeScanner(), FakeIndicator(), vend or FakeVendOutput()
        extra: dict[str, Any] = {} if clock_synced is None else {"clock_synced": clock_synced}
        kiosk = Kiosk(
            config,
            scanner=scanner,
            indicator=lights,
            vend=vend,
            journal=journal or Journal(config.kiosk.state_dir),
            client_factory=client_factory or (lambda: make_client(pay_timeout_s=1.0)),
            notifier=notifier or Notifier({}),
            wall_clock=(lambda: wall) if wall else (lambda: datetime.now(UTC)),
            reload_config=reload_config,
            **extra,
        )
        if clock_recheck_s is not None:
            kiosk.clock_recheck_out_s, kiosk.clock_recheck_s = clock_recheck_s
        rig = Rig(kiosk, scanner, lights, vend, log)
        rigs.append(rig)
        rig.start()
        return rig

    try:
        yield make
    finally:
        for rig in rigs:
            if rig.thread.is_alive():
                rig.stop()
            rig.kiosk.journal.close()
        root.removeHandler(log)
        root.setLevel(level)


class Gate:
    """A point a thread stops at until the test opens it; `reached` says it got there."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.open = threading.Event()

    def pass_(self) -> None:
        self.reached.set()
        assert self.open.wait(20), "the test never opened the gate"


def with_a_reversal_due(journal: Journal) -> Transaction:
    """One paid sale in `journal` whose vend failed: the worker's to cancel."""
    txn = journal.open_transaction(
        ref="VM-DEMO-20260101000000-aa",
        amount=Decimal("1.50"),
        currency="USD",
        item="coffee",
        code_last4="0001",
        trans_create_time=datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        partner=PARTNER,
    )
    return journal.update(txn, state=TxnState.CANCELLING, note="vend failed")


class GatedClient:
    """A real client whose `method` first waits at a gate; `fail` then makes it find no
    gateway (a connection tried while the network was down, timing out late)."""

    def __init__(self, client: AlipayClient, method: str, gate: Gate, fail: bool = False) -> None:
        self._client, self._method, self._gate, self._fail = client, method, gate, fail

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        if name != self._method:
            return real

        def gated(*args: Any, **kwargs: Any) -> Any:
            self._gate.pass_()
            if self._fail:
                raise GatewayUnreachable("connect timed out")
            return real(*args, **kwargs)

        return gated
