"""The scanner keymap: key events in, Enter-ended lines out, on the kiosk's own layouts."""

from __future__ import annotations

import logging

import pytest
from evdev import ecodes as e
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.keymap import MAX_LINE, UNKNOWN, ScanDecoder, get_layout, keystrokes

CODE = "286543210987654321"


class Typist:
    """Feeds key events to a decoder with a clock that advances 1 ms per event."""

    def __init__(self, decoder: ScanDecoder, now: float = 1000.0) -> None:
        self.decoder = decoder
        self.now = now
        self.lines: list[str] = []

    def event(self, code: int, value: int, type: int = e.EV_KEY) -> None:
        self.now += 0.001
        line = self.decoder.feed(type, code, value, self.now)
        if line is not None:
            self.lines.append(line)

    def tap(self, code: int) -> None:
        self.event(code, 1)
        self.event(e.EV_SYN, 0, type=e.EV_SYN)
        self.event(code, 0)

    def type(self, text: str, layout: str = "us", enter: int | None = e.KEY_ENTER) -> None:
        for code, shift in keystrokes(text, layout):
            if shift:
                self.event(e.KEY_LEFTSHIFT, 1)
            self.tap(code)
            if shift:
                self.event(e.KEY_LEFTSHIFT, 0)
        if enter is not None:
            self.tap(enter)


def test_digits_followed_by_enter_give_the_code() -> None:
    t = Typist(ScanDecoder())
    t.type(CODE)
    assert t.lines == [CODE]


def test_nothing_is_returned_before_enter() -> None:
    t = Typist(ScanDecoder())
    t.type(CODE, enter=None)
    assert t.lines == []


def test_keypad_enter_ends_a_code_too() -> None:
    t = Typist(ScanDecoder())
    t.type(CODE, enter=e.KEY_KPENTER)
    assert t.lines == [CODE]


def test_keypad_digits_type_digits() -> None:
    t = Typist(ScanDecoder())
    for digit in "2812":
        t.tap(getattr(e, f"KEY_KP{digit}"))
    t.tap(e.KEY_KPENTER)
    assert t.lines == ["2812"]


def test_shift_gives_upper_case_and_shifted_punctuation() -> None:
    t = Typist(ScanDecoder())
    t.type('Ab!@#$%^&*()_+{}|:"<>?~')
    assert t.lines == ['Ab!@#$%^&*()_+{}|:"<>?~']


def test_right_shift_counts_as_shift() -> None:
    t = Typist(ScanDecoder())
    t.event(e.KEY_RIGHTSHIFT, 1)
    t.tap(e.KEY_A)
    t.event(e.KEY_RIGHTSHIFT, 0)
    t.tap(e.KEY_A)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["Aa"]


def test_shift_is_released_on_key_up() -> None:
    t = Typist(ScanDecoder())
    t.event(e.KEY_LEFTSHIFT, 1)
    t.tap(e.KEY_1)
    t.event(e.KEY_LEFTSHIFT, 0)
    t.tap(e.KEY_1)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["!1"]


def test_caps_lock_toggles_letters_on_key_down() -> None:
    t = Typist(ScanDecoder())
    t.tap(e.KEY_CAPSLOCK)
    t.tap(e.KEY_A)
    t.tap(e.KEY_1)
    t.tap(e.KEY_CAPSLOCK)
    t.tap(e.KEY_A)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["A1a"]


def test_shift_with_caps_lock_gives_lower_case() -> None:
    t = Typist(ScanDecoder())
    t.tap(e.KEY_CAPSLOCK)
    t.event(e.KEY_LEFTSHIFT, 1)
    t.tap(e.KEY_B)
    t.event(e.KEY_LEFTSHIFT, 0)
    t.tap(e.KEY_B)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["bB"]


def test_auto_repeat_is_ignored() -> None:
    t = Typist(ScanDecoder())
    t.event(e.KEY_2, 1)
    t.event(e.KEY_2, 2)
    t.event(e.KEY_2, 2)
    t.event(e.KEY_2, 0)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["2"]


def test_key_up_alone_types_nothing() -> None:
    t = Typist(ScanDecoder())
    t.event(e.KEY_5, 0)
    t.tap(e.KEY_ENTER)
    assert t.lines == []


def test_half_typed_code_is_dropped_after_silence(caplog: pytest.LogCaptureFixture) -> None:
    t = Typist(ScanDecoder(idle_reset_s=0.3))
    caplog.set_level(logging.INFO)
    t.type("2812345", enter=None)
    t.now += 0.5
    t.type(CODE)
    assert t.lines == [CODE]
    dropped = [r for r in caplog.records if r.getMessage() == "scanner.dropped"]
    assert len(dropped) == 1
    assert "2812345" not in caplog.text  # masked
    # Not even its last digits: those of a cut-short code are its middle ones, which with the
    # rescan's last 4 would give away 8 digits of one code.
    fields = next(v for v in dropped[0].__dict__.values() if isinstance(v, dict) and "partial" in v)
    assert fields["partial"] == "*******"


def test_short_pauses_inside_a_code_are_tolerated() -> None:
    t = Typist(ScanDecoder(idle_reset_s=0.3))
    t.type("2812", enter=None)
    t.now += 0.2
    t.type("3456")
    assert t.lines == ["28123456"]


