"""Fuzzing both serial links with arbitrary bytes cut at arbitrary chunk boundaries: the scanner's
`LineSplitter` and the vend link's `LineFramer` + `parse_vmc_line`, alone and inside the drivers
(fed by a fake port). Chunking never changes the lines; no line over the cap is passed on."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.scanner_serial import MAX_LINE as SCAN_MAX_LINE
from drivers.scanner_serial import LineSplitter, SerialScanner
from drivers.vend_serial import SerialVendOutput
from kiosk import vmc_protocol as vmc
from kiosk.errors import VendProtocolError
from kiosk.ports import VendRequest

FUZZ = settings(deadline=None, derandomize=True, database=None)
WAIT_S = 5.0

CODE = b"281234567890123456"

# Bytes a line is made of, biased towards what matters: line ends, digits, protocol words.
_PIECES = [b"\r", b"\n", b"\r\n", b"\n\r", b" ", b"\t", b"\x00", b"\xff", b"\x80", CODE]
_PIECES += [b"PING", b"VEND ", b"CANCEL", b"SUCCESS ", b"FAILURE ", b"1.50", b"a" * 64, b"9" * 130]
stream_bytes = st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=8)), max_size=60).map(b"".join),
)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream and the same stream cut at random places (empty chunks included)."""
    data = draw(stream_bytes)
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=40)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the scanner's LineSplitter -----------------------------------------------------------------


def split_chunks(chunks: list[bytes], max_len: int = SCAN_MAX_LINE) -> list[str]:
    splitter = LineSplitter(max_len=max_len)
    return [line for chunk in chunks for line in splitter.feed(chunk)]


