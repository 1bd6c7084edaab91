"""A `VendOutput` that plays a scripted vending controller, for tests and `kiosk demo`."""

from __future__ import annotations

import threading
from collections import deque
from decimal import Decimal

from kiosk.ports import VendListener, VendRequest, VendResult


class FakeVendOutput:
    """Answers each `dispense()` with the next scripted result (VENDED when the script is empty)
    and records what the core told the controller; thread-safe.

    `hold()` makes `dispense()` block until `release()` (or its timeout: TIMED_OUT), to test a
    stop while a vend is in progress. `request_vend()` and `cancel()` act as the controller.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._script: deque[VendResult] = deque()
        self._reports: deque[VendResult] = deque()
        self._released = threading.Event()
        self._released.set()
        self._listener: VendListener | None = None
        self._approval_cursor = 0
        self.approvals: list[tuple[str, Decimal]] = []  # (ref, amount) per dispense()
        self.awaited: list[str] = []  # refs passed to await_report()
        self.denials: list[str] = []  # reasons passed to deny()
        self.answers: list[str] = []  # answers to VEND/CANCEL
        self.closed = False
        self.is_healthy = True

    # -- scripting ----------------------------------------------------------------------------

    def script(self, *results: VendResult) -> None:
        """Queue the results of the next `dispense()` calls."""
        with self._changed:
            self._script.extend(results)

    def script_report(self, *results: VendResult) -> None:
        """Queue the results of the next `await_report()` calls (default TIMED_OUT)."""
        with self._changed:
            self._reports.extend(results)

    def hold(self) -> None:
        """Make `dispense()` block until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    # -- acting as the controller -------------------------------------------------------------

    def request_vend(self, item: str, amount: Decimal | str) -> None:
        """The customer chose `item` at `amount` (`VEND <item> <amount>`)."""
        listener = self._require_listener()
        listener.on_vend_request(VendRequest(item, Decimal(amount)))

    def cancel(self) -> None:
        """The customer gave up (`CANCEL`)."""
        self._require_listener().on_vend_cancel()

    def wait_for_approval(self, timeout: float) -> tuple[str, Decimal] | None:
        """The next approval after the one the previous call returned, or None on timeout."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: len(self.approvals) > self._approval_cursor, timeout
            ):
                return None
            approval = self.approvals[self._approval_cursor]
            self._approval_cursor += 1
            return approval

    def wait_for_answer(self, answer: str, timeout: float) -> bool:
        """Wait until the core has given `answer` to a VEND/CANCEL."""
        with self._changed:
            return self._changed.wait_for(lambda: answer in self.answers, timeout)

    # -- VendOutput ---------------------------------------------------------------------------

    def start(self, listener: VendListener) -> None:
        with self._changed:
            self._listener = listener

    def dispense(self, ref: str, amount: Decimal, timeout_s: float) -> VendResult:
        with self._changed:
            self.approvals.append((ref, amount))
            result = self._script.popleft() if self._script else VendResult.VENDED
            self._changed.notify_all()
        if not self._released.wait(timeout_s) or self.closed:
            return VendResult.TIMED_OUT  # never released, or closed while held
        return result

    def await_report(self, ref: str, timeout_s: float) -> VendResult:
        with self._changed:
            self.awaited.append(ref)
            self._changed.notify_all()
            return self._reports.popleft() if self._reports else VendResult.TIMED_OUT

    def deny(self, reason: str) -> None:
        with self._changed:
            self.denials.append(reason)
            self._changed.notify_all()

    def answer_vend(self, answer: str) -> None:
        with self._changed:
            self.answers.append(answer)
            self._changed.notify_all()

    def healthy(self) -> bool:
        return self.is_healthy and not self.closed

    def close(self) -> None:
        self.closed = True
        self._released.set()

    def _require_listener(self) -> VendListener:
        with self._changed:
            if self._listener is None:
                raise RuntimeError("start() the vend output before acting as the controller")
            return self._listener
