"""Fuzzing the scan path from outside input: key event streams through `ScanDecoder`, and any
scanned line through `PaymentCode.parse`. Never a crash, never a line past the cap."""

from __future__ import annotations

import pytest
from evdev import ecodes as e
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.keymap import (
    LAYOUTS,
    MAX_LINE,
    OTHER_MODIFIERS,
    SHIFT_KEYS,
    ScanDecoder,
    keystrokes,
)
from kiosk.errors import PaymentCodeError
from kiosk.payment_code import PaymentCode

# Fixed seed per test and no example database: the same examples on every run and every CI box.
FUZZ = settings(deadline=None, derandomize=True, database=None)

CODE = "286543210987654321"

# Key codes a scanner or a stray keyboard can send: the mapped ones, modifiers, Enter, and junk.
_INTERESTING_KEYS = sorted(
    {code for layout in LAYOUTS.values() for code in layout}
    | {e.KEY_ENTER, e.KEY_KPENTER, e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT, e.KEY_CAPSLOCK}
    | {e.KEY_LEFTCTRL, e.KEY_RIGHTALT, e.KEY_LEFTMETA, e.KEY_NUMLOCK, e.KEY_SCROLLLOCK}
)
key_codes = st.one_of(
    st.sampled_from(_INTERESTING_KEYS),
    st.integers(min_value=0, max_value=0x2FF),
    st.integers(),  # a driver never sends these, but feed() promises not to raise
)
event_types = st.one_of(
    st.just(e.EV_KEY), st.sampled_from([e.EV_SYN, e.EV_MSC, e.EV_LED, e.EV_REP]), st.integers()
)
key_values = st.one_of(st.sampled_from([0, 1, 2]), st.integers())
# Gaps between events: a scanner's few milliseconds, a human's pause, a clock jump.
gaps = st.one_of(
    st.floats(min_value=0, max_value=0.01),
    st.floats(min_value=0, max_value=2),
    st.floats(allow_nan=True, allow_infinity=True),
)
# A real clock only moves forward: for properties about what follows a pause.
real_gaps = st.floats(min_value=0, max_value=2)
events = st.lists(st.tuples(event_types, key_codes, key_values, gaps), max_size=200)


def feed_all(
    decoder: ScanDecoder, stream: list[tuple[int, int, int, float]], now: float = 1000.0
) -> list[str]:
    lines = []
    for type_, code, value, gap in stream:
        now += gap
        line = decoder.feed(type_, code, value, now)
        if line is not None:
            lines.append(line)
    return lines


def typed(text: str, layout: str, enter: int = e.KEY_ENTER) -> list[tuple[int, int, int, float]]:
    """Key events for `text` as a scanner types it: 1 ms apart, shift held where needed."""
    stream: list[tuple[int, int, int, float]] = []
    for code, shift in keystrokes(text, layout):
        if shift:
            stream.append((e.EV_KEY, e.KEY_LEFTSHIFT, 1, 0.001))
        stream += [(e.EV_KEY, code, 1, 0.001), (e.EV_SYN, 0, 0, 0.0), (e.EV_KEY, code, 0, 0.001)]
        if shift:
            stream.append((e.EV_KEY, e.KEY_LEFTSHIFT, 0, 0.001))
    return [*stream, (e.EV_KEY, enter, 1, 0.001), (e.EV_KEY, enter, 0, 0.001)]


def typable(layout: str) -> st.SearchStrategy[str]:
    chars = sorted({ch for key in LAYOUTS[layout].values() for ch in (key.plain, key.shifted)})
    return st.text(alphabet=chars, max_size=MAX_LINE)


# -- ScanDecoder ------------------------------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(stream=events, layout=st.sampled_from(sorted(LAYOUTS)))
def test_any_event_stream_never_raises(stream: list, layout: str) -> None:
    lines = feed_all(ScanDecoder(layout=layout), stream)
    assert all(isinstance(line, str) and line for line in lines)


@settings(FUZZ, max_examples=100)
@given(stream=events, max_len=st.integers(min_value=1, max_value=80))
def test_decoder_never_returns_a_line_longer_than_its_cap(stream: list, max_len: int) -> None:
    lines = feed_all(ScanDecoder(max_len=max_len), stream)
    assert all(len(line) <= max_len for line in lines)