@settings(FUZZ, max_examples=150)
@given(stream=chunked())
def test_scanner_lines_do_not_depend_on_chunk_boundaries(
    stream: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = stream
    assert split_chunks(chunks) == split_chunks([data])


@settings(FUZZ, max_examples=100)
@given(stream=chunked(), max_len=st.integers(min_value=1, max_value=80))
def test_scanner_never_passes_on_a_line_over_the_cap(
    stream: tuple[bytes, list[bytes]], max_len: int
) -> None:
    assert all(len(line) <= max_len for line in split_chunks(stream[1], max_len))


@settings(FUZZ, max_examples=100)
@given(stream=chunked())
def test_scanner_lines_are_stripped_non_empty_and_hold_no_line_end(
    stream: tuple[bytes, list[bytes]],
) -> None:
    for line in split_chunks(stream[1]):
        assert line and line == line.strip()
        assert "\r" not in line and "\n" not in line


@settings(FUZZ, max_examples=100)
@given(garbage=stream_bytes, ending=st.sampled_from([b"\r", b"\n", b"\r\n"]))
def test_a_code_after_any_garbage_line_arrives_intact(garbage: bytes, ending: bytes) -> None:
    lines = split_chunks([garbage + b"\n" + CODE + ending])
    assert lines[-1] == CODE.decode()


class FakeSerial:
    """A serial port that hands out the given chunks one read at a time, then reads time out.

    `drained` is set by the first read after the last chunk: the reader is single-threaded, so
    by then every earlier chunk has been framed and delivered.
    """

    def __init__(self, chunks: list[bytes], stop: threading.Event) -> None:
        self._chunks = list(chunks)
        self._stop = stop
        self.drained = threading.Event()
        self.written: list[bytes] = []
        self.in_waiting = 0
        self.timeout: float | None = None  # set by the driver, as on a pyserial port

    def read(self, size: int = 1) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        self.drained.set()
        self._stop.wait(0.05)  # a read timeout, cut short when the test is done
        return b""

    def write(self, data: bytes) -> int:
        self.written.append(data)
        return len(data)

    def cancel_read(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()


def factory_for(port: FakeSerial) -> Callable[..., Any]:
    opened: list[FakeSerial] = []

    def factory(*args: Any, **kwargs: Any) -> FakeSerial:
        if opened:  # the driver must not need a second open for a healthy port
            raise OSError("opened twice")
        opened.append(port)
        return port

    return factory


@settings(FUZZ, max_examples=25)
@given(stream=chunked())
def test_serial_scanner_delivers_the_same_lines_as_the_splitter(
    stream: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = stream
    port = FakeSerial([c for c in chunks if c], threading.Event())
    delivered: list[str] = []
    scanner = SerialScanner("/dev/fake", serial_factory=factory_for(port), idle_reset_s=1e9)
    scanner.start(delivered.append)
    try:
        assert port.drained.wait(WAIT_S)
    finally:
        scanner.close()
    assert delivered == split_chunks([data])


# -- the vend link's LineFramer and parse_vmc_line ----------------------------------------------


def frame_chunks(chunks: list[bytes]) -> list[bytes | None]:
    framer = vmc.LineFramer()
    return [line for chunk in chunks for line in framer.feed(chunk)]


@settings(FUZZ, max_examples=150)
@given(stream=chunked())
def test_vend_lines_do_not_depend_on_chunk_boundaries(stream: tuple[bytes, list[bytes]]) -> None:
    data, chunks = stream
    assert frame_chunks(chunks) == frame_chunks([data])


@settings(FUZZ, max_examples=100)
@given(stream=chunked())
def test_vend_framer_never_passes_on_a_line_over_the_cap(
    stream: tuple[bytes, list[bytes]],
) -> None:
    for line in frame_chunks(stream[1]):
        if line is not None:
            assert len(line) <= vmc.MAX_LINE + 1  # the "\r" of a CRLF may still be on it
            assert b"\n" not in line


@settings(FUZZ, max_examples=100)
@given(stream=chunked())
def test_vend_framer_gives_one_entry_per_newline(stream: tuple[bytes, list[bytes]]) -> None:
    data, chunks = stream
    assert len(frame_chunks(chunks)) == data.count(b"\n")


@settings(FUZZ, max_examples=100)
@given(garbage=stream_bytes, ending=st.sampled_from([b"\n", b"\r\n"]))
def test_a_ping_after_any_garbage_line_is_understood(garbage: bytes, ending: bytes) -> None:
    lines = frame_chunks([garbage + b"\n" + b"PING" + ending])
    assert lines[-1] is not None and vmc.parse_vmc_line(lines[-1], "USD") == vmc.Ping()


_REASONS = {
    vmc.UNKNOWN_VERB,
    vmc.BAD_FIELDS,
    vmc.BAD_AMOUNT,
    vmc.BAD_ITEM,
    vmc.BAD_REF,
    vmc.TOO_LONG,
    vmc.NOT_ASCII,
    vmc.EMPTY,
}
vmc_lines = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from([*_PIECES, b"x", b"-", b"0.00", b"100000000.00", b"  "]), max_size=8
    ).map(b"".join),
    st.from_regex(rb"(PING|CANCEL|VEND|SUCCESS|FAILURE)( [!-~]{0,70}){0,3}\r?\n?", fullmatch=True),
)
currencies = st.sampled_from(["USD", "JPY", "KWD", "EUR"])


def parse_or_error(line: bytes, currency: str) -> vmc.VmcMessage | VendProtocolError:
    try:
        return vmc.parse_vmc_line(line, currency)
    except VendProtocolError as exc:
        return exc


@settings(FUZZ, max_examples=100)
@given(line=vmc_lines, currency=currencies)
def test_any_vmc_line_parses_or_raises_vend_protocol_error(line: bytes, currency: str) -> None:
    result = parse_or_error(line, currency)
    if isinstance(result, VendProtocolError):
        assert result.reason in _REASONS


@settings(FUZZ, max_examples=150)
@given(line=vmc_lines, currency=currencies)
def test_every_refusal_reason_can_be_sent_back_as_err(line: bytes, currency: str) -> None:
    result = parse_or_error(line, currency)
    if isinstance(result, VendProtocolError):
        assert vmc.err(result.reason) == b"ERR " + result.reason.encode() + b"\n"


@settings(FUZZ, max_examples=150)
@given(line=vmc_lines, currency=currencies)
def test_parsed_fields_are_what_the_kiosk_can_answer_with(line: bytes, currency: str) -> None:
    match parse_or_error(line, currency):
        case vmc.Vend(item=item, amount=amount):
            assert vmc.ITEM_RE.fullmatch(item)
            assert amount > 0
            vmc.approved("REF-1", amount, currency)  # exactly representable: never rounded
        case vmc.Success(ref=ref) | vmc.Failure(ref=ref):
            vmc.ack(ref)


@settings(FUZZ, max_examples=100)
@given(line=st.binary(min_size=vmc.MAX_LINE + 1, max_size=400))
def test_a_line_over_the_cap_is_always_too_long(line: bytes) -> None:
    body = line.removesuffix(b"\n").removesuffix(b"\r")
    if len(body) > vmc.MAX_LINE:
        result = parse_or_error(line, "USD")
        assert isinstance(result, VendProtocolError) and result.reason == vmc.TOO_LONG


class Listener:
    def __init__(self) -> None:
        self.calls: list[VendRequest | str] = []

    def on_vend_request(self, request: VendRequest) -> None:
        self.calls.append(request)

    def on_vend_cancel(self) -> None:
        self.calls.append("cancel")


def expected_link(data: bytes) -> tuple[list[bytes], list[VendRequest | str]]:
    """What the vend link must write and tell the core for `data`, from the pure framing and
    parsing: nothing was approved, so every report is for an unknown ref."""
    written: list[bytes] = []
    calls: list[VendRequest | str] = []
    for line in frame_chunks([data]):
        if line is None:
            written.append(vmc.err(vmc.TOO_LONG))
            continue
        match parse_or_error(line, "USD"):
            case VendProtocolError(reason=vmc.EMPTY):
                pass
            case VendProtocolError(reason=reason):
                written.append(vmc.err(reason))
            case vmc.Ping():
                written.append(vmc.pong())
            case vmc.Vend(item=item, amount=amount):
                calls.append(VendRequest(item, amount))
            case vmc.Cancel():
                calls.append("cancel")
            case vmc.Success() | vmc.Failure():
                written.append(vmc.err(vmc.UNKNOWN_REF))
    return written, calls


@settings(FUZZ, max_examples=25)
@given(stream=chunked())
def test_vend_link_answers_any_stream_as_framing_and_parsing_say(
    stream: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = stream
    port = FakeSerial([c for c in chunks if c], threading.Event())
    listener = Listener()
    link = SerialVendOutput("/dev/fake", 9600, "USD", serial_factory=factory_for(port))
    link.start(listener)
    try:
        assert port.drained.wait(WAIT_S)
        assert link.healthy()
    finally:
        link.close()
    assert (port.written, listener.calls) == expected_link(data)
