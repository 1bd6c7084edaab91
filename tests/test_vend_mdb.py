"""The MDB cashless driver against the board emulator on a real pty (SPEC section 7, MDB.md).

The emulator holds the pty master and plays the Qibixx board with a scripted vending machine
behind it; the driver opens the slave through a symlink, as a kiosk opens /dev/serial0. Every
wait is on a line, a queue or a condition, never a sleep.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from gpiozero.pins.mock import MockFactory, MockPin
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import vend_mdb
from drivers.mdb_board import MdbBoard
from drivers.vend_mdb import (
    MdbTimings,
    MdbVendOutput,
    ReaderStatus,
    Unrecognised,
    VendAsked,
    VendAskedBadly,
    VendFailed,
    parse_board_line,
    reader_settings,
)
from kiosk.ports import VendRequest, VendResult, set_available, vend_problem

T = TypeVar("T")
WAIT_S = 5.0  # upper bound for anything that should happen promptly
RESET_PIN = 6
FAST = MdbTimings(
    confirm_s=0.5,
    reader_off_s=0.5,
    prompted_s=1.0,
    liveness_interval_s=600.0,  # off unless a test asks for it
    liveness_timeout_s=0.3,
    reset_hold_s=0.01,
    reset_boot_s=0.01,
    retry_first_s=0.1,
    retry_max_s=0.5,
)
CONFIG_LINES = [
    "C,0",
    "C,SETCONF,mdb-addr=0x10",
    "C,SETCONF,mdb-currency-code=0x1840",
    "C,SETCONF,mdb-always-idle=1",
    "C,1",
]


class Listener:
    def __init__(self) -> None:
        self.requests: queue.Queue[VendRequest] = queue.Queue()
        self.cancels: queue.Queue[bool] = queue.Queue()
        self.problems: queue.Queue[str | None] = queue.Queue()

    def on_vend_request(self, request: VendRequest) -> None:
        self.requests.put(request)

    def on_vend_cancel(self) -> None:
        self.cancels.put(True)

    def on_vend_problem(self, problem: str | None) -> None:
        self.problems.put(problem)


class EventWaiter(logging.Handler):
    """Lets a test wait until the driver has logged an event (a sync point, not a sleep)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.seen.append(record.getMessage())
            self.changed.notify_all()

    def wait(self, name: str, timeout: float = WAIT_S, count: int = 1) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.seen.count(name) >= count, timeout)


@pytest.fixture
def events() -> Iterator[EventWaiter]:
    waiter = EventWaiter()
    logger = logging.getLogger("drivers.vend_mdb")
    old_level = logger.level
    logger.addHandler(waiter)
    logger.setLevel(logging.INFO)
    yield waiter
    logger.removeHandler(waiter)
    logger.setLevel(old_level)


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "ttyMDB"


@pytest.fixture
def board(link: Path) -> Iterator[MdbBoard]:
    with MdbBoard.on_pty(link) as emulator:
        yield emulator


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
def make_mdb(link: Path, listener: Listener) -> Iterator[Callable[..., MdbVendOutput]]:
    made: list[MdbVendOutput] = []

    def make(**options: Any) -> MdbVendOutput:
        settings: dict[str, Any] = {"timings": FAST}
        settings.update(options)
        output = MdbVendOutput(str(link), settings.pop("currency", "USD"), **settings)
        output.start(listener)
        made.append(output)
        return output

    yield make
    for output in made:
        output.close()


@pytest.fixture
def mdb(board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]) -> MdbVendOutput:
    """A driver whose board is configured and whose reader the machine has enabled."""
    output = make_mdb()
    assert output.wait_configured(WAIT_S)
    assert board.wait_for_line("C,1", WAIT_S)
    assert output.wait_reader_state("ENABLED", WAIT_S)
    board.skip_to_end()
    return output


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield lambda call: pool.submit(call)


