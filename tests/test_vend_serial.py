"""The serial vend link against a controller played by the test on a real pty (SPEC section 4).

The test holds the pty master (the controller's end); the link opens the slave through a
symlink, as a kiosk opens `/dev/serial/by-id/...`, so an unplug can re-point it to a new pty.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import pytest

from drivers.vend_serial import SerialVendOutput
from kiosk.ports import VendRequest, VendResult

T = TypeVar("T")
WAIT_S = 5.0  # upper bound for anything that should happen promptly


class Controller:
    """The vending controller's end of the line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_line(self, timeout: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line from the kiosk; got {self._pending!r} so far"
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if readable:
                self._pending += os.read(self.fd, 1024)
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def ask(self, line: bytes) -> bytes:
        self.send(line)
        return self.read_line()

    def assert_nothing_else_sent(self) -> None:
        # The link answers in order: if PONG is next, nothing was queued before it.
        assert self.ask(b"PING\n") == b"PONG"


class Listener:
    def __init__(self) -> None:
        self.requests: queue.Queue[VendRequest] = queue.Queue()
        self.cancels: queue.Queue[bool] = queue.Queue()

    def on_vend_request(self, request: VendRequest) -> None:
        self.requests.put(request)

    def on_vend_cancel(self) -> None:
        self.cancels.put(True)