def test_line_with_lost_events_is_dropped_up_to_its_enter() -> None:
    t = Typist(ScanDecoder())
    t.type("2812", enter=None)
    t.event(e.SYN_DROPPED, 0, type=e.EV_SYN)  # the kernel's buffer overflowed
    t.type("345678")  # the tail of the same code: not a code on its own
    t.type(CODE)
    assert t.lines == [CODE]


def test_modifiers_are_resynced_after_lost_events() -> None:
    t = Typist(ScanDecoder())
    t.event(e.SYN_DROPPED, 0, type=e.EV_SYN)
    t.decoder.sync_modifiers([e.KEY_LEFTSHIFT])
    t.tap(e.KEY_ENTER)
    t.tap(e.KEY_A)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["A"]


def test_enter_on_an_empty_line_gives_nothing() -> None:
    t = Typist(ScanDecoder())
    t.tap(e.KEY_ENTER)
    t.tap(e.KEY_KPENTER)
    assert t.lines == []


def test_overlong_line_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = Typist(ScanDecoder())
    t.type("9" * (MAX_LINE + 1))
    t.type(CODE)
    assert t.lines == [CODE]
    assert any(
        r.getMessage() == "scanner.dropped" and "too_long" in str(r.__dict__)
        for r in caplog.records
    )


def test_line_of_exactly_the_cap_is_kept() -> None:
    t = Typist(ScanDecoder())
    t.type("7" * MAX_LINE)
    assert t.lines == ["7" * MAX_LINE]


def test_unmapped_key_and_ctrl_chords_type_a_replacement_character() -> None:
    t = Typist(ScanDecoder())
    t.tap(e.KEY_2)
    t.tap(e.KEY_F5)
    t.event(e.KEY_LEFTCTRL, 1)
    t.tap(e.KEY_8)
    t.event(e.KEY_LEFTCTRL, 0)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["2" + UNKNOWN + UNKNOWN]


def test_non_key_events_are_ignored() -> None:
    t = Typist(ScanDecoder())
    t.event(e.MSC_SCAN, 0x7001E, type=e.EV_MSC)
    t.tap(e.KEY_1)
    t.event(e.LED_NUML, 1, type=e.EV_LED)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["1"]


def test_two_decoders_interleaved_keep_separate_state() -> None:
    a, b = ScanDecoder(), ScanDecoder()
    lines: list[str] = []
    now = 5.0
    # Scanner A holds shift while scanner B types: B's letters stay lower case.
    steps = [
        (a, e.KEY_LEFTSHIFT, 1),
        (a, e.KEY_X, 1),
        (b, e.KEY_X, 1),
        (a, e.KEY_X, 0),
        (b, e.KEY_X, 0),
        (b, e.KEY_2, 1),
        (a, e.KEY_LEFTSHIFT, 0),
        (a, e.KEY_3, 1),
        (b, e.KEY_ENTER, 1),
        (a, e.KEY_ENTER, 1),
    ]
    for decoder, code, value in steps:
        now += 0.001
        line = decoder.feed(e.EV_KEY, code, value, now)
        if line is not None:
            lines.append(line)
    assert lines == ["x2", "X3"]


def test_french_azerty_needs_shift_for_digits() -> None:
    t = Typist(ScanDecoder(layout="fr"))
    t.tap(e.KEY_2)  # unshifted on AZERTY: é
    t.event(e.KEY_LEFTSHIFT, 1)
    t.tap(e.KEY_2)
    t.tap(e.KEY_8)
    t.event(e.KEY_LEFTSHIFT, 0)
    t.tap(e.KEY_Q)  # the key labelled A on AZERTY
    t.tap(e.KEY_ENTER)
    assert t.lines == ["é28a"]


def test_french_caps_lock_gives_digits_like_shift_lock() -> None:
    t = Typist(ScanDecoder(layout="fr"))
    t.tap(e.KEY_CAPSLOCK)
    t.type("28", layout="us", enter=None)  # US key positions 2 and 8
    t.tap(e.KEY_ENTER)
    assert t.lines == ["28"]


def test_code_typed_for_french_layout_decodes_on_french_layout() -> None:
    t = Typist(ScanDecoder(layout="fr"))
    t.type(CODE, layout="fr")
    assert t.lines == [CODE]


def test_german_layout_swaps_y_and_z() -> None:
    t = Typist(ScanDecoder(layout="de"))
    t.tap(e.KEY_Y)
    t.tap(e.KEY_Z)
    t.event(e.KEY_LEFTSHIFT, 1)
    t.tap(e.KEY_3)
    t.event(e.KEY_LEFTSHIFT, 0)
    t.tap(e.KEY_ENTER)
    assert t.lines == ["zy§"]


def test_unknown_layout_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="us"):
        get_layout("dvorak")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["us", "de", "fr"]),
    st.lists(
        st.tuples(
            st.sampled_from([e.EV_SYN, e.EV_KEY, e.EV_KEY, e.EV_KEY, e.EV_MSC, e.EV_LED]),
            st.integers(min_value=0, max_value=0x2FF),
            st.integers(min_value=-1, max_value=3),
            st.sampled_from([0.0, 0.001, 0.001, 0.01, 0.5]),  # mostly scanner speed, some silences
        ),
        max_size=400,
    ),
)
def test_arbitrary_event_streams_never_raise_nor_exceed_the_cap(
    layout: str, events: list[tuple[int, int, int, float]]
) -> None:
    decoder = ScanDecoder(layout=layout)
    now = 0.0
    for type_, code, value, gap in events:
        now += gap
        line = decoder.feed(type_, code, value, now)
        assert line is None or 0 < len(line) <= MAX_LINE
