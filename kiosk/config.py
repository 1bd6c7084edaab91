"""The kiosk's TOML config file (SPEC section 3): typed sections, validation, `kiosk check`.

Each key is declared once, as a field of its section's dataclass with a `Key` (kind, range,
doc, hint) from kiosk/config_keys.py; the checker below, docs/config.md, examples/kiosk.toml
and docs/kiosk.schema.json are all derived from those fields. What no declaration can say
(key files, gateways, driver requirements, pins used twice) is checked by hand, with the
file's line and column, so `kiosk check` prints `FILE:LINE:COL: error: message (hint: ...)`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import re
import stat
import sys
import tomllib
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.signing import (
    MIN_KEY_BITS,
    SignType,
    holds_private_key,
    load_private_key,
    load_public_key,
)
from kiosk.config_keys import (
    KNOWN_LAYOUTS as KNOWN_LAYOUTS,
)
from kiosk.config_keys import (
    ROWS as ROWS,
)
from kiosk.config_keys import (
    SECTIONS as SECTIONS,
)
from kiosk.config_keys import (
    AlipaySection as AlipaySection,
)
from kiosk.config_keys import (
    Config as Config,
)
from kiosk.config_keys import (
    DeviceSection as DeviceSection,
)
from kiosk.config_keys import (
    IndicatorsSection as IndicatorsSection,
)
from kiosk.config_keys import (
    JournalSection as JournalSection,
)
from kiosk.config_keys import (
    KioskSection as KioskSection,
)
from kiosk.config_keys import (
    MerchantSection as MerchantSection,
)
from kiosk.config_keys import (
    Row,
)
from kiosk.config_keys import (
    SaleSection as SaleSection,
)
from kiosk.config_keys import (
    ScannerSection as ScannerSection,
)
from kiosk.config_keys import (
    TelemetrySection as TelemetrySection,
)
from kiosk.config_keys import (
    VendSection as VendSection,
)
from kiosk.errors import ConfigError, KeyFileError
from kiosk.iso4217 import CURRENCIES, ISO_CODES, SETTLED, mdb_currency_code
from kiosk.log import event
from kiosk.money import format_amount, parse_amount

DEFAULT_CONFIG_PATH = Path("/etc/kiosk/kiosk.toml")
KEY_DIR = "/etc/kiosk/keys/"


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the config file, printed as `FILE:LINE:COL: error: message (hint: ...)`."""

    file: str
    line: int  # 1-based
    message: str
    hint: str = ""
    warning: bool = False  # warnings are printed but do not fail `kiosk check`
    column: int = 1  # 1-based

    @property
    def severity(self) -> str:
        return "warning" if self.warning else "error"

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"
        text = f"{text} (hint: {self.hint})" if self.hint else text
        # A value can hold a newline or a control character; escaped, one problem is one line.
        return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


# --- loading and validation -------------------------------------------------------------------

log = logging.getLogger(__name__)

MAX_PIN = 27  # BCM GPIO numbers on the 40-pin header
MAX_DURATION_S = 86400.0  # one day; far beyond any sane timeout, and what timers can take
PI5_DEBUG_UART = "/dev/ttyAMA10"
# The Pi HAT's UART, and the kernel command lines that may give it to a login console.
PI_HAT_PORT = "/dev/serial0"
BOOT_CMDLINES = (Path("/boot/firmware/cmdline.txt"), Path("/boot/cmdline.txt"))
_SERIAL_CONSOLE = re.compile(r"(?:^|\s)console=(serial0|ttyAMA0|ttyS0)\b")
# What a paid sale needs before its approval can go out after the last answer (the journal's
# commit and the C,VEND line).
APPROVAL_MARGIN_S = 1.0
MAX_KEY_PARTS = 16  # dots in one key, far beyond any kiosk key (section.key)


def _key_text_kind(data: bytes) -> str:
    """What a key file holds, from its PEM labels alone (never its contents): encrypted,
    openssh, certificate, private, public, or "" (unknown: the loader says what is wrong).
    A bare base64 body (Alipay's key tool writes those) is told apart by parsing it."""
    if b"ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        return "encrypted"
    if b"OPENSSH PRIVATE KEY-----" in data:
        return "openssh"
    if b"CERTIFICATE-----" in data:
        return "certificate"
    if b"PRIVATE KEY-----" in data:
        return "private"
    if b"PUBLIC KEY-----" in data:
        return "public"
    if b"-----BEGIN" in data:
        return ""
    if holds_private_key(data):  # only to tell it apart; `rsa_key` checks it
        return "private"
    try:
        load_public_key(data)
        return "public"
    except KeyFileError:
        return ""


@functools.cache
def _time_zones() -> frozenset[str]:
    """The IANA zones this system's tzdata has (empty when it has none: then unchecked).
    Read once: walking tzdata takes tens of milliseconds."""
    import zoneinfo

    try:
        return frozenset(zoneinfo.available_timezones())
    except OSError:
        return frozenset()


def _close_matches(word: str, choices: list[str]) -> list[str]:
    """The closest of `choices` to a mistyped `word`, for a "did you mean" (difflib loads
    only when a config has a mistake, never in a daemon reading a sound one)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=1)


def payment_budget_s(alipay: AlipaySection) -> float:
    """What a scan needs before an MDB approval can go out: the pay's own timeout, two query
    intervals for an unknown outcome, and the approval. The checker warns when
    `vend.approve_within_s` leaves less; the daemon refuses a scan with less time left."""
    return alipay.pay_timeout_s + 2 * alipay.query_interval_s + APPROVAL_MARGIN_S


# The 40-pin header's GPIO pins, header number -> BCM number (gpiozero's BOARD and J8 names).
HEADER_TO_BCM = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10,
    21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19,
    36: 16, 37: 26, 38: 20, 40: 21,
}  # fmt: skip
PIN_NAME_RE = re.compile(r"(GPIO|BCM|BOARD|J8:)(\d{1,2})", re.IGNORECASE)
_MISSING = object()
_BAD = object()


class LineIndex:
    """Where each `[section]` and `key =` sits in the text; tomllib keeps no line numbers.

    Good enough for the flat two-level format of SPEC section 3: keys inside an inline table
    (`sale = { price = "1.50" }`) and dotted keys (`sale.price = ...`) are found too;
    multi-line strings are skipped.
    """

    _HEADER = re.compile(r"\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]")
    _KEY = re.compile(
        r"""((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
    )
    _INLINE_KEY = re.compile(r"""[{,]\s*([A-Za-z0-9_-]+|"[^"]*"|'[^']*')\s*=""")

    def __init__(self, text: str) -> None:
        self.sections: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        self.columns: dict[tuple[str, str], int] = {}
        lines = text.splitlines()
        self.last_line = max(1, len(lines))
        section = ""
        in_multiline: str | None = None
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            indent = len(raw) - len(raw.lstrip())
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if line.startswith("[") and not line.startswith("[["):
                header = self._HEADER.match(line)
                if header:
                    section = _unquote(header.group(1))
                    self.sections.setdefault(section, number)
                continue
            key = self._KEY.match(line)
            if key:
                *table, name = [_unquote(part) for part in key.group(1).split(".")]
                home = ".".join([section, *table] if section else table)
                self.add(home, name, number, indent + 1)
                if table:
                    self.sections.setdefault(home, number)
                rest = line[key.end() :].lstrip()
                if rest.startswith("{"):  # an inline table: its keys are on this line
                    inner = ".".join(filter(None, [home, name]))
                    self.sections.setdefault(inner, number)
                    start = len(line) - len(rest)
                    for found in self._INLINE_KEY.finditer(rest):
                        column = indent + start + found.start(1) + 1
                        self.add(inner, _unquote(found.group(1)), number, column)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
                    break

    def add(self, section: str, key: str, line: int, column: int) -> None:
        if (section, key) not in self.keys:
            self.keys[(section, key)] = line
            self.columns[(section, key)] = column

    def line(self, section: str, key: str | None = None) -> int:
        return self.position(section, key)[0]

    def position(self, section: str, key: str | None = None) -> tuple[int, int]:
        """(line, column) of the key, else of its section, else of the end of the file."""
        if key is not None and (section, key) in self.keys:
            return self.keys[(section, key)], self.columns[(section, key)]
        if section in self.sections:
            return self.sections[section], 1
        return self.last_line, 1


def _unquote(name: str) -> str:
    return name.strip().strip("\"'").strip()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number_text(value: int | float) -> str:
    """The number as text; a huge integer as its size (str() refuses over 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        try:
            return f"a number of {len(str(abs(value)))} digits"
        except ValueError:
            return "a number of over 4300 digits"
    return str(value)


def _stat(path: Path) -> tuple[os.stat_result | None, str]:
    """The path's stat, or None and why not (missing, a name too long, a NUL in it...).

    `Path.exists()` and `is_file()` swallow only some errors and raise on a name over
    NAME_MAX; a config check must turn every one into a problem.
    """
    try:
        return path.stat(), ""
    except OSError as exc:
        return None, exc.strerror or str(exc)
    except ValueError:
        if "\0" in str(path):
            return None, "the path holds a NUL character"
        return None, "the path cannot be a file name on this system"


_QUOTED = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'""")
_LONG_NUMBER = re.compile(r"\d(?:_?\d){4300,}")  # str/int refuse more digits than that