@settings(FUZZ, max_examples=100)
@given(stream=events)
def test_decoded_lines_never_hold_a_line_ending(stream: list) -> None:
    lines = feed_all(ScanDecoder(), stream)
    assert not any("\n" in line or "\r" in line for line in lines)


@settings(FUZZ, max_examples=100)
@given(data=st.data(), layout=st.sampled_from(sorted(LAYOUTS)))
def test_any_typable_text_within_the_cap_comes_back_exactly(
    data: st.DataObject, layout: str
) -> None:
    text = data.draw(typable(layout).filter(lambda t: t.strip(" \t") == t and t))
    assert feed_all(ScanDecoder(layout=layout), typed(text, layout)) == [text]


@settings(FUZZ, max_examples=100)
@given(noise=st.lists(st.tuples(event_types, key_codes, key_values, real_gaps), max_size=200))
def test_a_code_typed_after_any_noise_and_a_pause_arrives_intact(noise: list) -> None:
    decoder = ScanDecoder()
    feed_all(decoder, noise)
    # Modifiers still held from the noise would change what the code types: a real scanner's
    # first event after a pause comes with all keys up. (Caps lock does not act on US digits.)
    releases = [(e.EV_KEY, code, 0, 0.0) for code in SHIFT_KEYS | OTHER_MODIFIERS]
    lines = feed_all(decoder, [*releases, *typed(CODE, "us")], now=1e9)
    assert lines[-1:] == [CODE]


@settings(FUZZ, max_examples=100)
@given(extra=st.integers(min_value=1, max_value=200))
def test_an_overlong_line_is_dropped_and_the_next_code_is_not_harmed(extra: int) -> None:
    decoder = ScanDecoder()
    long_text = "1" * (MAX_LINE + extra)
    lines = feed_all(decoder, [*typed(long_text, "us"), *typed(CODE, "us")])
    assert lines == [CODE]


# -- PaymentCode.parse ------------------------------------------------------------------------

scanned_text = st.one_of(
    st.text(),
    st.text(alphabet="0123456789", max_size=30),
    st.from_regex(r"\s*(2[5-9]|30|[0-9]{2})[0-9]{10,26}\s*", fullmatch=True),
    st.text(alphabet="0123456789٠١٢٣٤٥٦٧٨٩０１２３\ufffd \t\n", max_size=30),
)


def _parse_or_error(text: str) -> PaymentCode | PaymentCodeError:
    try:
        return PaymentCode.parse(text)
    except PaymentCodeError as exc:
        return exc


@settings(FUZZ, max_examples=150)
@given(text=scanned_text)
def test_any_scanned_text_parses_or_raises_payment_code_error(text: str) -> None:
    _parse_or_error(text)


@settings(FUZZ, max_examples=150)
@given(text=scanned_text)
def test_an_accepted_code_is_16_to_24_ascii_digits_starting_25_to_30(text: str) -> None:
    code = _parse_or_error(text)
    if isinstance(code, PaymentCode):
        assert code.digits.isascii() and code.digits.isdigit()
        assert 16 <= len(code.digits) <= 24
        assert 25 <= int(code.digits[:2]) <= 30


@settings(FUZZ, max_examples=150)
@given(text=scanned_text)
def test_a_refusal_never_repeats_the_whole_scan(text: str) -> None:
    refusal = _parse_or_error(text)
    if isinstance(refusal, PaymentCodeError) and len(text.strip()) > 4:
        assert text.strip() not in str(refusal)


@settings(FUZZ, max_examples=100)
@given(text=st.from_regex(r"(2[5-9]|30)[0-9]{14,22}", fullmatch=True))
def test_a_payment_code_never_shows_whole_in_its_repr(text: str) -> None:
    code = PaymentCode.parse(text)
    assert text not in repr(code) and text not in str(code)


@settings(FUZZ, max_examples=100)
@given(stream=events, layout=st.sampled_from(sorted(LAYOUTS)))
def test_whatever_the_decoder_returns_parses_or_is_refused(stream: list, layout: str) -> None:
    for line in feed_all(ScanDecoder(layout=layout), stream):
        _parse_or_error(line)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_code_typed_on_every_layout_parses(layout: str) -> None:
    (line,) = feed_all(ScanDecoder(layout=layout), typed(CODE, layout))
    assert PaymentCode.parse(line).digits == CODE
