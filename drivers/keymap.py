"""The kiosk's own keymap: turns a keyboard-wedge scanner's key events into the text it typed.

Decoding never goes through the console or X keymap (a French console turns digits into `&é"`);
the layout is the config's `scanner.layout`. Pure: no device access, only `evdev.ecodes` numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from evdev import ecodes as e

from kiosk.log import event, mask_partial

log = logging.getLogger(__name__)

MAX_LINE = 64  # longer than any payment code by far; beyond it the line is garbage
IDLE_RESET_S = 0.3  # a scanner types a whole code in a few ms; silence means a stray key

# Written for any character the layout cannot produce (a key we don't map, or AltGr/Ctrl held),
# so the core rejects the line with a message instead of receiving a silently shortened code.
UNKNOWN = "\ufffd"

KEY_DOWN, KEY_UP, KEY_REPEAT = 1, 0, 2
ENTER_KEYS = frozenset({e.KEY_ENTER, e.KEY_KPENTER})
SHIFT_KEYS = frozenset({e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT})
# Held with a key, these make it type something our layouts don't model (AltGr levels, shortcuts).
OTHER_MODIFIERS = frozenset(
    {
        e.KEY_LEFTCTRL,
        e.KEY_RIGHTCTRL,
        e.KEY_LEFTALT,
        e.KEY_RIGHTALT,
        e.KEY_LEFTMETA,
        e.KEY_RIGHTMETA,
    }
)
# Keys that type nothing and change nothing we track.
SILENT_KEYS = frozenset({e.KEY_NUMLOCK, e.KEY_SCROLLLOCK})


@dataclass(frozen=True)
class Key:
    """What one key types: plain, with shift, and whether caps lock acts on it like shift."""

    plain: str
    shifted: str
    caps: bool = False


Layout = dict[int, Key]

_LETTER_CODES = {chr(c): getattr(e, f"KEY_{chr(c).upper()}") for c in range(ord("a"), ord("z") + 1)}
_DIGIT_CODES = [e.KEY_1, e.KEY_2, e.KEY_3, e.KEY_4, e.KEY_5, e.KEY_6, e.KEY_7, e.KEY_8, e.KEY_9]
_DIGIT_CODES.append(e.KEY_0)

# The keypad types the same whatever the layout (scanners in keypad mode assume num lock on).
_KEYPAD: Layout = {
    **{getattr(e, f"KEY_KP{d}"): Key(str(d), str(d)) for d in range(10)},
    e.KEY_KPDOT: Key(".", "."),
    e.KEY_KPMINUS: Key("-", "-"),
    e.KEY_KPPLUS: Key("+", "+"),
    e.KEY_KPASTERISK: Key("*", "*"),
    e.KEY_KPSLASH: Key("/", "/"),
    e.KEY_SPACE: Key(" ", " "),
    e.KEY_TAB: Key("\t", "\t"),
}


def _letters(swaps: dict[str, str] | None = None) -> Layout:
    """Letter keys, named by their US key; `swaps` maps a US key letter to what it types."""
    swaps = swaps or {}
    layout: Layout = {}
    for key_letter, code in _LETTER_CODES.items():
        typed = swaps.get(key_letter, key_letter)
        layout[code] = Key(typed, typed.upper(), caps=True)
    return layout


def _digit_row(plain: str, shifted: str, caps: bool = False) -> Layout:
    return {code: Key(p, s, caps) for code, p, s in zip(_DIGIT_CODES, plain, shifted, strict=True)}


def _punctuation(keys: dict[int, str], caps_keys: frozenset[int] = frozenset()) -> Layout:
    """Punctuation keys as 'plain shifted' pairs of characters."""
    return {code: Key(pair[0], pair[1], code in caps_keys) for code, pair in keys.items()}


US: Layout = {
    **_KEYPAD,
    **_letters(),
    **_digit_row("1234567890", "!@#$%^&*()"),
    **_punctuation(
        {
            e.KEY_MINUS: "-_",
            e.KEY_EQUAL: "=+",
            e.KEY_LEFTBRACE: "[{",
            e.KEY_RIGHTBRACE: "]}",
            e.KEY_BACKSLASH: "\\|",
            e.KEY_SEMICOLON: ";:",
            e.KEY_APOSTROPHE: "'\"",
            e.KEY_GRAVE: "`~",
            e.KEY_COMMA: ",<",
            e.KEY_DOT: ".>",
            e.KEY_SLASH: "/?",
            e.KEY_102ND: "\\|",
        }
    ),
}

# German QWERTZ: Y and Z swapped, umlauts, shifted digits give !"§$%&/()=.
DE: Layout = {
    **_KEYPAD,
    **_letters({"y": "z", "z": "y"}),
    **_digit_row("1234567890", '!"§$%&/()='),
    **_punctuation(
        {
            e.KEY_MINUS: "ß?",
            e.KEY_EQUAL: "´`",
            e.KEY_LEFTBRACE: "üÜ",
            e.KEY_RIGHTBRACE: "+*",
            e.KEY_BACKSLASH: "#'",
            e.KEY_SEMICOLON: "öÖ",
            e.KEY_APOSTROPHE: "äÄ",
            e.KEY_GRAVE: "^°",
            e.KEY_COMMA: ",;",
            e.KEY_DOT: ".:",
            e.KEY_SLASH: "-_",
            e.KEY_102ND: "<>",
        },
        caps_keys=frozenset({e.KEY_LEFTBRACE, e.KEY_SEMICOLON, e.KEY_APOSTROPHE}),
    ),
}

# French AZERTY: digits need shift. Caps lock acts as shift lock on the digit row, as on the
# Windows AZERTY layout that scanners in "French keyboard" mode are set up against.
FR: Layout = {
    **_KEYPAD,
    **_letters({"q": "a", "a": "q", "w": "z", "z": "w"}),
    **_digit_row("&é\"'(-è_çà", "1234567890", caps=True),
    e.KEY_SEMICOLON: Key("m", "M", caps=True),
    **_punctuation(
        {
            e.KEY_M: ",?",
            e.KEY_MINUS: ")°",
            e.KEY_EQUAL: "=+",
            e.KEY_LEFTBRACE: "^¨",
            e.KEY_RIGHTBRACE: "$£",
            e.KEY_BACKSLASH: "*µ",
            e.KEY_APOSTROPHE: "ù%",
            e.KEY_GRAVE: "²²",
            e.KEY_COMMA: ";.",
            e.KEY_DOT: ":/",
            e.KEY_SLASH: "!§",
            e.KEY_102ND: "<>",
        }
    ),
}

LAYOUTS: dict[str, Layout] = {"us": US, "de": DE, "fr": FR}


def get_layout(name: str) -> Layout:
    """The layout called `name` (`us`, `de`, `fr`); ValueError names the known ones."""
    try:
        return LAYOUTS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"unknown scanner layout {name!r} (known: {known})") from None


def keystrokes(text: str, layout: str = "us") -> list[tuple[int, bool]]:
    """How to type `text` on `layout`: (key code, shift held) per character, for fakes and tests.

    Prefers the main keys over the keypad; raises ValueError for a character the layout lacks.
    """
    keys = get_layout(layout)
    reverse: dict[str, tuple[int, bool]] = {}
    for code, key in sorted(keys.items(), key=lambda item: item[0] in _KEYPAD):
        reverse.setdefault(key.plain, (code, False))
        reverse.setdefault(key.shifted, (code, True))
    try:
        return [reverse[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"layout {layout!r} cannot type {exc.args[0]!r}") from None


class ScanDecoder:
    """Decoder state for one input node: modifiers, caps lock and the line typed so far.

    `feed()` takes raw events and returns a line when Enter ends it. A line is dropped (and
    logged, masked) when silence of `idle_reset_s` interrupts it or it grows past `max_len`.
    """

    def __init__(
        self,
        layout: str = "us",
        idle_reset_s: float = IDLE_RESET_S,
        max_len: int = MAX_LINE,
        source: str = "",
    ) -> None:
        self.layout = get_layout(layout)
        self.idle_reset_s = idle_reset_s
        self.max_len = max_len
        self.source = source  # for log lines: which device node
        self._chars: list[str] = []
        self._too_long = False
        self._lost = False  # events were dropped: swallow the rest of this line
        self._shift: set[int] = set()
        self._other_modifiers: set[int] = set()
        self._caps = False
        self._last_key_at: float | None = None

    def feed(self, type: int, code: int, value: int, now: float) -> str | None:
        """Take one event; return the finished line on Enter, else None. Never raises."""
        if type == e.EV_SYN and code == e.SYN_DROPPED:
            # The kernel's buffer overflowed (a reader that fell behind): keys are missing, so
            # the line is dropped up to its Enter; the driver resyncs the modifiers.
            self.reset("events_lost")
            self._lost = True
            self._shift.clear()
            self._other_modifiers.clear()
            return None
        if type != e.EV_KEY:
            return None  # EV_SYN reports, EV_MSC scan codes, LEDs: nothing to decode
        if value == KEY_UP:
            self._shift.discard(code)
            self._other_modifiers.discard(code)
            return None
        if value != KEY_DOWN:
            return None  # auto-repeat: a scanner never means it

        if (
            self._last_key_at is not None
            and now - self._last_key_at > self.idle_reset_s
            and (self._chars or self._too_long or self._lost)
        ):
            self.reset("idle")
            self._lost = False
        self._last_key_at = now

        if code in SHIFT_KEYS:
            self._shift.add(code)
        elif code in OTHER_MODIFIERS:
            self._other_modifiers.add(code)
        elif code == e.KEY_CAPSLOCK:
            self._caps = not self._caps
        elif code in ENTER_KEYS:
            return self._finish_line()
        elif code not in SILENT_KEYS:
            self._type(self._char(code))
        return None

    def sync_modifiers(self, keys_down: list[int]) -> None:
        """Take the modifiers held right now from the device (after events were lost)."""
        self._shift = {k for k in keys_down if k in SHIFT_KEYS}
        self._other_modifiers = {k for k in keys_down if k in OTHER_MODIFIERS}

    def reset(self, reason: str) -> None:
        """Drop the half-typed line (logged, masked), e.g. on silence or when the device goes."""
        if self._chars or self._too_long:
            typed = "".join(self._chars)
            event(
                log,
                "scanner.dropped",
                logging.WARNING,
                reason="too_long" if self._too_long else reason,
                source=self.source,
                length=len(typed),
                partial=mask_partial(typed),
            )
        self._chars.clear()
        self._too_long = False

    def _char(self, code: int) -> str:
        key = self.layout.get(code)
        if key is None or self._other_modifiers:
            return UNKNOWN
        upper = bool(self._shift) != (self._caps and key.caps)
        return key.shifted if upper else key.plain

    def _type(self, char: str) -> None:
        if self._too_long or self._lost:
            return
        self._chars.append(char)
        if len(self._chars) > self.max_len:
            self._too_long = True  # keep swallowing until Enter, then drop the whole line

    def _finish_line(self) -> str | None:
        if self._lost:
            self._lost = False  # the tail of a line whose start was lost: nothing to hand over
            self._chars.clear()
            return None
        if self._too_long:
            self.reset("too_long")
            return None
        line = "".join(self._chars)
        self._chars.clear()
        return line or None