def _nesting_line(text: str) -> int:
    """The line where `[`/`{` nesting first gets deepest (quoted strings and comments skipped),
    or 1: where to point a "nested too deeply" problem, as tomllib cannot say."""
    depth = deepest = 0
    best = 1
    for number, raw in enumerate(text.split("\n"), start=1):  # TOML's lines, as tomllib counts
        line = _QUOTED.sub("", raw).split("#", 1)[0]
        for ch in line:
            if ch in "[{":
                depth += 1
                if depth > deepest:
                    deepest, best = depth, number
            elif ch in "]}":
                depth = max(0, depth - 1)
    return best


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int) and value.bit_length() > 64:
        return _number_text(value)
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


class _Checker:
    """Turns parsed TOML into a `Config`, collecting every problem instead of stopping.

    Each key is read by the validator of its declared kind (`kind_<kind>`); a wrong value is
    reported once and marked bad, so checks that depend on it stay quiet (no knock-on errors).
    """

    def __init__(
        self,
        file: str,
        index: LineIndex,
        base: Path,
        check_key_modes: bool,
        check_devices: bool,
        boot_cmdlines: Sequence[Path] = BOOT_CMDLINES,
    ) -> None:
        self.boot_cmdlines = boot_cmdlines
        self.file = file
        self.index = index
        self.base = base
        self.check_key_modes = check_key_modes
        self.check_devices = check_devices
        self.problems: list[ConfigProblem] = []
        self.tables: dict[str, dict[str, Any]] = {}
        self.bad: set[tuple[str, str]] = set()
        self.currency = "USD"

    # -- reporting

    def problem(
        self, section: str, key: str | None, message: str, hint: str = "", warning: bool = False
    ) -> None:
        line, column = self.index.position(section, key)
        self.problems.append(ConfigProblem(self.file, line, message, hint, warning, column))

    def warn(self, section: str, key: str | None, message: str, hint: str = "") -> None:
        self.problem(section, key, message, hint, warning=True)

    def refuse(self, row: Row, message: str, hint: str = "") -> object:
        self.problem(row.section, row.name, f"{row.dotted} {message}", hint or row.key.hint)
        return _BAD

    # -- reading a key by its declaration

    def raw(self, section: str, key: str) -> Any:
        return self.tables.get(section, {}).get(key, _MISSING)

    def has(self, section: str, key: str) -> bool:
        return self.raw(section, key) is not _MISSING

    def ok(self, section: str, key: str) -> bool:
        """Present and valid: a check that builds on it may speak."""
        return self.has(section, key) and (section, key) not in self.bad

    def section(self, name: str) -> dict[str, Any]:
        """Every key of the section, read and validated; defaults for the absent ones (the
        driver's own default where the key declares one)."""
        values = {key: self.value(row) for key, row in ROWS[name].items()}
        for key, row in ROWS[name].items():
            if self.ok(name, key):
                continue
            for driver, default in row.key.driver_defaults:
                if values.get("driver") == driver:
                    values[key] = default
        return values

    def value(self, row: Row) -> Any:
        raw = self.raw(row.section, row.name)
        default = None if row.required else row.default
        if raw is _MISSING:
            # A missing required section is reported once, not once per key.
            if row.required and row.section in self.tables:
                self.problem(
                    row.section,
                    None,
                    f"{row.dotted} is required",
                    f'add  {row.name} = "..."  under [{row.section}]',
                )
            return default
        result = getattr(self, f"kind_{row.key.kind}")(row, raw)
        if result is _BAD:
            self.bad.add((row.section, row.name))
            return default
        return result

    def string(self, row: Row, value: Any) -> Any:
        if isinstance(value, str):
            return value
        big = isinstance(value, int) and value.bit_length() > 64
        return self.refuse(
            row,
            f"must be a string, not {_toml_type(value)}",
            f'like  {row.name} = "..."'
            if big
            else f'put the value in quotes: {row.name} = "{value}"',
        )

    def kind_text(self, row: Row, value: Any) -> Any:
        value = self.string(row, value)
        if value is _BAD or not row.key.pattern or value == row.default == "":
            return value
        if not re.fullmatch(row.key.pattern, value):
            return self.refuse(row, f"{value!r} must be {row.key.must}")
        return value

    def kind_choice(self, row: Row, value: Any) -> Any:
        value = self.string(row, value)
        allowed = row.key.choices
        if value is _BAD or value in allowed:
            return value
        close = [a for a in allowed if a.lower() == value.lower()]
        close = close or _close_matches(value, list(allowed))
        hint = (
            f'did you mean "{close[0]}"?'
            if close
            else "write one of: " + ", ".join(f'"{a}"' for a in allowed)
        )
        return self.refuse(row, f"must be one of {', '.join(allowed)}, not {value!r}", hint)

    def kind_bool(self, row: Row, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        return self.refuse(
            row,
            f"must be true or false, not {_toml_type(value)}",
            f"write  {row.name} = true  or  {row.name} = false  (no quotes)",
        )

    def kind_duration(self, row: Row, value: Any) -> Any:
        unit = "milliseconds" if row.key.unit == "ms" else "seconds"
        if not _is_number(value):
            return self.refuse(
                row,
                f"must be a number of {unit}, not {_toml_type(value)}",
                f"write a number without quotes, like  {row.name} = {row.default:g}",
            )
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if math.isnan(number) or number <= 0:
            return self.refuse(
                row,
                f"must be greater than 0 {unit}, not {_number_text(value)}",
                "fractions are allowed, like 0.5",
            )
        limit = MAX_DURATION_S * (1000 if unit == "milliseconds" else 1)
        if number > limit:
            return self.refuse(
                row,
                f"must be at most {limit:g} {unit} (one day), not {_number_text(value)}",
                f"like  {row.name} = {row.default:g}",
            )
        return number

    def kind_int(self, row: Row, value: Any) -> Any:
        low, high = row.key.minimum, row.key.maximum
        whole = isinstance(value, int) and not isinstance(value, bool)
        if whole and (low is None or value >= low) and (high is None or value <= high):
            return value
        span = f"from {low} to {high}" if high is not None else f"greater than {(low or 1) - 1}"
        return self.refuse(
            row,
            f"must be a whole number {span}, not {_toml_type(value)}",
            f"like  {row.name} = {row.default}",
        )

    def kind_pin(self, row: Row, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PIN:
            return value
        name = PIN_NAME_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        if name:
            scheme, number = name.group(1).upper(), int(name.group(2))
            if scheme in ("GPIO", "BCM") and number <= MAX_PIN:
                return number
            if scheme in ("BOARD", "J8:") and number in HEADER_TO_BCM:
                return HEADER_TO_BCM[number]
            if scheme in ("BOARD", "J8:") and 1 <= number <= 40:
                return self.refuse(
                    row,
                    f"{value!r} is header pin {number}, which is power or ground, not a GPIO",
                    "see pinout.xyz for the header's GPIO pins",
                )
        return self.refuse(
            row,
            f"must be a BCM GPIO number from 0 to {MAX_PIN}, or a pin name like "
            f'"GPIO17" or "BOARD11", not {_toml_type(value)}',
            "use the GPIO number (GPIO17 is 17), not the header pin number (or write BOARD11)",
        )

    def no_nul(self, row: Row, value: Any) -> Any:
        value = self.string(row, value)
        if value is _BAD or "\0" not in value:
            return value
        return self.refuse(
            row, f"{value!r} holds a NUL character, which no path can", "remove the \\u0000 from it"
        )

    def kind_device(self, row: Row, value: Any) -> Any:
        """A device path (not resolved: /dev paths are absolute), or the default for ""."""
        value = self.no_nul(row, value)
        return value if value != "" else row.default

    def kind_path(self, row: Row, value: Any) -> Any:
        value = self.no_nul(row, value)
        if value is _BAD or value == "":
            return row.default if value == "" else value
        try:
            expanded = Path(value).expanduser()
        except RuntimeError:  # ~user for a user this machine does not have, or no home at all
            return self.refuse(
                row,
                f"{value!r}: no home directory for its {value.split('/')[0]}",
                "write the full path, like /etc/kiosk/keys/...",
            )
        return self.base / expanded  # an absolute value stays absolute

    def kind_url(self, row: Row, url: Any) -> Any:
        url = self.string(row, url)
        if url is _BAD or url == "":
            return row.default if url == "" else url
        like = 'like "https://globalmapi.alipay.com/gateway.do"'
        # urlsplit silently drops tabs and newlines; the kiosk would then call another URL.
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            return self.refuse(row, f"{url!r} holds spaces or control characters", like)
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError as exc:  # a broken [IPv6] host, or one that NFKC turns into '/'
            return self.refuse(row, f"{url!r} is not a valid URL: {exc}", like)
        if parts.scheme not in ("https", "http") or not host:
            return self.refuse(row, f"{url!r} is not an https URL", like)
        if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
            return self.refuse(
                row, f"{url!r} has a host name no resolver takes (a label over 63 characters)", like
            )
        if parts.scheme == "https":
            return url
        if self.raw(row.section, "allow_http") is not True:
            return self.refuse(
                row,
                "uses http, which needs allow_http = true",
                "use https; plain http is only for a gateway simulator on this machine",
            )
        if not _is_loopback(host):
            return self.refuse(
                row,
                f"allow_http only works for a loopback host (127.0.0.0/8, ::1, localhost), "
                f"not {host!r}",
                "over a network, payment codes and signed requests would travel in clear text "
                "and could be read or altered; use https",
            )
        return url

    def kind_broker(self, row: Row, url: Any) -> Any:
        """An MQTT broker: mqtts://host[:port]; mqtt:// only to loopback or with allow_plain."""
        url = self.string(row, url)
        if url is _BAD or url == "":
            return url
        like = 'like "mqtts://broker.example.net:8883"'
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            return self.refuse(row, f"{url!r} holds spaces or control characters", like)
        try:
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:  # a port that is no number, a broken [IPv6] host
            return self.refuse(row, f"{url!r} is not a valid URL: {exc}", like)
        if parts.scheme not in ("mqtts", "mqtt") or not host:
            return self.refuse(row, f"{url!r} is not an mqtts:// URL", like)
        if parts.username is not None or parts.password is not None:
            return self.refuse(
                row,
                "must not hold a user name or password",
                "set username and password_file instead: a config file is no place for secrets",
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            return self.refuse(row, f"{url!r}: a broker URL is only scheme, host and port", like)
        if port == 0:
            return self.refuse(row, f"{url!r}: port 0 is no port", like)
        if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
            return self.refuse(
                row, f"{url!r} has a host name no resolver takes (a label over 63 characters)", like
            )
        plain_allowed = self.raw(row.section, "allow_plain") is True
        if parts.scheme == "mqtt" and not _is_loopback(host) and not plain_allowed:
            return self.refuse(
                row,
                f"uses mqtt:// (no TLS) to {host!r}, which is not this machine",
                "use mqtts://; over a network, the broker password and every report "
                "would travel in clear text (allow_plain = true only if you must)",
            )
        return url

    def kind_money(self, row: Row, raw: Any) -> Any:
        """An amount of money: a string with exactly the currency's minor digits."""
        example = format_amount(Decimal(1 if row.name == "price" else 20), self.currency)
        if not isinstance(raw, str):
            return self.refuse(
                row,
                f"must be a string, not {_toml_type(raw)}",
                f'write it in quotes, like  {row.name} = "{example}": '
                "a TOML number would pass through float, and money must not",
            )
        try:
            return parse_amount(raw, self.currency)
        except ValueError as exc:
            self.problem(
                row.section, row.name, f"{row.dotted}: {exc}", f"the currency is {self.currency}"
            )
            return _BAD

    def kind_currency(self, row: Row, code: Any) -> Any:
        code = self.string(row, code)
        if code is _BAD:
            return code
        settled = "Alipay settles " + ", ".join(SETTLED)
        if not re.fullmatch(r"[A-Z]{3}", code):
            like = f'like "{code.upper()}"' if code.upper() in ISO_CODES else 'like "USD"'
            return self.refuse(row, f"{code!r} must be an ISO 4217 code in upper case", like)
        if code not in ISO_CODES:
            return self.refuse(row, f"{code!r} is not an ISO 4217 currency code", settled)
        known = CURRENCIES.get(code)
        if known is not None and known.minor_digits > 2:
            return self.refuse(
                row,
                f"{code!r} has {known.minor_digits} minor digits; the kiosk takes currencies "
                "with 0 or 2",
                settled,
            )
        if known is None or not known.settled:
            return self.refuse(row, f"{code!r} is not a currency Alipay settles", settled)
        return code

    def kind_spki_pins(self, row: Row, pins: Any) -> Any:
        """A list of public key pins, each canonical base64 of 32 bytes; a tuple of them."""
        like = f'like  {row.name} = ["{row.key.example[0]}"]'
        if not isinstance(pins, list):
            return self.refuse(row, f"must be a list of pins, not {_toml_type(pins)}", like)
        limit = row.key.maximum or len(pins)
        if len(pins) > limit:
            return self.refuse(
                row, f"holds {len(pins)} pins; at most {limit}", "pin a few keys, not every one"
            )
        for pin in pins:
            if not isinstance(pin, str):
                return self.refuse(row, f"must hold strings, not {_toml_type(pin)}", like)
            if not re.fullmatch(row.key.pattern, pin):
                shown = repr(pin) if len(pin) <= 60 else repr(pin[:60]) + "..."
                return self.refuse(row, f"{shown} must be {row.key.must}")
        return tuple(dict.fromkeys(pins))  # in order, each once

    # -- the checks

    def check(self, data: dict[str, Any], source: Path) -> Config | None:
        self.check_names(data)
        kiosk = self.check_kiosk()
        alipay = self.check_alipay()
        merchant = self.check_merchant()
        sale = self.check_sale()
        scanner = self.check_scanner()
        indicators = self.check_indicators()
        vend = self.check_vend(sale.mode)
        journal = JournalSection(**self.section("journal"))
        telemetry = self.check_telemetry()
        device = self.check_device()
        self.check_pins(indicators, vend)
        if vend.driver == "mdb":
            self.check_mdb(alipay, sale, vend)
        if kiosk is None or alipay is None or merchant is None:
            return None
        return Config(
            kiosk,
            alipay,
            merchant,
            sale,
            scanner,
            indicators,
            vend,
            source,
            journal=journal,
            telemetry=telemetry,
            device=device,
        )

    def check_names(self, data: dict[str, Any]) -> None:
        all_keys = {key: section for section, keys in ROWS.items() for key in keys}
        for name, value in data.items():
            if not isinstance(value, dict):
                home = all_keys.get(name)
                hint = f"put it under [{home}]" if home else "every key belongs under a [section]"
                self.problem("", name, f"{name!r} is outside any [section]", hint)
                continue
            if name not in SECTIONS:
                close = _close_matches(name, list(SECTIONS))
                hint = (
                    f"did you mean [{close[0]}]?"
                    if close
                    else "sections: " + ", ".join(f"[{s}]" for s in SECTIONS)
                )
                self.problem(name, None, f"unknown section [{name}]", hint)
                continue
            self.tables[name] = value
            for key in value:
                if key in ROWS[name]:
                    continue
                close = _close_matches(key, list(ROWS[name]))
                if close:
                    hint = f"did you mean {close[0]}?"
                elif key in all_keys:
                    hint = f"{key} belongs under [{all_keys[key]}]"
                else:
                    hint = f"keys of [{name}]: " + ", ".join(ROWS[name])
                self.problem(name, key, f"unknown key {key!r} in [{name}]", hint)
        for name, (section, _) in SECTIONS.items():
            if section.required and name not in data:
                required = [r.name for r in ROWS[name].values() if r.required]
                where = "at the top of the file" if self.index.last_line == 1 else "at the end"
                self.problem(
                    name,
                    None,
                    f"section [{name}] is missing",
                    f"add [{name}] with {', '.join(required)} {where}",
                )

    def check_kiosk(self) -> KioskSection | None:
        values = self.section("kiosk")
        if values["terminal_id"] is None:
            return None
        return KioskSection(**values)

    def check_alipay(self) -> AlipaySection | None:
        s = "alipay"
        values = self.section(s)
        self.currency = values["currency"]
        trans_name = values["trans_name"]
        if self.ok(s, "trans_name") and (not trans_name.strip() or len(trans_name) > 256):
            self.problem(
                s,
                "trans_name",
                "alipay.trans_name must be 1 to 256 characters",
                "it is shown in the buyer's Alipay app",
            )
        values["sign_type"] = SignType(values["sign_type"])
        values.update(self.check_keys(values["sign_type"], values))
        ca_bundle = values["ca_bundle"]
        if self.ok(s, "ca_bundle") and ca_bundle:
            found, why = _stat(ca_bundle)
            if found is None or not stat.S_ISREG(found.st_mode):
                self.problem(
                    s,
                    "ca_bundle",
                    f"alipay.ca_bundle {ca_bundle}: {why or 'not a file'}",
                    ROWS[s]["ca_bundle"].key.hint,
                )
                ca_bundle = ""
        values["ca_bundle"] = str(ca_bundle) if ca_bundle else ""
        self.check_pins_need_https(values)
        interval, deadline = values["query_interval_s"], values["query_deadline_s"]
        if interval >= deadline:
            self.problem(
                s,
                "query_interval_s",
                f"alipay.query_interval_s ({interval:g}) must be less than "
                f"query_deadline_s ({deadline:g})",
                "Alipay's guidance: query every 3 s for about 60 s, then cancel",
            )
        if values["gateway"] is None or values["partner"] is None:
            return None
        return AlipaySection(**values)

    def check_pins_need_https(self, values: dict[str, Any]) -> None:
        """Pins are checked on TLS connections only: an http gateway would go unchecked."""
        if not values["pin_sha256"]:
            return
        for key in ("gateway", "backup_gateway"):
            url = values[key]
            if url and self.ok("alipay", key) and not url.lower().startswith("https://"):
                self.problem(
                    "alipay",
                    "pin_sha256",
                    f"alipay.pin_sha256 is set, but alipay.{key} is not https: "
                    "nothing would be checked",
                    "pins are for the real gateway over https; leave them out for a simulator",
                )

    def check_keys(self, sign_type: SignType, values: dict[str, Any]) -> dict[str, Path | None]:
        """Which key files this sign type needs, and whether each named file is a usable key."""
        s = "alipay"
        needed = (
            ("md5_key_file",)
            if sign_type is SignType.MD5
            else ("private_key_file", "alipay_public_key_file")
        )
        found: dict[str, Path | None] = {}
        loaded: dict[str, Any] = {}
        for key in ("private_key_file", "alipay_public_key_file", "md5_key_file"):
            path = values[key]
            found[key] = None
            if path is None:
                if key in needed and (s, key) not in self.bad:
                    self.problem(
                        s,
                        key if self.has(s, key) else None,
                        f"sign_type {sign_type.value} needs alipay.{key}",
                        f'add  {key} = "/etc/kiosk/keys/..."  under [alipay]',
                    )
                continue
            if key not in needed:
                # Only a warning, and the file is not checked: SPEC's sample names all three.
                self.warn(
                    s,
                    key,
                    f"alipay.{key} is not used with sign_type {sign_type.value}",
                    "remove it, or set the sign_type that goes with it",
                )
                continue
            key_object = self.key_file_ok(key, path)
            if key_object is not None:
                found[key] = path
                loaded[key] = key_object
        private, public = loaded.get("private_key_file"), loaded.get("alipay_public_key_file")
        if private and public and private.public_key().public_numbers() == public.public_numbers():
            self.warn(
                s,
                "alipay_public_key_file",
                "alipay.alipay_public_key_file holds the merchant's own public key, "
                "not Alipay's: Alipay's answers would fail verification",
                "download Alipay's public key from the merchant portal",
            )
        return found

    def key_file_ok(self, key: str, path: Path) -> Any:
        """The loaded key (an RSA key object, or the MD5 key's bytes), or None after a problem."""
        s = "alipay"
        secret = ROWS[s][key].key.secret
        found, why = _stat(path)
        if found is None:
            self.problem(s, key, f"alipay.{key} {path}: {why}", "check the path")
            return None
        mode = found.st_mode
        if not stat.S_ISREG(mode):
            self.problem(s, key, f"alipay.{key} {path} is not a file", "check the path")
            return None
        if secret and self.check_key_modes and mode & 0o077:
            self.problem(
                s,
                key,
                f"alipay.{key} {path} is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); the kiosk refuses it",
                f"run: chmod 600 {path}  (owned by the kiosk user)",
            )
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.problem(
                s,
                key,
                f"alipay.{key} {path}: {exc.strerror or exc}",
                "the kiosk user must be able to read it: chown kiosk it, or run check as root",
            )
            return None
        what = f"alipay.{key} {path}"
        try:
            if key == "md5_key_file":
                md5_key = data.strip()
                if len(md5_key) != 32:
                    # Say how long it is, never what it holds.
                    raise KeyFileError(
                        f"{what} must hold the 32-character MD5 key, "
                        f"it holds {len(md5_key)} characters"
                        if md5_key
                        else f"{what} is empty"
                    )
                return md5_key
            return self.rsa_key(key, what, data)
        except KeyFileError as exc:
            self.problem(s, key, str(exc), "check that the right file is named here")
            return None

    def rsa_key(self, key: str, what: str, data: bytes) -> Any:
        """The RSA key in the file; what is wrong with it said plainly (never its contents)."""
        s, private = "alipay", key == "private_key_file"
        found = _key_text_kind(data)
        wrong: tuple[str, str] | None = None
        if found == "encrypted":
            wrong = (
                "this private key is encrypted with a passphrase; the kiosk needs it "
                "unencrypted (nobody is there to type the passphrase)",
                "write it out without one: openssl pkey -in KEY -out merchant_private_key.pem, "
                "or make the key on the kiosk itself with `kiosk keygen`",
            )
        elif found == "openssh":
            wrong = (
                "this is an OpenSSH key (ssh-keygen's own format), not a PEM RSA key",
                "convert it: ssh-keygen -p -m PEM -f KEY, or make one with `kiosk keygen`",
            )
        elif found == "certificate":
            wrong = (
                "this is a certificate, not a key",
                "name the merchant private key file here"
                if private
                else "name Alipay's public key (BEGIN PUBLIC KEY) from the merchant portal",
            )
        elif private and found == "public":
            wrong = (
                "this is a public key given as the private key; the merchant's private key "
                "goes here",
                "name the private key file (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) made "
                "with the public key you uploaded; or make a pair with `kiosk keygen`",
            )
        elif not private and found in ("private", "encrypted"):
            wrong = (
                "this is a private key; Alipay's public key goes here",
                "download Alipay's public key from the merchant portal",
            )
        if wrong is not None:
            self.problem(s, key, f"{what}: {wrong[0]}", wrong[1])
            return None
        loaded = load_private_key(data, what) if private else load_public_key(data, what)
        size = loaded.key_size
        if size < MIN_KEY_BITS:
            self.problem(
                s,
                key,
                f"{what}: an RSA key of {size} bits is too weak; the kiosk needs {MIN_KEY_BITS} "
                "or more",
                "make a new pair on the kiosk with `kiosk keygen` (or openssl genrsa 2048) and "
                "upload its public key to the merchant portal"
                if private
                else "download Alipay's current public key from the merchant portal",
            )
            return None
        assert isinstance(loaded, rsa.RSAPrivateKey | rsa.RSAPublicKey)
        return loaded

    def check_device(self) -> DeviceSection:
        """The host name, time zone and Wi-Fi that provisioning applies."""
        s = "device"
        values = self.section(s)
        zone = values["timezone"]
        if self.ok(s, "timezone") and zone:
            known = _time_zones()
            if known and zone not in known:
                close = _close_matches(zone, sorted(known))
                self.problem(
                    s,
                    "timezone",
                    f"device.timezone {zone!r} is not a time zone this system knows",
                    f'did you mean "{close[0]}"?' if close else ROWS[s]["timezone"].key.hint,
                )
        ssid = values["wifi_ssid"]
        if self.ok(s, "wifi_ssid") and ssid:
            if len(ssid.encode("utf-8")) > 32 or not ssid.isprintable():
                self.problem(
                    s,
                    "wifi_ssid",
                    "device.wifi_ssid must be 1 to 32 bytes of printable text",
                    "the network's name exactly as a phone shows it",
                )
            if not values["wifi_country"] and ("device", "wifi_country") not in self.bad:
                self.problem(
                    s,
                    "wifi_ssid",
                    "device.wifi_ssid needs device.wifi_country: the radio stays off without it",
                    'add  wifi_country = "DE"  (the ISO 3166 code of where the kiosk stands)',
                )
            if values["wifi_psk_file"] is None and ("device", "wifi_psk_file") not in self.bad:
                self.warn(
                    s,
                    "wifi_ssid",
                    f"device.wifi_ssid {ssid!r} has no wifi_psk_file: an open network",
                    "a kiosk is safer on a WPA2 network: name a file holding its passphrase",
                )
        elif not ssid:
            for key in ("wifi_psk_file", "wifi_country"):
                if self.has(s, key):
                    self.warn(s, key, f"device.{key} is not used without device.wifi_ssid")
        psk = values["wifi_psk_file"]
        if ssid and psk is not None and not self.wifi_psk_file_ok(s, "wifi_psk_file", psk):
            values["wifi_psk_file"] = None
        return DeviceSection(**values)

    def wifi_psk_file_ok(self, s: str, key: str, path: Path) -> bool:
        """A Wi-Fi passphrase file: a file, owner-only, holding a passphrase WPA takes."""
        what = f"{s}.{key} {path}"
        found, why = _stat(path)
        if found is None or not stat.S_ISREG(found.st_mode):
            self.problem(s, key, f"{what}: {why or 'not a file'}", "check the path")
            return False
        if self.check_key_modes and found.st_mode & 0o077:
            self.problem(
                s,
                key,
                f"{what} is readable by group or others "
                f"(mode {stat.S_IMODE(found.st_mode):04o}); the kiosk refuses it",
                f"run: chmod 600 {path}",
            )
            return False
        try:
            data = path.read_bytes()
        except PermissionError:
            # Root-only once installed: the service user may not read it, provisioning did.
            return ROWS[s][key].key.root_only
        except OSError as exc:
            self.problem(s, key, f"{what}: {exc.strerror or exc}", "check the path")
            return False
        phrase = data.rstrip(b"\r\n")
        hex_key = re.fullmatch(rb"[0-9A-Fa-f]{64}", phrase) is not None
        printable = all(0x20 <= b < 0x7F for b in phrase)
        if not hex_key and not (8 <= len(phrase) <= 63 and printable):
            # Say how long it is, never what it holds.
            self.problem(
                s,
                key,
                f"{what} must hold a WPA passphrase of 8 to 63 printable ASCII characters "
                f"(or 64 hex digits); it holds {len(phrase)} bytes"
                + ("" if printable else ", some not printable ASCII"),
                "one line with the passphrase only",
            )
            return False
        return True

    def check_merchant(self) -> MerchantSection | None:
        s = "merchant"
        values = self.section(s)
        for key in ("secondary_merchant_id", "store_id"):
            if self.ok(s, key) and not values[key].strip():
                self.problem(s, key, f"merchant.{key} must not be empty", "Alipay requires it")
        if values["secondary_merchant_id"] is None or values["store_id"] is None:
            return None
        return MerchantSection(**values)

    def check_sale(self) -> SaleSection:
        s, currency = "sale", self.currency
        values = self.section(s)
        price, max_price = values["price"], values["max_price"]
        if values["mode"] == "fixed" and not self.has(s, "price") and self.ok(s, "mode"):
            self.problem(
                s,
                None,
                "sale.price is required in fixed mode",
                f'add  price = "{format_amount(Decimal(1), currency)}"  under [sale]',
            )
        if values["mode"] == "vmc" and self.has(s, "price"):
            self.warn(
                s,
                "price",
                "sale.price is ignored in vmc mode: the amount in VEND wins",
                "remove it",
            )
            values["price"] = price = None
        if price is not None and max_price is not None and price > max_price:
            self.warn(
                s,
                "price",
                f"sale.price {format_amount(price, currency)} is above sale.max_price "
                f"{format_amount(max_price, currency)}",
                "max_price caps what a vending controller may ask; raise it or lower the price",
            )
        return SaleSection(**values)

    def check_scanner(self) -> ScannerSection:
        s = "scanner"
        values = self.section(s)
        driver, device, port = values["driver"], values["device"], values["port"]
        if not self.ok(s, "driver") and self.has(s, "driver"):
            driver = None  # wrong, and already said: no knock-on "evdev needs ..."
        quiet = {(s, "device"), (s, "match")} & self.bad  # already said what is wrong
        if driver == "evdev" and device is None and values["match"] is None and not quiet:
            self.problem(
                s,
                "driver",
                "scanner.driver evdev needs scanner.device or scanner.match",
                'device = "/dev/input/by-id/...-event-kbd", or match = "vendor:product"',
            )
        if driver == "evdev" and device is not None:
            self.device_exists(s, "device", device)
        if driver == "serial":
            if port is None and (s, "port") not in self.bad:
                self.problem(
                    s,
                    "driver",
                    "scanner.driver serial needs scanner.port",
                    'like  port = "/dev/ttyACM0"',
                )
            elif port is not None:
                self.serial_port_ok(s, port)
        values["match"] = values["match"] or None
        return ScannerSection(**values)

    def check_indicators(self) -> IndicatorsSection:
        s = "indicators"
        values = self.section(s)
        pins = ("green", "red", "amber", "buzzer")
        if values["driver"] == "gpio" and not any(self.has(s, pin) for pin in pins):
            self.problem(
                s,
                "driver",
                "indicators.driver gpio needs at least one pin (green, red, amber, buzzer)",
                "BCM numbers, like  green = 17",
            )
        return IndicatorsSection(**values)

    def check_vend(self, sale_mode: str) -> VendSection:
        s = "vend"
        values = self.section(s)
        driver, port = values["driver"], values["port"]
        if self.has(s, "driver") and not self.ok(s, "driver"):
            driver = None
        if driver in ("serial", "mdb"):
            if port is None and (s, "port") not in self.bad:  # mdb: never, it has a default
                self.problem(
                    s,
                    "driver" if self.has(s, "driver") else None,
                    f"vend.driver {driver} needs vend.port",
                    'like  port = "/dev/ttyAMA0"'
                    if driver == "serial"
                    else 'like  port = "/dev/serial0"',
                )
            elif port is not None:
                if driver == "mdb":
                    self.serial_console_ok(port)
                self.serial_port_ok(s, port, "port" if self.has(s, "port") else "driver")
        if driver == "relay" and not self.has(s, "relay_pin"):
            self.problem(
                s, "driver", "vend.driver relay needs vend.relay_pin", "like  relay_pin = 23"
            )
        if sale_mode == "vmc" and driver == "relay":
            self.problem(
                s,
                "driver",
                "sale.mode vmc needs vend.driver serial (or fake): a relay cannot send VEND",
                'set  driver = "serial"  and the VMC\'s port',
            )
        mode_said = ("sale", "mode") in self.bad  # a wrong mode is reported already
        if driver == "mdb" and sale_mode != "vmc" and not mode_said:
            self.problem(
                s,
                "driver",
                "vend.driver mdb needs sale.mode vmc: the vending machine sets item and price",
                'set  mode = "vmc"  under [sale]',
            )
        return VendSection(**values)

    def check_mdb(self, alipay: AlipaySection | None, sale: SaleSection, vend: VendSection) -> None:
        """The MDB cashless device: its currency code, the Pi HAT's UART, the machine's patience."""
        s = "vend"
        if self.ok("alipay", "currency"):
            try:
                mdb_currency_code(self.currency)
            except ValueError:
                self.problem(
                    "alipay",
                    "currency",
                    f"alipay.currency {self.currency} has no ISO 4217 numeric code for MDB",
                    "the MDB reader announces its currency by number; use a currency the "
                    "kiosk knows",
                )
        if alipay is not None:
            budget = payment_budget_s(alipay)
            if vend.approve_within_s < budget:
                self.warn(
                    s,
                    "approve_within_s" if self.has(s, "approve_within_s") else "driver",
                    f"vend.approve_within_s {vend.approve_within_s:g} s is less than a payment "
                    f"needs ({budget:g} s: alipay.pay_timeout_s + 2 x query_interval_s + 1 s): "
                    "every scan would be refused",
                    f"raise it to at least {budget:g} s (a little below the machine's cashless "
                    "timeout), or lower alipay.pay_timeout_s",
                )

    def serial_console_ok(self, port: str) -> None:
        """The Pi HAT's UART must not be the kernel's serial console too."""
        s = "vend"
        if port != PI_HAT_PORT:
            return
        for path in self.boot_cmdlines:
            try:
                cmdline = path.read_text(errors="replace")
            except OSError:
                continue
            console = _SERIAL_CONSOLE.search(cmdline)
            if console is not None:
                self.warn(
                    s,
                    "port" if self.has(s, "port") else "driver",
                    f"{path} gives the serial console to {console.group(1)}: the kernel's "
                    f"login prompt would talk to the MDB board on {PI_HAT_PORT}",
                    f"remove  console={console.group(1)},...  from {path} (raspi-config: "
                    "Interface Options, Serial Port, login shell No, hardware Yes)",
                )
            return

    def serial_port_ok(self, section: str, port: str, key: str = "port") -> None:
        if port == PI5_DEBUG_UART:
            self.warn(
                section,
                key,
                f"{section}.port {port} is the Raspberry Pi 5 debug console UART",
                "the header UART is /dev/ttyAMA0",
            )
        self.device_exists(section, key, port)

    def device_exists(self, section: str, key: str, device: str) -> None:
        if not self.check_devices:
            return
        found, why = _stat(Path(device))
        if found is None:
            name = "port" if key == "driver" else key  # a driver's default port
            self.warn(
                section,
                key,
                f"{section}.{name} {device} does not exist now ({why})",
                "fine if the device is plugged in later; otherwise check the path",
            )

    def check_telemetry(self) -> TelemetrySection | None:
        """[telemetry] (SPEC section 8): absent, no telemetry. The password file is a secret
        like the keys; a plain broker is refused by kind_broker unless on loopback."""
        s = "telemetry"
        if s not in self.tables:
            return None
        values = self.section(s)
        password_file = values["password_file"]
        if password_file is not None:
            if not self.secret_file_ok(s, "password_file", password_file):
                values["password_file"] = None
            elif not values["username"] and ((s, "username") not in self.bad):
                self.problem(
                    s,
                    "password_file",
                    "telemetry.password_file needs telemetry.username",
                    'add  username = "..."  under [telemetry]',
                )
        ca_bundle = values["ca_bundle"]
        if self.ok(s, "ca_bundle") and ca_bundle:
            found, why = _stat(ca_bundle)
            if found is None or not stat.S_ISREG(found.st_mode):
                self.problem(
                    s,
                    "ca_bundle",
                    f"telemetry.ca_bundle {ca_bundle}: {why or 'not a file'}",
                    ROWS[s]["ca_bundle"].key.hint,
                )
                ca_bundle = ""
        values["ca_bundle"] = str(ca_bundle) if ca_bundle else ""
        textfile = values["prometheus_textfile"]
        if self.ok(s, "prometheus_textfile") and textfile:
            path = Path(textfile)
            if path.suffix != ".prom":
                self.warn(
                    s,
                    "prometheus_textfile",
                    f"telemetry.prometheus_textfile {path}: node_exporter reads only *.prom files",
                    f"name it like {path.with_suffix('.prom')}",
                )
            if self.check_devices:
                found, why = _stat(path.parent)
                if found is None or not stat.S_ISDIR(found.st_mode):
                    self.warn(
                        s,
                        "prometheus_textfile",
                        f"telemetry.prometheus_textfile: no directory {path.parent} "
                        f"({why or 'not a directory'})",
                        "node_exporter's --collector.textfile.directory must exist",
                    )
        values["prometheus_textfile"] = str(textfile) if textfile else ""
        if not values["mqtt_url"] and not values["prometheus_textfile"]:
            quiet = {(s, "mqtt_url"), (s, "prometheus_textfile")} & self.bad
            if not quiet:
                self.warn(
                    s,
                    None,
                    "[telemetry] has neither mqtt_url nor prometheus_textfile: it reports nothing",
                    'set  mqtt_url = "mqtts://..."  or remove the section',
                )
        return TelemetrySection(**values)

    def secret_file_ok(self, section: str, key: str, path: Path) -> bool:
        """A secret that is not a key (a password): a regular file only its owner may read,
        that can be read, and is not empty. Never says what it holds."""
        found, why = _stat(path)
        dotted = f"{section}.{key}"
        if found is None:
            self.problem(section, key, f"{dotted} {path}: {why}", "check the path")
            return False
        mode = found.st_mode
        if not stat.S_ISREG(mode):
            self.problem(section, key, f"{dotted} {path} is not a file", "check the path")
            return False
        if self.check_key_modes and mode & 0o077:
            self.problem(
                section,
                key,
                f"{dotted} {path} is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); the kiosk refuses it",
                f"run: chmod 600 {path}  (owned by the kiosk user)",
            )
            return False
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.problem(
                section,
                key,
                f"{dotted} {path}: {exc.strerror or exc}",
                "the kiosk user must be able to read it: chown kiosk it, or run check as root",
            )
            return False
        if not data.strip():
            self.problem(section, key, f"{dotted} {path} is empty", "write the password in it")
            return False
        return True

    def check_pins(self, indicators: IndicatorsSection, vend: VendSection) -> None:
        used: list[tuple[str, str, int | None]] = []
        if indicators.driver == "gpio":
            used += [
                ("indicators", key, getattr(indicators, key))
                for key in ("green", "red", "amber", "buzzer")
            ]
        if vend.driver == "relay":
            used += [("vend", "relay_pin", vend.relay_pin), ("vend", "sense_pin", vend.sense_pin)]
        if vend.driver == "mdb":
            used += [("vend", "mdb_reset_pin", vend.mdb_reset_pin)]
        owner: dict[int, str] = {}
        for section, key, pin in used:
            if pin is None:
                continue
            if pin in owner:
                self.problem(
                    section,
                    key,
                    f"GPIO {pin} is used twice: {owner[pin]} and {section}.{key}",
                    "every LED, buzzer, relay and sensor needs its own pin",
                )
            else:
                owner[pin] = f"{section}.{key}"


class ConfigInvalid(ConfigError):
    """The config file has problems; `problems` holds every one, errors first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def default_config_path() -> Path:
    """`$KIOSK_CONFIG`, else /etc/kiosk/kiosk.toml (SPEC section 2)."""
    env = os.environ.get("KIOSK_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate the config; raise `ConfigInvalid` if it has any error.

    Warnings are logged, not raised. Device paths are not checked here: a scanner may be
    plugged in after the daemon starts.
    """
    config, problems = check_config(path, check_devices=False)
    errors = [p for p in problems if not p.warning]
    if errors or config is None:
        raise ConfigInvalid(errors or problems)
    for problem in problems:
        event(log, "config.warning", logging.WARNING, problem=str(problem))
    return config


def _read_config(path: Path) -> tuple[str, dict[str, Any]] | list[ConfigProblem]:
    """The config file's text and its TOML, or the one problem that keeps it from being read."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [ConfigProblem(name, 1, f"cannot read the config file: {exc.strerror}")]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return [
            ConfigProblem(
                name,
                1,
                "the file is UTF-16 (it starts with a UTF-16 byte-order mark); TOML is UTF-8",
                'save it again as "UTF-8" (Notepad: Save as, Encoding)',
            )
        ]
    try:
        # A UTF-8 byte-order mark (Notepad, PowerShell 5) is no part of the TOML: drop it.
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        return [
            ConfigProblem(
                name,
                line,
                "cannot read the config file: not UTF-8 text",
                "save it as UTF-8",
                column=column,
            )
        ]
    for number, text_line in enumerate(text.splitlines(), 1):
        # tomllib takes time quadratic in a dotted key's parts (30,000 parts: ~20 s); the
        # kiosk's keys have two. Refused before parsing, so check, run and reload never stall.
        key = text_line.partition("=")[0]
        if key.count(".") >= MAX_KEY_PARTS:
            return [
                ConfigProblem(
                    name,
                    number,
                    f"a dotted key of {key.count('.') + 1} parts; the kiosk's keys have at most 2",
                    "write keys as  key = value  under their [section]",
                )
            ]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+), column (\d+)", str(exc))
        line, column = (int(found.group(1)), int(found.group(2))) if found else (1, 1)
        return [
            ConfigProblem(
                name,
                line,
                f"not valid TOML: {re.sub(r' [(]at line .*[)]$', '', str(exc))}",
                'check quotes, brackets and "key = value" on this line or the one before',
                column=column,
            )
        ]
    except RecursionError:  # tomllib recurses once per level of [[[...]]] or {a = {...}}
        line = _nesting_line(text)
        return [
            ConfigProblem(
                name,
                line,
                "arrays or tables nested too deeply to read",
                "the kiosk's config needs no nesting at all: key = value under [section]",
            )
        ]
    except ValueError as exc:  # tomllib's int() refuses an integer of over 4300 digits
        long_number = _LONG_NUMBER.search(text)
        line = text.count("\n", 0, long_number.start()) + 1 if long_number else 1
        return [
            ConfigProblem(
                name,
                line,
                "not valid TOML: a number with far too many digits"
                if long_number
                else f"not valid TOML: {exc}",
                "no value in the kiosk's config needs more than a few digits",
            )
        ]
    return text, data


def check_config(
    path: Path,
    *,
    check_key_modes: bool = True,
    check_devices: bool = True,
    boot_cmdlines: Sequence[Path] = BOOT_CMDLINES,
) -> tuple[Config | None, list[ConfigProblem]]:
    """Validate the config and everything it points at; report every problem, sorted by line.

    The config is returned only when there is no error (warnings allowed).
    `check_key_modes=False` is for a config on the FAT boot partition, which has no modes.
    """
    parsed = _read_config(path)
    if isinstance(parsed, list):
        return None, parsed
    text, data = parsed
    name = str(path)
    checker = _Checker(
        name, LineIndex(text), path.parent, check_key_modes, check_devices, boot_cmdlines
    )
    config = checker.check(data, path)
    problems = sorted(checker.problems, key=lambda p: (p.line, p.warning))
    if any(not p.warning for p in problems):
        return None, problems
    return config, problems


def scanner_section(path: Path) -> ScannerSection | None:
    """The config's [scanner] section on its own, or None when the file cannot be read or that
    section has a mistake. `kiosk run` grabs the scanner before it knows whether the rest of
    the config lets it sell (a scanner nobody grabs types into the console)."""
    parsed = _read_config(path)
    if isinstance(parsed, list):
        return None
    text, data = parsed
    table = data.get("scanner", {})
    if not isinstance(table, dict):
        return None
    checker = _Checker(
        str(path), LineIndex(text), path.parent, check_key_modes=False, check_devices=False
    )
    checker.tables["scanner"] = table
    section = checker.check_scanner()
    if any(not problem.warning for problem in checker.problems):
        return None
    return section


def format_summary(config: Config) -> str:
    """The short summary `kiosk check` prints for a good config."""
    a, s, sc, ind, v = config.alipay, config.sale, config.scanner, config.indicators, config.vend
    gateways = a.gateway + (f", backup {a.backup_gateway}" if a.backup_gateway else "")
    if s.mode == "fixed" and s.price is not None:
        sale = f"fixed: {s.item} at {format_amount(s.price, a.currency)} {a.currency}"
    else:
        sale = "vmc: the vending controller sets item and amount"
    if s.max_price is not None:
        sale += f", at most {format_amount(s.max_price, a.currency)} {a.currency}"
    if sc.driver == "evdev":
        scanner = f"evdev {sc.device or 'match ' + repr(sc.match)}, layout {sc.layout}"
        scanner += ", grabbed" if sc.grab else ""
    elif sc.driver == "serial":
        scanner = f"serial {sc.port} at {sc.baud} baud"
    else:
        scanner = sc.driver
    if ind.driver == "gpio":
        pins = [
            f"{name} {pin}"
            for name, pin in (
                ("green", ind.green),
                ("red", ind.red),
                ("amber", ind.amber),
                ("buzzer", ind.buzzer),
            )
            if pin is not None
        ]
        indicators = f"gpio: {', '.join(pins)} ({ind.buzzer_type} buzzer)"
    else:
        indicators = ind.driver
    if v.driver == "serial":
        vend = f"serial {v.port} at {v.baud} baud, answer within {v.timeout_s:g} s"
    elif v.driver == "mdb":
        vend = f"mdb {v.port} at {v.baud} baud, cashless #{v.mdb_address}"
        vend += f", reset pin {v.mdb_reset_pin}" if v.mdb_reset_pin is not None else ""
        vend += f", approve within {v.approve_within_s:g} s, answer within {v.timeout_s:g} s"
    elif v.driver == "relay":
        vend = f"relay pin {v.relay_pin}{'' if v.relay_active_high else ' (active low)'}"
        vend += f", pulse {v.pulse_ms:g} ms"
        vend += f", drop sensor pin {v.sense_pin}" if v.sense_pin is not None else ""
    else:
        vend = v.driver
    lines = [
        f"config OK: {config.source}",
        f"  terminal    {config.kiosk.terminal_id} (journal in {config.kiosk.state_dir})"
        + ("" if config.kiosk.require_synced_clock else "; clock not required to be synced"),
        f"  alipay      partner {a.partner}, {a.sign_type.value}, {a.currency}, {gateways}",
        f"  merchant    {config.merchant.secondary_merchant_id}, store {config.merchant.store_id}",
        f"  sale        {sale}",
        f"  scanner     {scanner}",
        f"  indicators  {indicators}",
        f"  vend        {vend}",
    ]
    t = config.telemetry
    if t is not None:
        reports = []
        if t.mqtt_url:
            reports.append(f"mqtt {t.mqtt_url} as {t.topic_prefix}/{config.kiosk.terminal_id}")
            if t.homeassistant_discovery:
                reports.append("Home Assistant discovery")
        if t.prometheus_textfile:
            reports.append(f"prometheus {t.prometheus_textfile}")
        lines.append(f"  telemetry   {', '.join(reports) or 'nothing'}")
    return "\n".join(lines)


def boot_cmdlines() -> tuple[Path, ...]:
    """The kernel command lines `kiosk check` reads: $KIOSK_BOOT_CMDLINE (paths separated by
    the path separator) when set, for a check of an image or a test, else the Pi's own."""
    env = os.environ.get("KIOSK_BOOT_CMDLINE")
    if env is None:
        return BOOT_CMDLINES
    return tuple(Path(p) for p in env.split(os.pathsep) if p)


def run_check(path: Path, output: str = "text") -> int:
    """`kiosk check`: problems and warnings to stderr (exit 2 on any error), summary to stdout.

    With output "json", one object on stdout: {"file", "ok", "errors", "warnings", "problems"}.
    """
    config, problems = check_config(path, boot_cmdlines=boot_cmdlines())
    if output == "json":
        report = {
            "file": str(path),
            "ok": config is not None,
            "errors": sum(not p.warning for p in problems),
            "warnings": sum(p.warning for p in problems),
            "problems": [p.as_json() for p in problems],
        }
        print(json.dumps(report, indent=2))
        return 0 if config is not None else 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if config is None:
        errors = sum(not p.warning for p in problems)
        print(
            f"{path}: {errors} problem(s); the kiosk will not start with this config",
            file=sys.stderr,
        )
        return 2
    print(format_summary(config))
    return 0


def run_init(path: Path) -> int:
    """`kiosk init [PATH]`: write the annotated example config; never over an existing file."""
    from kiosk.config_docs import example

    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(example())
    except FileExistsError:
        print(f"kiosk: {path} exists; not overwritten", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kiosk: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}; edit it, then run: kiosk check --config {path}")
    return 0