def choose(
    board: MdbBoard, listener: Listener, amount: str = "1.50", item: str = "12"
) -> VendRequest:
    """The customer picks on the machine; the driver hands the request to the core."""
    assert board.select(amount, item)
    return listener.requests.get(timeout=WAIT_S)


def chosen_and_accepted(board: MdbBoard, listener: Listener, mdb: MdbVendOutput) -> VendRequest:
    request = choose(board, listener)
    mdb.answer_vend("OK")
    return request


def assert_nothing_sent(board: MdbBoard, mdb: MdbVendOutput) -> None:
    """Nothing went to the board since the last line read: the next line is a probe's."""
    mdb.set_available(False)
    assert board.next_line(WAIT_S) == "C,0"


# -- configuration ----------------------------------------------------------------------------


def test_configuration_at_start_is_reader_off_three_settings_then_reader_on(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    mdb = make_mdb()
    assert mdb.wait_configured(WAIT_S)
    assert board.next_lines(5, WAIT_S) == CONFIG_LINES
    assert board.config() == {
        "mdb-addr": "0x10",
        "mdb-currency-code": "0x1840",
        "mdb-always-idle": "1",
    }
    assert board.wait_reader(True, WAIT_S)
    assert mdb.wait_reader_state("ENABLED", WAIT_S)
    assert mdb.healthy()
    assert mdb.problem() is None


def test_cashless_2_in_euro_is_configured_as_0x60_and_0x1978(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    mdb = make_mdb(address=2, currency="EUR")
    assert mdb.wait_configured(WAIT_S)
    assert board.next_lines(4, WAIT_S)[1:] == [
        "C,SETCONF,mdb-addr=0x60",
        "C,SETCONF,mdb-currency-code=0x1978",
        "C,SETCONF,mdb-always-idle=1",
    ]


@pytest.mark.parametrize(
    ("currency", "code"), [("JPY", "0x1392"), ("AUD", "0x1036"), ("BHD", "0x1048")]
)
def test_currency_code_is_0x1_and_the_three_iso_digits(currency: str, code: str) -> None:
    assert ("mdb-currency-code", code) in reader_settings(1, currency)


def test_an_unknown_currency_or_address_is_refused_at_construction(link: Path) -> None:
    with pytest.raises(ValueError, match="ISO 4217"):
        MdbVendOutput(str(link), "XXX")
    with pytest.raises(ValueError, match="mdb_address"):
        MdbVendOutput(str(link), "USD", address=3)


def test_an_unavailable_kiosk_configures_the_board_but_leaves_the_reader_off(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    mdb = make_mdb(available=False)
    assert mdb.wait_configured(WAIT_S)
    assert board.next_lines(4, WAIT_S) == CONFIG_LINES[:4]
    mdb.set_available(True)
    assert board.next_line(WAIT_S) == "C,1"
    assert board.wait_reader(True, WAIT_S)


def test_a_refused_setting_leaves_the_driver_unhealthy_with_the_reason_then_recovers(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput], listener: Listener
) -> None:
    board.refuse("mdb-currency-code")
    mdb = make_mdb()
    problem = mdb.wait_problem(WAIT_S)
    assert problem is not None
    assert "refused mdb-currency-code=0x1840" in problem
    assert "invalid parameter" in problem
    assert vend_problem(mdb) == problem
    assert listener.problems.get(timeout=WAIT_S) == problem
    assert not mdb.healthy()
    assert "C,1" not in board.host_lines()  # a reader that is not configured stays off
    board.accept_all()
    assert mdb.wait_configured(WAIT_S)  # retried with backoff
    assert listener.problems.get(timeout=WAIT_S) is None
    assert mdb.problem() is None
    assert board.wait_for_line("C,1", WAIT_S)
    assert mdb.healthy()


def test_a_setting_never_confirmed_is_a_problem_naming_it(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    board.refuse("mdb-always-idle", answer=None)  # the board says nothing at all to it
    mdb = make_mdb()
    problem = mdb.wait_problem(WAIT_S)
    assert problem is not None
    assert "did not confirm mdb-always-idle=1" in problem
    assert not mdb.healthy()


def test_a_board_that_says_nothing_at_start_is_a_problem(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    board.go_silent()
    mdb = make_mdb()
    problem = mdb.wait_problem(WAIT_S)
    assert problem is not None
    assert "does not answer" in problem
    board.speak()
    assert mdb.wait_configured(WAIT_S)
    assert mdb.healthy()


def test_a_missing_port_is_a_problem(tmp_path: Path, listener: Listener) -> None:
    with MdbVendOutput(str(tmp_path / "absent"), "USD", timings=FAST) as mdb:
        mdb.start(listener)
        problem = mdb.wait_problem(WAIT_S)
        assert problem is not None
        assert "unavailable" in problem
        assert not mdb.healthy()


# -- requests and approvals -------------------------------------------------------------------


def test_a_selection_reaches_the_listener_with_a_decimal_amount(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    assert choose(board, listener) == VendRequest("12", Decimal("1.50"))


def test_an_amount_with_fewer_digits_is_the_same_decimal(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    request = choose(board, listener, amount="2.5", item="7")
    assert request == VendRequest("7", Decimal("2.50"))
    assert str(request.amount) == "2.50"


@pytest.mark.parametrize(
    "line",
    [
        "c,STATUS,VEND,1.505,12",  # more digits than USD has
        "c,STATUS,VEND,abc,12",
        "c,STATUS,VEND,1.50",
        "c,STATUS,VEND,1.50,12,9",
        "c,STATUS,VEND,0.00,12",
        "c,STATUS,VEND,1.50,caf\u00e9",
    ],
)
def test_a_malformed_selection_is_refused_with_stop(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, line: str
) -> None:
    board.send_line(line)
    assert board.next_line(WAIT_S) == "C,STOP"
    assert listener.requests.empty()


def test_paid_request_is_approved_for_its_amount_and_success_is_vended(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, background
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    result = background(lambda: mdb.dispense("K1", request.amount, WAIT_S))
    assert board.next_line(WAIT_S) == "C,VEND,1.50"
    assert board.wait_approved(WAIT_S) == "1.50"
    board.success()
    assert result.result(WAIT_S) is VendResult.VENDED
    # Settled: the same ref is never approved again.
    assert mdb.dispense("K1", request.amount, WAIT_S) is VendResult.VENDED
    assert_nothing_sent(board, mdb)


def test_an_amount_other_than_the_request_approves_nothing(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)
    assert mdb.dispense("K2", Decimal("2.00"), WAIT_S) is VendResult.FAILED
    assert board.next_line(WAIT_S) == "C,STOP"
    assert not any(line.startswith("C,VEND") for line in board.host_lines())
    assert not board.request_open()


def test_dispense_without_an_open_request_approves_nothing(
    board: MdbBoard, mdb: MdbVendOutput
) -> None:
    assert mdb.dispense("K3", Decimal("1.50"), WAIT_S) is VendResult.FAILED
    assert board.next_line(WAIT_S) == "C,STOP"
    assert board.approved() is None


def test_a_request_the_kiosk_did_not_accept_is_never_approved(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    choose(board, listener)  # no answer_vend("OK"): no sale can be paying for it
    assert mdb.dispense("K4", Decimal("1.50"), WAIT_S) is VendResult.FAILED
    assert board.next_line(WAIT_S) == "C,STOP"


def test_a_request_older_than_approve_within_s_is_never_approved(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput], listener: Listener
) -> None:
    mdb = make_mdb(approve_within_s=0.0)
    assert mdb.wait_configured(WAIT_S)
    assert board.wait_reader(True, WAIT_S)
    assert mdb.wait_reader_state("ENABLED", WAIT_S)
    board.skip_to_end()
    chosen_and_accepted(board, listener, mdb)
    assert mdb.dispense("K5", Decimal("1.50"), WAIT_S) is VendResult.FAILED
    assert board.next_line(WAIT_S) == "C,STOP"


def test_vend_failure_reported_by_the_machine_is_failed(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, background
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    result = background(lambda: mdb.dispense("K6", request.amount, WAIT_S))
    assert board.wait_approved(WAIT_S) == "1.50"
    board.fail()
    assert result.result(WAIT_S) is VendResult.FAILED


def test_a_request_dropped_after_approval_is_failed(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, background
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    result = background(lambda: mdb.dispense("K7", request.amount, WAIT_S))
    assert board.wait_approved(WAIT_S) == "1.50"
    board.drop()
    assert result.result(WAIT_S) is VendResult.FAILED
    assert listener.cancels.empty()  # approved: a failed vend, not a customer's cancel


def test_silence_after_approval_times_out(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    assert mdb.dispense("K8", request.amount, 0.3) is VendResult.TIMED_OUT
    assert board.approved() == "1.50"
    # A SUCCESS after the core gave up changes nothing: the charge is being reversed.
    board.success()
    assert mdb.await_report("K8", 0.1) is VendResult.TIMED_OUT


def test_a_request_dropped_before_approval_cancels_and_stops_nothing(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)
    board.drop()
    assert listener.cancels.get(timeout=WAIT_S)
    mdb.answer_vend("CANCELLED")  # the core's answer to the drop
    assert_nothing_sent(board, mdb)
    # ... and nothing can be approved for it any more.
    assert mdb.dispense("K9", Decimal("1.50"), WAIT_S) is VendResult.FAILED


def test_a_new_selection_after_a_drop_is_not_approved_with_the_old_payment(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)  # a sale starts paying for this one
    board.drop()
    assert listener.cancels.get(timeout=WAIT_S)
    choose(board, listener)  # the same price, chosen again while the old pay is in flight
    mdb.answer_vend("BUSY")  # the core's answer to the drop: too late, the pay is in flight
    # The old pay succeeds: its approval must not go to the new request.
    assert mdb.dispense("K10", Decimal("1.50"), WAIT_S) is VendResult.FAILED
    assert board.next_line(WAIT_S) == "C,STOP"
    assert board.approved() is None


def test_deny_stops_the_accepted_request(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)
    mdb.deny("DECLINED")
    assert board.next_line(WAIT_S) == "C,STOP"
    assert not board.request_open()


def test_deny_answering_an_unanswered_request_stops_it_and_keeps_answers_in_order(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    choose(board, listener, amount="9.00")
    mdb.deny("MAX_PRICE")  # the core's answer to the request: over sale.max_price
    assert board.next_line(WAIT_S) == "C,STOP"
    assert not board.request_open()
    # The deny settled that request's answer: the next OK belongs to the next request.
    chosen_and_accepted(board, listener, mdb)
    assert mdb.dispense("K20", Decimal("1.50"), 0.2) is VendResult.TIMED_OUT
    assert board.approved() == "1.50"


def test_deny_without_a_request_sends_nothing(board: MdbBoard, mdb: MdbVendOutput) -> None:
    mdb.deny("CODE_REUSED")
    assert_nothing_sent(board, mdb)


@pytest.mark.parametrize("answer", ["BUSY", "OUT_OF_SERVICE offline"])
def test_busy_and_out_of_service_refuse_the_request_with_stop(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, answer: str
) -> None:
    choose(board, listener)
    mdb.answer_vend(answer)
    assert board.next_line(WAIT_S) == "C,STOP"


def test_ok_sends_nothing_and_the_scan_timeout_stops_the_request(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)
    mdb.answer_vend("TIMEOUT")
    assert board.next_line(WAIT_S) == "C,STOP"  # the first line after OK: OK sent nothing


# -- availability -----------------------------------------------------------------------------


def test_unavailable_switches_the_reader_off_and_available_on_again(
    board: MdbBoard, mdb: MdbVendOutput
) -> None:
    set_available(mdb, False, "offline")
    assert board.next_line(WAIT_S) == "C,0"
    assert board.wait_reader(False, WAIT_S)
    set_available(mdb, True)
    assert board.next_line(WAIT_S) == "C,1"
    assert board.wait_reader(True, WAIT_S)
    assert mdb.wait_reader_state("ENABLED", WAIT_S)
    assert mdb.problem() is None  # a reader switched off on purpose is no board problem


def test_the_reader_stays_on_until_an_approved_vend_is_reported(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, background
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    result = background(lambda: mdb.dispense("K11", request.amount, WAIT_S))
    assert board.next_line(WAIT_S) == "C,VEND,1.50"
    mdb.set_available(False, "offline")
    board.success()  # the report the reader switch must not cut off
    assert result.result(WAIT_S) is VendResult.VENDED
    assert board.next_line(WAIT_S) == "C,0"


# -- board resets and liveness ----------------------------------------------------------------


def test_a_board_reset_is_noticed_and_the_configuration_sent_again(
    board: MdbBoard, mdb: MdbVendOutput
) -> None:
    board.reset()  # the board restarts and says c,STATUS,INACTIVE unasked
    assert mdb.wait_configured(WAIT_S, times=2)
    assert board.next_lines(5, WAIT_S) == CONFIG_LINES
    assert board.wait_reader(True, WAIT_S)
    assert board.config()["mdb-currency-code"] == "0x1840"


def test_a_board_reset_drops_the_open_request(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener
) -> None:
    chosen_and_accepted(board, listener, mdb)
    board.reset()
    assert listener.cancels.get(timeout=WAIT_S)
    assert mdb.wait_configured(WAIT_S, times=2)


class ResetLine(MockPin):
    """The Pi HAT's reset input: driven low, the board restarts."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.board: MdbBoard | None = None
        self.lows = 0
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value: Any) -> bool:
        with self.changed:
            changed: bool = super()._change_state(value)
            if changed and not value:
                self.lows += 1
                if self.board is not None:
                    self.board.reset(announce=False)
            self.changed.notify_all()
        return changed


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    mock = MockFactory(pin_class=ResetLine)
    yield mock
    mock.reset()
    mock.close()


def test_a_silent_board_is_reset_through_its_pin_and_configured_again(
    board: MdbBoard,
    make_mdb: Callable[..., MdbVendOutput],
    factory: MockFactory,
    events: EventWaiter,
) -> None:
    pin = factory.pin(RESET_PIN)
    pin.board = board
    timings = dataclasses.replace(FAST, liveness_interval_s=0.2)
    mdb = make_mdb(reset_pin=RESET_PIN, pin_factory=factory, timings=timings)
    assert mdb.wait_configured(WAIT_S)
    assert pin.state  # high: the board runs
    assert board.wait_for_line("V", WAIT_S)  # quiet for a while: asked for its version
    board.go_silent()
    assert events.wait("mdb.board_silent")
    assert mdb.wait_configured(WAIT_S, times=2)
    assert pin.lows == 1
    assert pin.state  # released again
    assert board.config()["mdb-addr"] == "0x10"
    assert board.wait_reader(True, WAIT_S)


def test_a_silent_board_without_a_reset_pin_is_a_problem_until_it_answers(
    board: MdbBoard, make_mdb: Callable[..., MdbVendOutput]
) -> None:
    timings = dataclasses.replace(FAST, liveness_interval_s=0.2)
    mdb = make_mdb(timings=timings)
    assert mdb.wait_configured(WAIT_S)
    board.go_silent()
    problem = mdb.wait_problem(WAIT_S)
    assert problem is not None
    assert "does not answer" in problem
    board.speak()
    assert mdb.wait_configured(WAIT_S, times=2)
    assert mdb.problem() is None


# -- after a restart --------------------------------------------------------------------------


def test_await_report_after_a_restart_takes_success_without_approving(
    board: MdbBoard, mdb: MdbVendOutput, background, events: EventWaiter
) -> None:
    result = background(lambda: mdb.await_report("K12", WAIT_S))
    assert events.wait("vend.awaiting_report")
    board.success()
    assert result.result(WAIT_S) is VendResult.VENDED
    assert not any(line.startswith("C,VEND") for line in board.host_lines())


def test_await_report_after_a_restart_takes_a_failure(
    board: MdbBoard, mdb: MdbVendOutput, background, events: EventWaiter
) -> None:
    result = background(lambda: mdb.await_report("K13", WAIT_S))
    assert events.wait("vend.awaiting_report")
    board.fail()
    assert result.result(WAIT_S) is VendResult.FAILED


def test_await_report_times_out_when_the_machine_says_nothing(mdb: MdbVendOutput) -> None:
    assert mdb.await_report("K14", 0.2) is VendResult.TIMED_OUT


def test_await_report_counts_a_report_that_came_before_it(
    board: MdbBoard, mdb: MdbVendOutput, events: EventWaiter
) -> None:
    board.success()
    assert events.wait("mdb.report_unclaimed")
    assert mdb.await_report("K15", WAIT_S) is VendResult.VENDED


# -- robustness -------------------------------------------------------------------------------


def test_unknown_and_garbled_lines_are_logged_and_the_driver_goes_on(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, events: EventWaiter
) -> None:
    board.send_line("c,STATUS,SLEEPING")
    board.send_line("c,ERR,something the manual does not list")
    board.send_line("x,hello")
    board.send_bytes(b"\xff\xfe\x00garbage\r\n")
    board.send_bytes(b"c," + b"A" * 500 + b"\n")
    board.send_line("r,ACK")
    board.send_line("")
    assert events.wait("mdb.line_too_long")
    assert choose(board, listener) == VendRequest("12", Decimal("1.50"))
    assert mdb.healthy()


def test_a_listener_that_raises_does_not_stop_the_driver(board: MdbBoard, link: Path) -> None:
    class Broken(Listener):
        def on_vend_request(self, request: VendRequest) -> None:
            raise RuntimeError("core bug")

    with MdbVendOutput(str(link), "USD", timings=FAST) as mdb:
        mdb.start(Broken())
        assert mdb.wait_configured(WAIT_S)
        assert mdb.wait_reader_state("ENABLED", WAIT_S)
        assert board.select("1.50", "12")
        assert mdb.wait_reader_state("VEND", WAIT_S)
        board.drop()
        assert mdb.wait_reader_state("ENABLED", WAIT_S)
        assert mdb.healthy()


def test_close_switches_the_reader_off_ends_a_wait_and_is_safe_twice(
    board: MdbBoard, mdb: MdbVendOutput, listener: Listener, background
) -> None:
    request = chosen_and_accepted(board, listener, mdb)
    result = background(lambda: mdb.dispense("K16", request.amount, 30))
    assert board.next_line(WAIT_S) == "C,VEND,1.50"
    mdb.close()
    mdb.close()
    assert result.result(WAIT_S) is VendResult.TIMED_OUT
    assert board.next_line(WAIT_S) == "C,0"
    assert not mdb.healthy()


def test_a_second_driver_cannot_share_the_port(
    board: MdbBoard, mdb: MdbVendOutput, link: Path, listener: Listener
) -> None:
    with MdbVendOutput(str(link), "USD", timings=FAST) as intruder:
        intruder.start(listener)
        assert intruder.wait_problem(WAIT_S) is not None
        assert not intruder.connected()
    assert mdb.healthy()


# -- the line parser, fuzzed ------------------------------------------------------------------


def test_parser_reads_the_documented_lines() -> None:
    assert parse_board_line(b"c,STATUS,VEND,1.00,2", "USD") == VendAsked(Decimal("1.00"), "2")
    assert parse_board_line(b"c,STATUS,VEND,150,2", "JPY") == VendAsked(Decimal("150"), "2")
    assert parse_board_line(b"c,STATUS,VEND,1.50,2", "JPY") == VendAskedBadly(
        "more-minor-digits-than-the-currency"
    )
    assert parse_board_line(b"c,ERR,VEND 3\r", "USD") == VendFailed("VEND 3")
    assert parse_board_line(b"c,STATUS,ENABLED", "USD") == ReaderStatus("ENABLED")
    assert isinstance(parse_board_line(b"c,STATUS,VEND", "USD"), VendAskedBadly)
    assert isinstance(parse_board_line("c,SET,ÖK".encode(), "USD"), Unrecognised)


@given(st.binary(max_size=300))
def test_parser_never_raises_on_any_bytes(data: bytes) -> None:
    parse_board_line(data, "USD")


BOARD_WORDS = [
    "c",
    "STATUS",
    "VEND",
    "SET",
    "OK",
    "ERR",
    "SUCCESS",
    "IDLE",
    "ENABLED",
    "INACTIVE",
    "DISABLED",
    "r",
    "ACK",
    "v",
    "1.50",
    "2.5",
    "0",
    "1",
    "-1",
    "12",
]
board_lines = st.one_of(
    st.lists(st.sampled_from(BOARD_WORDS), min_size=1, max_size=6).map(
        lambda words: ",".join(words).encode()
    ),
    st.binary(max_size=200),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(board_lines, max_size=30))
def test_no_sequence_of_lines_crashes_the_driver(
    lines: list[bytes],
) -> None:
    # No port: whatever the driver would send is dropped, and nothing is ever approved.
    mdb = MdbVendOutput("/nonexistent/ttyMDB", "USD", timings=FAST)
    listener = Listener()
    mdb._listener = listener
    for line in lines:
        mdb._handle(line)
        mdb.answer_vend("OK")
    mdb._handle(None)  # an over-long line
    assert mdb.dispense("FUZZ", Decimal("1.50"), 0.01) in (
        VendResult.FAILED,
        VendResult.TIMED_OUT,
    )


# -- the builder ------------------------------------------------------------------------------


def test_the_builder_makes_an_mdb_output_from_the_declared_mdb_keys(
    board: MdbBoard, link: Path, listener: Listener, tmp_path: Path
) -> None:
    from drivers import build_vend_output
    from kiosk.config import VendSection
    from tests.loop_rig import rig_config

    config = rig_config(tmp_path / "state", "http://127.0.0.1:9", sale={"mode": "vmc"})
    vend = VendSection(driver="mdb", port=str(link), baud=115200, mdb_address=2)
    alipay = dataclasses.replace(config.alipay, currency="EUR")
    output = build_vend_output(dataclasses.replace(config, vend=vend, alipay=alipay))
    assert isinstance(output, MdbVendOutput)
    try:
        output.start(listener)
        assert output.wait_configured(WAIT_S)
        assert board.config()["mdb-currency-code"] == "0x1978"
        assert board.config()["mdb-addr"] == "0x60"
    finally:
        output.close()


def test_a_request_dropped_and_replaced_while_approving_is_never_approved(
    board: MdbBoard,
    mdb: MdbVendOutput,
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The machine drops the paid-for request and the next customer selects, between the
    driver's check and its `C,VEND`: the new request must not take the old payment."""
    request = chosen_and_accepted(board, listener, mdb)
    real_approve = vend_mdb.approve

    def approve_after_a_drop_and_a_new_selection(amount: Decimal, currency: str) -> bytes:
        mdb._handle(b"c,STATUS,IDLE")  # the reader thread's work, right at that moment
        mdb._handle(b"c,STATUS,VEND,1.50,99")
        return real_approve(amount, currency)

    monkeypatch.setattr(vend_mdb, "approve", approve_after_a_drop_and_a_new_selection)
    assert mdb.dispense("K-race", request.amount, WAIT_S) is VendResult.FAILED
    assert not any(line.startswith("C,VEND") for line in board.host_lines())
    assert board.approved() is None