class Pty:
    """A pty pair reachable through a symlink that can be re-pointed (unplug and replug)."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.fds: list[int] = []
        self.master = self._plug()

    def _plug(self) -> int:
        master, slave = os.openpty()
        self.fds += [master, slave]
        fresh = self.link.with_suffix(".new")
        fresh.symlink_to(os.ttyname(slave))
        os.replace(fresh, self.link)
        return master

    def replug(self) -> int:
        """Point the link at a new pty, then pull the old one's plug."""
        old = self.master
        self.master = self._plug()
        os.close(old)
        self.fds.remove(old)
        return self.master

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class EventWaiter(logging.Handler):
    """Lets a test wait until the link has logged an event (a sync point, not a sleep)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.seen.add(record.getMessage())
            self.changed.notify_all()

    def wait(self, name: str, timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: name in self.seen, timeout)


@pytest.fixture
def events() -> Iterator[EventWaiter]:
    waiter = EventWaiter()
    logger = logging.getLogger("drivers.vend_serial")
    old_level = logger.level
    logger.addHandler(waiter)
    logger.setLevel(logging.INFO)
    yield waiter
    logger.removeHandler(waiter)
    logger.setLevel(old_level)


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[Pty]:
    pair = Pty(tmp_path / "ttyVMC")
    yield pair
    pair.close()


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
def link(pty: Pty, listener: Listener) -> Iterator[SerialVendOutput]:
    output = SerialVendOutput(str(pty.link), 9600, "USD")
    output.start(listener)
    assert output.wait_connected(WAIT_S)
    yield output
    output.close()


@pytest.fixture
def vmc(pty: Pty, link: SerialVendOutput) -> Controller:
    return Controller(pty.master)


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield lambda call: pool.submit(call)


def test_ping_is_answered_pong(vmc: Controller) -> None:
    assert vmc.ask(b"PING\n") == b"PONG"


def test_ping_with_crlf_is_answered_pong(vmc: Controller) -> None:
    assert vmc.ask(b"PING\r\n") == b"PONG"


def test_vend_reaches_the_listener_and_the_core_answers_ok(
    vmc: Controller, link: SerialVendOutput, listener: Listener
) -> None:
    vmc.send(b"VEND coffee 1.50\n")
    assert listener.requests.get(timeout=WAIT_S) == VendRequest("coffee", Decimal("1.50"))
    link.answer_vend("OK")
    assert vmc.read_line() == b"OK"


def test_core_can_answer_busy_and_out_of_service(vmc: Controller, link: SerialVendOutput) -> None:
    link.answer_vend("BUSY")
    link.answer_vend("OUT_OF_SERVICE OFFLINE")
    assert vmc.read_line() == b"BUSY"
    assert vmc.read_line() == b"OUT_OF_SERVICE OFFLINE"


def test_cancel_reaches_the_listener_and_the_core_answers_cancelled(
    vmc: Controller, link: SerialVendOutput, listener: Listener
) -> None:
    vmc.send(b"CANCEL\n")
    assert listener.cancels.get(timeout=WAIT_S)
    link.answer_vend("CANCELLED")
    assert vmc.read_line() == b"CANCELLED"


def test_deny_writes_denied_with_the_reason(vmc: Controller, link: SerialVendOutput) -> None:
    link.deny("CODE_REUSED")
    assert vmc.read_line() == b"DENIED CODE_REUSED"


def test_approved_then_success_is_vended_and_acked(
    vmc: Controller, link: SerialVendOutput, background
) -> None:
    result = background(lambda: link.dispense("K1", Decimal("1.50"), WAIT_S))
    assert vmc.read_line() == b"APPROVED K1 1.50"
    vmc.send(b"SUCCESS K1\n")
    assert result.result(WAIT_S) is VendResult.VENDED
    link.acknowledge("K1")  # the core journaled VENDED
    assert vmc.read_line() == b"ACK K1"


def test_approved_then_failure_is_failed_and_acked(
    vmc: Controller, link: SerialVendOutput, background
) -> None:
    result = background(lambda: link.dispense("K2", Decimal("2.00"), WAIT_S))
    assert vmc.read_line() == b"APPROVED K2 2.00"
    vmc.send(b"FAILURE K2\r\n")
    assert result.result(WAIT_S) is VendResult.FAILED
    link.acknowledge("K2")
    assert vmc.read_line() == b"ACK K2"


def test_silence_after_approved_times_out(vmc: Controller, link: SerialVendOutput) -> None:
    started = time.monotonic()
    assert link.dispense("K3", Decimal("1.50"), 0.3) is VendResult.TIMED_OUT
    assert 0.3 <= time.monotonic() - started < 2.0
    assert vmc.read_line() == b"APPROVED K3 1.50"


def test_repeated_report_gets_the_same_ack_and_changes_nothing(
    vmc: Controller, link: SerialVendOutput, background
) -> None:
    result = background(lambda: link.dispense("K4", Decimal("1.50"), WAIT_S))
    assert vmc.read_line() == b"APPROVED K4 1.50"
    vmc.send(b"SUCCESS K4\n")
    assert result.result(WAIT_S) is VendResult.VENDED
    link.acknowledge("K4")
    assert vmc.read_line() == b"ACK K4"
    assert vmc.ask(b"SUCCESS K4\n") == b"ACK K4"
    assert vmc.ask(b"FAILURE K4\n") == b"ACK K4"
    # The settled result stands, and the ref is never approved a second time.
    assert link.dispense("K4", Decimal("1.50"), WAIT_S) is VendResult.VENDED
    vmc.assert_nothing_else_sent()


def test_a_report_is_acked_only_once_the_core_acknowledges_it(
    vmc: Controller, link: SerialVendOutput, background
) -> None:
    result = background(lambda: link.dispense("K9", Decimal("1.50"), WAIT_S))
    assert vmc.read_line() == b"APPROVED K9 1.50"
    vmc.send(b"SUCCESS K9\n")
    assert result.result(WAIT_S) is VendResult.VENDED
    # Not recorded yet (the journal commit may still fail): a repeat gets no answer ...
    vmc.send(b"SUCCESS K9\n")
    assert vmc.ask(b"PING\n") == b"PONG"
    # ... and the ref is never approved twice meanwhile.
    assert link.dispense("K9", Decimal("1.50"), WAIT_S) is VendResult.VENDED
    link.acknowledge("K9")
    assert vmc.read_line() == b"ACK K9"
    assert vmc.ask(b"SUCCESS K9\n") == b"ACK K9"  # settled and ACKed: the same ACK at once
    link.acknowledge("K9")  # twice: nothing more
    vmc.assert_nothing_else_sent()


def test_a_timed_out_vend_needs_no_acknowledgement(vmc: Controller, link: SerialVendOutput) -> None:
    assert link.dispense("K10", Decimal("1.50"), 0.2) is VendResult.TIMED_OUT
    assert vmc.read_line() == b"APPROVED K10 1.50"
    link.acknowledge("K10")
    vmc.assert_nothing_else_sent()


def test_report_for_a_ref_never_approved_gets_err_unknown_ref(vmc: Controller) -> None:
    assert vmc.ask(b"SUCCESS NEVER-SEEN\n") == b"ERR unknown-ref"
    assert vmc.ask(b"FAILURE NEVER-SEEN\n") == b"ERR unknown-ref"


def test_report_after_the_timeout_is_acked_and_the_result_stays_timed_out(
    vmc: Controller, link: SerialVendOutput
) -> None:
    assert link.dispense("K5", Decimal("1.50"), 0.2) is VendResult.TIMED_OUT
    assert vmc.read_line() == b"APPROVED K5 1.50"
    assert vmc.ask(b"SUCCESS K5\n") == b"ACK K5"
    assert link.await_report("K5", 0.1) is VendResult.TIMED_OUT


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b"HELLO\n", b"ERR unknown-verb"),
        (b"VEND coffee\n", b"ERR bad-fields"),
        (b"VEND coffee 1.5\n", b"ERR bad-amount"),
        (b"VEND caf\xc3\xa9 1.50\n", b"ERR not-ascii"),
        (b"VEND a.b 1.50\n", b"ERR bad-item"),
    ],
)
def test_malformed_line_gets_err_and_the_link_keeps_working(
    vmc: Controller, listener: Listener, line: bytes, answer: bytes
) -> None:
    assert vmc.ask(line) == answer
    assert vmc.ask(b"PING\n") == b"PONG"
    assert listener.requests.empty()


def test_overlong_line_is_discarded_and_answered_too_long(vmc: Controller) -> None:
    vmc.send(b"VEND " + b"x" * 200)
    vmc.send(b"y" * 300 + b" 1.50\n")
    assert vmc.read_line() == b"ERR too-long"
    assert vmc.ask(b"PING\n") == b"PONG"


def test_blank_lines_are_skipped_without_an_answer(vmc: Controller) -> None:
    vmc.send(b"\r\n\n")
    vmc.assert_nothing_else_sent()


def test_listener_that_raises_does_not_take_the_link_down(pty: Pty) -> None:
    class Broken(Listener):
        def on_vend_request(self, request: VendRequest) -> None:
            raise RuntimeError("core bug")

    with SerialVendOutput(str(pty.link), 9600, "USD") as link:
        link.start(Broken())
        assert link.wait_connected(WAIT_S)
        vmc = Controller(pty.master)
        vmc.send(b"VEND coffee 1.50\n")
        assert vmc.ask(b"PING\n") == b"PONG"
        assert link.healthy()


def test_await_report_after_a_restart_takes_success_without_approving(
    vmc: Controller, link: SerialVendOutput, background, events: EventWaiter
) -> None:
    # A fresh link knows nothing of K6: it was approved by the process before the restart.
    result = background(lambda: link.await_report("K6", WAIT_S))
    assert events.wait("vend.awaiting_report")
    vmc.send(b"SUCCESS K6\n")
    assert result.result(WAIT_S) is VendResult.VENDED
    link.acknowledge("K6")
    # The first line from the kiosk is the ACK: no APPROVED was sent.
    assert vmc.read_line() == b"ACK K6"


def test_await_report_times_out_when_the_controller_says_nothing(link: SerialVendOutput) -> None:
    assert link.await_report("K7", 0.2) is VendResult.TIMED_OUT


def test_await_report_counts_a_report_that_arrived_before_it(
    vmc: Controller, link: SerialVendOutput
) -> None:
    assert vmc.ask(b"FAILURE K8\n") == b"ERR unknown-ref"
    assert link.await_report("K8", WAIT_S) is VendResult.FAILED
    link.acknowledge("K8")
    assert vmc.read_line() == b"ACK K8"


def test_unplug_and_replug_reconnects_and_answers(pty: Pty, link: SerialVendOutput) -> None:
    new_master = pty.replug()
    assert link.wait_connected(WAIT_S, times=2)
    assert link.healthy()
    assert Controller(new_master).ask(b"PING\n") == b"PONG"


def test_vend_after_a_replug_settles_on_the_new_line(
    pty: Pty, link: SerialVendOutput, background
) -> None:
    vmc = Controller(pty.replug())
    assert link.wait_connected(WAIT_S, times=2)
    result = background(lambda: link.dispense("K9", Decimal("1.50"), WAIT_S))
    assert vmc.read_line() == b"APPROVED K9 1.50"
    vmc.send(b"SUCCESS K9\n")
    assert result.result(WAIT_S) is VendResult.VENDED


def test_dispense_while_the_port_is_missing_times_out_at_once(tmp_path: Path) -> None:
    with SerialVendOutput(str(tmp_path / "absent"), 9600, "USD") as link:
        link.start(Listener())
        started = time.monotonic()
        assert link.dispense("K10", Decimal("1.50"), 30) is VendResult.TIMED_OUT
        assert time.monotonic() - started < 1.0
        assert link.healthy()  # still trying to open the port
        assert not link.connected()


def test_a_second_link_cannot_share_the_port(pty: Pty, link: SerialVendOutput) -> None:
    with SerialVendOutput(str(pty.link), 9600, "USD") as intruder:
        intruder.start(Listener())
        assert not intruder.wait_connected(0.3)
    assert Controller(pty.master).ask(b"PING\n") == b"PONG"


def test_close_ends_a_waiting_dispense_as_timed_out_and_is_safe_twice(
    vmc: Controller, link: SerialVendOutput, background
) -> None:
    result = background(lambda: link.dispense("K11", Decimal("1.50"), 30))
    assert vmc.read_line() == b"APPROVED K11 1.50"
    link.close()
    link.close()
    assert result.result(WAIT_S) is VendResult.TIMED_OUT
    assert not link.healthy()
