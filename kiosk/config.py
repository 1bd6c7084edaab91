"""The kiosk's TOML config file (SPEC section 3): typed sections, validation, `kiosk check`.

Validation collects every problem as a `ConfigProblem` with the file's line number, so
`kiosk check` can print them all as `FILE:LINE: message` with a hint.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import stat
import sys
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

from kiosk.alipay.signing import SignType, load_private_key, load_public_key
from kiosk.errors import ConfigError, KeyFileError
from kiosk.log import event
from kiosk.money import CURRENCY_RE, format_amount, parse_amount

DEFAULT_CONFIG_PATH = Path("/etc/kiosk/kiosk.toml")


@dataclass(frozen=True)
class KioskSection:
    terminal_id: str
    state_dir: Path = Path("/var/lib/kiosk")
    # false only for rigs and the demo, whose host clock the kiosk cannot judge
    require_synced_clock: bool = True


@dataclass(frozen=True)
class AlipaySection:
    gateway: str
    partner: str
    backup_gateway: str | None = None
    allow_http: bool = False
    seller_id: str = ""  # "" means: the partner
    sign_type: SignType = SignType.RSA2
    private_key_file: Path | None = None
    alipay_public_key_file: Path | None = None
    md5_key_file: Path | None = None
    ca_bundle: str = ""  # "" means: the system's trust store
    currency: str = "USD"
    trans_name: str = "Vending purchase"
    pay_timeout_s: float = 10.0
    query_interval_s: float = 3.0
    query_deadline_s: float = 60.0
    probe_interval_s: float = 300.0
    # the longest wait between background retries of query, cancel and refund
    retry_max_s: float = 300.0

    @property
    def effective_seller_id(self) -> str:
        return self.seller_id or self.partner


@dataclass(frozen=True)
class MerchantSection:
    secondary_merchant_id: str
    store_id: str
    secondary_merchant_name: str = ""
    secondary_merchant_industry: str = ""
    store_name: str = ""


@dataclass(frozen=True)
class SaleSection:
    mode: str = "fixed"  # fixed | vmc
    price: Decimal | None = None  # required in fixed mode
    item: str = "item"
    scan_timeout_s: float = 60.0
    max_price: Decimal | None = None  # vmc mode: a VEND above this is refused (None: no cap)


@dataclass(frozen=True)
class ScannerSection:
    driver: str = "evdev"  # evdev | serial | fake
    device: str | None = None  # evdev: a path
    match: str | None = None  # evdev: vendor:product, or a substring of the device name
    grab: bool = True
    layout: str = "us"  # evdev keymap
    port: str | None = None  # serial
    baud: int = 9600


@dataclass(frozen=True)
class IndicatorsSection:
    driver: str = "none"  # gpio | fake | none
    green: int | None = None
    red: int | None = None
    amber: int | None = None
    buzzer: int | None = None
    buzzer_type: str = "active"  # active | passive
    active_high: bool = True
    declined_hold_s: float = 3.0  # how long red stays on after a refusal (SPEC: 3 s)


@dataclass(frozen=True)
class VendSection:
    driver: str = "serial"  # serial | relay | fake
    port: str | None = None
    baud: int = 9600
    timeout_s: float = 30.0
    relay_pin: int | None = None
    pulse_ms: float = 500.0
    sense_pin: int | None = None
    sense_timeout_s: float = 10.0
    relay_active_high: bool = True  # many opto-isolated relay modules switch on a low pin


@dataclass(frozen=True)
class Config:
    kiosk: KioskSection
    alipay: AlipaySection
    merchant: MerchantSection
    sale: SaleSection = field(default_factory=SaleSection)
    scanner: ScannerSection = field(default_factory=ScannerSection)
    indicators: IndicatorsSection = field(default_factory=IndicatorsSection)
    vend: VendSection = field(default_factory=VendSection)
    source: Path | None = None  # the file it was read from


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the config file, printed as `FILE:LINE: message (hint)`."""

    file: str
    line: int  # 1-based; 0 when the problem is not tied to a line (a missing section)
    message: str
    hint: str = ""
    warning: bool = False  # warnings are printed but do not fail `kiosk check`

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}: {'warning: ' if self.warning else ''}{self.message}"
        text = f"{text} (hint: {self.hint})" if self.hint else text
        # A value can hold a newline or a control character; escaped, one problem is one line.
        return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# --- loading and validation -------------------------------------------------------------------

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
PARTNER_RE = re.compile(r"2088\d{12}")
MCC_RE = re.compile(r"\d{4}")
MAX_PIN = 27  # BCM GPIO numbers on the 40-pin header
MAX_DURATION_S = 86400.0  # one day; far beyond any sane timeout, and what timers can take
# The layouts drivers/keymap.py can decode; the core must not import drivers, so a test keeps
# this in step with drivers.keymap.LAYOUTS.
KNOWN_LAYOUTS = ("us", "de", "fr")
PI5_DEBUG_UART = "/dev/ttyAMA10"

_SECTIONS: dict[str, type] = {
    "kiosk": KioskSection,
    "alipay": AlipaySection,
    "merchant": MerchantSection,
    "sale": SaleSection,
    "scanner": ScannerSection,
    "indicators": IndicatorsSection,
    "vend": VendSection,
}
_KEYS: dict[str, list[str]] = {
    name: [f.name for f in fields(cls)] for name, cls in _SECTIONS.items()
}
_REQUIRED_KEYS = {
    "kiosk": ["terminal_id"],
    "alipay": ["gateway", "partner"],
    "merchant": ["secondary_merchant_id", "store_id"],
}
_MISSING = object()


class LineIndex:
    """Where each `[section]` and `key =` sits in the text; tomllib keeps no line numbers.

    Good enough for the flat two-level format of SPEC section 3; multi-line strings are skipped.
    """

    _HEADER = re.compile(r"\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]")
    _KEY = re.compile(r"""([A-Za-z0-9_-]+|"[^"]*"|'[^']*')\s*=""")

    def __init__(self, text: str) -> None:
        self.sections: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        section = ""
        in_multiline: str | None = None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if line.startswith("[") and not line.startswith("[["):
                header = self._HEADER.match(line)
                if header:
                    section = header.group(1).replace('"', "").replace("'", "").strip()
                    self.sections.setdefault(section, number)
                continue
            key = self._KEY.match(line)
            if key:
                self.keys.setdefault((section, key.group(1).strip("\"'")), number)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
                    break

    def line(self, section: str, key: str | None = None) -> int:
        if key is not None and (section, key) in self.keys:
            return self.keys[(section, key)]
        return self.sections.get(section, 0)


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
    or 0: where to point a "nested too deeply" problem, as tomllib cannot say."""
    depth = deepest = best = 0
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
    """Turns parsed TOML into a `Config`, collecting every problem instead of stopping."""

    def __init__(
        self, file: str, index: LineIndex, base: Path, check_key_modes: bool, check_devices: bool
    ) -> None:
        self.file = file
        self.index = index
        self.base = base
        self.check_key_modes = check_key_modes
        self.check_devices = check_devices
        self.problems: list[ConfigProblem] = []
        self.tables: dict[str, dict[str, Any]] = {}

    # -- reporting

    def problem(
        self, section: str, key: str | None, message: str, hint: str = "", warning: bool = False
    ) -> None:
        line = self.index.line(section, key)
        self.problems.append(ConfigProblem(self.file, line, message, hint, warning))

    def warn(self, section: str, key: str | None, message: str, hint: str = "") -> None:
        self.problem(section, key, message, hint, warning=True)

    # -- typed getters: report a wrong value and fall back to the default

    def raw(self, section: str, key: str) -> Any:
        return self.tables.get(section, {}).get(key, _MISSING)

    def has(self, section: str, key: str) -> bool:
        return self.raw(section, key) is not _MISSING

    def string(self, section: str, key: str, default: str | None, required: bool = False) -> Any:
        value = self.raw(section, key)
        if value is _MISSING:
            # A missing required section is reported once, not once per key.
            if required and section in self.tables:
                self.problem(
                    section,
                    None,
                    f"{section}.{key} is required",
                    f'add  {key} = "..."  under [{section}]',
                )
            return default
        if not isinstance(value, str):
            self.problem(
                section,
                key,
                f"{section}.{key} must be a string, not {_toml_type(value)}",
                f'like  {key} = "..."'
                if isinstance(value, int) and value.bit_length() > 64
                else f'put the value in quotes: {key} = "{value}"',
            )
            return default
        return value

    def choice(self, section: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(section, key, default)
        if value not in allowed:
            close = [a for a in allowed if a.lower() == str(value).lower()]
            close = close or difflib.get_close_matches(str(value), allowed, n=1)
            hint = (
                f'did you mean "{close[0]}"?'
                if close
                else "write one of: " + ", ".join(f'"{a}"' for a in allowed)
            )
            self.problem(
                section,
                key,
                f"{section}.{key} must be one of {', '.join(allowed)}, not {value!r}",
                hint,
            )
            return default
        return str(value)

    def boolean(self, section: str, key: str, default: bool) -> bool:
        value = self.raw(section, key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(
                section,
                key,
                f"{section}.{key} must be true or false, not {_toml_type(value)}",
                f"write  {key} = true  or  {key} = false  (no quotes)",
            )
            return default
        return value

    def duration(self, section: str, key: str, default: float) -> float:
        value = self.raw(section, key)
        if value is _MISSING:
            return default
        unit = "milliseconds" if key.endswith("_ms") else "seconds"
        if not _is_number(value):
            self.problem(
                section,
                key,
                f"{section}.{key} must be a number of {unit}, not {_toml_type(value)}",
                f"write a number without quotes, like  {key} = {default:g}",
            )
            return default
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if math.isnan(number) or number <= 0:
            self.problem(
                section,
                key,
                f"{section}.{key} must be greater than 0 {unit}, not {_number_text(value)}",
                "fractions are allowed, like 0.5",
            )
            return default
        limit = MAX_DURATION_S * (1000 if unit == "milliseconds" else 1)
        if number > limit:
            self.problem(
                section,
                key,
                f"{section}.{key} must be at most {limit:g} {unit} (one day), "
                f"not {_number_text(value)}",
                f"like  {key} = {default:g}",
            )
            return default
        return number

    def positive_int(self, section: str, key: str, default: int) -> int:
        value = self.raw(section, key)
        if value is _MISSING:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.problem(
                section,
                key,
                f"{section}.{key} must be a whole number greater than 0, not {_toml_type(value)}",
                f"like  {key} = {default}",
            )
            return default
        return value

    def pin(self, section: str, key: str) -> int | None:
        value = self.raw(section, key)
        if value is _MISSING:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PIN:
            self.problem(
                section,
                key,
                f"{section}.{key} must be a BCM GPIO number from 0 to {MAX_PIN}, "
                f"not {_toml_type(value)}",
                "use the GPIO number (GPIO17 is 17), not the header pin number",
            )
            return None
        return value

    def identifier(self, section: str, key: str, default: str | None, required: bool) -> Any:
        value = self.string(section, key, default, required)
        if isinstance(value, str) and self.has(section, key) and not ID_RE.fullmatch(value):
            self.problem(
                section,
                key,
                f"{section}.{key} {value!r} must be 1 to 32 letters, digits, '_' or '-'",
                "no spaces or other characters",
            )
            return default
        return value

    def device_path(self, section: str, key: str) -> str | None:
        """A device path (not resolved: /dev paths are absolute), or None."""
        value = self.string(section, key, None)
        if not value or self.has_nul(section, key, value):
            return None
        return str(value)

    def has_nul(self, section: str, key: str, value: str) -> bool:
        if "\0" not in value:
            return False
        self.problem(
            section,
            key,
            f"{section}.{key} {value!r} holds a NUL character, which no path can",
            "remove the \\u0000 from it",
        )
        return True

    def path(self, section: str, key: str) -> Path | None:
        value = self.string(section, key, None)
        if not value or self.has_nul(section, key, value):
            return None
        try:
            expanded = Path(value).expanduser()
        except RuntimeError:  # ~user for a user this machine does not have, or no home at all
            self.problem(
                section,
                key,
                f"{section}.{key} {value!r}: no home directory for its {value.split('/')[0]}",
                "write the full path, like /etc/kiosk/keys/...",
            )
            return None
        return self.base / expanded  # an absolute value stays absolute

    # -- the checks

    def check(self, data: dict[str, Any], source: Path) -> Config | None:
        self.check_names(data)
        kiosk = self.check_kiosk()
        alipay = self.check_alipay()
        merchant = self.check_merchant()
        sale = self.check_sale(alipay.currency if alipay else "USD")
        scanner = self.check_scanner()
        indicators = self.check_indicators()
        vend = self.check_vend(sale.mode)
        self.check_pins(indicators, vend)
        if kiosk is None or alipay is None or merchant is None:
            return None
        return Config(kiosk, alipay, merchant, sale, scanner, indicators, vend, source=source)

    def check_names(self, data: dict[str, Any]) -> None:
        all_keys = {key: section for section, keys in _KEYS.items() for key in keys}
        for name, value in data.items():
            if not isinstance(value, dict):
                home = all_keys.get(name)
                hint = f"put it under [{home}]" if home else "every key belongs under a [section]"
                self.problem("", name, f"{name!r} is outside any [section]", hint)
                continue
            if name not in _SECTIONS:
                close = difflib.get_close_matches(name, list(_SECTIONS), n=1)
                hint = (
                    f"did you mean [{close[0]}]?"
                    if close
                    else "sections: " + ", ".join(f"[{s}]" for s in _SECTIONS)
                )
                self.problem(name, None, f"unknown section [{name}]", hint)
                continue
            self.tables[name] = value
            for key in value:
                if key in _KEYS[name]:
                    continue
                close = difflib.get_close_matches(key, _KEYS[name], n=1)
                if close:
                    hint = f"did you mean {close[0]}?"
                elif key in all_keys:
                    hint = f"{key} belongs under [{all_keys[key]}]"
                else:
                    hint = f"keys of [{name}]: " + ", ".join(_KEYS[name])
                self.problem(name, key, f"unknown key {key!r} in [{name}]", hint)
        for name, required in _REQUIRED_KEYS.items():
            if name not in data:
                self.problem(
                    name,
                    None,
                    f"section [{name}] is missing",
                    f"add [{name}] with {', '.join(required)}",
                )

    def check_kiosk(self) -> KioskSection | None:
        terminal_id = self.identifier("kiosk", "terminal_id", None, required=True)
        state_dir = self.path("kiosk", "state_dir") or KioskSection.state_dir
        require_synced_clock = self.boolean(
            "kiosk", "require_synced_clock", KioskSection.require_synced_clock
        )
        if terminal_id is None:
            return None
        return KioskSection(
            terminal_id=terminal_id,
            state_dir=state_dir,
            require_synced_clock=require_synced_clock,
        )

    def check_alipay(self) -> AlipaySection | None:
        s = "alipay"
        allow_http = self.boolean(s, "allow_http", False)
        gateway = self.string(s, "gateway", None, required=True)
        if gateway is not None and not self.gateway_ok("gateway", gateway, allow_http):
            gateway = None
        backup = self.string(s, "backup_gateway", None) or None
        if backup is not None and not self.gateway_ok("backup_gateway", backup, allow_http):
            backup = None
        partner = self.string(s, "partner", None, required=True)
        if partner is not None and not PARTNER_RE.fullmatch(partner):
            self.problem(
                s,
                "partner",
                f"alipay.partner {partner!r} must be 16 digits starting with 2088",
                "the partner ID (PID) from the Alipay merchant portal",
            )
            partner = None
        seller_id = self.string(s, "seller_id", "") or ""
        if seller_id and not PARTNER_RE.fullmatch(seller_id):
            self.problem(
                s,
                "seller_id",
                f"alipay.seller_id {seller_id!r} must be 16 digits starting with 2088",
                "leave it out to use the partner ID",
            )
        currency = self.string(s, "currency", "USD")
        if not CURRENCY_RE.fullmatch(currency):
            self.problem(
                s,
                "currency",
                f"alipay.currency {currency!r} must be an ISO 4217 code in upper case",
                f'like "{currency.upper()}"' if len(currency) == 3 else 'like "USD"',
            )
            currency = "USD"
        trans_name = self.string(s, "trans_name", "Vending purchase")
        if not trans_name.strip() or len(trans_name) > 256:
            self.problem(
                s,
                "trans_name",
                "alipay.trans_name must be 1 to 256 characters",
                "it is shown in the buyer's Alipay app",
            )
        sign_type = SignType(self.choice(s, "sign_type", "RSA2", tuple(t.value for t in SignType)))
        keys = self.check_keys(sign_type)
        ca_bundle = self.path(s, "ca_bundle")
        if ca_bundle is not None:
            found, why = _stat(ca_bundle)
            if found is None or not stat.S_ISREG(found.st_mode):
                self.problem(
                    s,
                    "ca_bundle",
                    f"alipay.ca_bundle {ca_bundle}: {why or 'not a file'}",
                    'leave it out (or "") to use the system\'s trust store',
                )
                ca_bundle = None
        durations = {
            key: self.duration(s, key, getattr(AlipaySection, key))
            for key in (
                "pay_timeout_s",
                "query_interval_s",
                "query_deadline_s",
                "probe_interval_s",
                "retry_max_s",
            )
        }
        if durations["query_interval_s"] >= durations["query_deadline_s"]:
            self.problem(
                s,
                "query_interval_s",
                f"alipay.query_interval_s ({durations['query_interval_s']:g}) must be less than "
                f"query_deadline_s ({durations['query_deadline_s']:g})",
                "Alipay's guidance: query every 3 s for about 60 s, then cancel",
            )
        if gateway is None or partner is None:
            return None
        return AlipaySection(
            gateway=gateway,
            partner=partner,
            backup_gateway=backup,
            allow_http=allow_http,
            seller_id=seller_id,
            sign_type=sign_type,
            private_key_file=keys.get("private_key_file"),
            alipay_public_key_file=keys.get("alipay_public_key_file"),
            md5_key_file=keys.get("md5_key_file"),
            ca_bundle=str(ca_bundle) if ca_bundle else "",
            currency=currency,
            trans_name=trans_name,
            pay_timeout_s=durations["pay_timeout_s"],
            query_interval_s=durations["query_interval_s"],
            query_deadline_s=durations["query_deadline_s"],
            probe_interval_s=durations["probe_interval_s"],
            retry_max_s=durations["retry_max_s"],
        )

    def gateway_ok(self, key: str, url: str, allow_http: bool) -> bool:
        like = 'like "https://globalmapi.alipay.com/gateway.do"'
        # urlsplit silently drops tabs and newlines; the kiosk would then call another URL.
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            self.problem(
                "alipay", key, f"alipay.{key} {url!r} holds spaces or control characters", like
            )
            return False
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError as exc:  # a broken [IPv6] host, or one that NFKC turns into '/'
            self.problem("alipay", key, f"alipay.{key} {url!r} is not a valid URL: {exc}", like)
            return False
        if parts.scheme not in ("https", "http") or not host:
            self.problem("alipay", key, f"alipay.{key} {url!r} is not an https URL", like)
            return False
        if parts.scheme == "https":
            return True
        if not allow_http:
            self.problem(
                "alipay",
                key,
                f"alipay.{key} uses http, which needs allow_http = true",
                "use https; plain http is only for a gateway simulator on this machine",
            )
            return False
        if not _is_loopback(host):
            self.problem(
                "alipay",
                key,
                f"alipay.{key}: allow_http only works for a loopback host "
                f"(127.0.0.0/8, ::1, localhost), not {host!r}",
                "over a network, payment codes and signed requests would travel in clear text "
                "and could be read or altered; use https",
            )
            return False
        return True

    def check_keys(self, sign_type: SignType) -> dict[str, Path]:
        """Which key files this sign type needs, and whether each named file is a usable key."""
        s = "alipay"
        needed = (
            ("md5_key_file",)
            if sign_type is SignType.MD5
            else ("private_key_file", "alipay_public_key_file")
        )
        found: dict[str, Path] = {}
        loaded: dict[str, Any] = {}
        for key in ("private_key_file", "alipay_public_key_file", "md5_key_file"):
            path = self.path(s, key)
            if path is None:
                if key in needed:
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
        secret = key != "alipay_public_key_file"
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
            if key == "private_key_file":
                return load_private_key(data, what)
            if key == "alipay_public_key_file":
                return load_public_key(data, what)
            md5_key = data.strip()
            if len(md5_key) != 32:
                # Say how long it is, never what it holds.
                raise KeyFileError(
                    f"{what} must hold the 32-character MD5 key, it holds {len(md5_key)} characters"
                    if md5_key
                    else f"{what} is empty"
                )
            return md5_key
        except KeyFileError as exc:
            self.problem(s, key, str(exc), "check that the right file is named here")
            return None

    def check_merchant(self) -> MerchantSection | None:
        s = "merchant"
        merchant_id = self.string(s, "secondary_merchant_id", None, required=True)
        store_id = self.string(s, "store_id", None, required=True)
        for key, value in (("secondary_merchant_id", merchant_id), ("store_id", store_id)):
            if value is not None and not value.strip():
                self.problem(s, key, f"merchant.{key} must not be empty", "Alipay requires it")
        industry = self.string(s, "secondary_merchant_industry", "")
        if industry and not MCC_RE.fullmatch(industry):
            self.problem(
                s,
                "secondary_merchant_industry",
                f"merchant.secondary_merchant_industry {industry!r} must be a 4-digit MCC",
                'vending machines are usually "5814" or "5499"',
            )
        name = self.string(s, "secondary_merchant_name", "")
        store_name = self.string(s, "store_name", "")
        if merchant_id is None or store_id is None:
            return None
        return MerchantSection(
            secondary_merchant_id=merchant_id,
            store_id=store_id,
            secondary_merchant_name=name,
            secondary_merchant_industry=industry,
            store_name=store_name,
        )

    def check_sale(self, currency: str) -> SaleSection:
        s = "sale"
        mode = self.choice(s, "mode", "fixed", ("fixed", "vmc"))
        item = self.identifier(s, "item", SaleSection.item, required=False)
        scan_timeout_s = self.duration(s, "scan_timeout_s", SaleSection.scan_timeout_s)
        price: Decimal | None = None
        raw = self.raw(s, "price")
        if raw is _MISSING:
            if mode == "fixed":
                self.problem(
                    s,
                    None,
                    "sale.price is required in fixed mode",
                    f'add  price = "{format_amount(Decimal(1), currency)}"  under [sale]',
                )
        elif not isinstance(raw, str):
            self.problem(
                s,
                "price",
                f"sale.price must be a string, not {_toml_type(raw)}",
                f'write it in quotes, like  price = "{format_amount(Decimal(1), currency)}": '
                "a TOML number would pass through float, and money must not",
            )
        else:
            try:
                price = parse_amount(raw, currency)
            except ValueError as exc:
                self.problem(s, "price", f"sale.price: {exc}", f"the currency is {currency}")
            if mode == "vmc":
                self.warn(
                    s,
                    "price",
                    "sale.price is ignored in vmc mode: the amount in VEND wins",
                    "remove it",
                )
                price = None
        max_price = self.amount(s, "max_price", currency)
        if price is not None and max_price is not None and price > max_price:
            self.warn(
                s,
                "price",
                f"sale.price {format_amount(price, currency)} is above sale.max_price "
                f"{format_amount(max_price, currency)}",
                "max_price caps what a vending controller may ask; raise it or lower the price",
            )
        return SaleSection(
            mode=mode,
            price=price,
            item=item,
            scan_timeout_s=scan_timeout_s,
            max_price=max_price,
        )

    def amount(self, section: str, key: str, currency: str) -> Decimal | None:
        """An optional amount of money: a string with exactly the currency's minor digits."""
        raw = self.raw(section, key)
        if raw is _MISSING:
            return None
        example = format_amount(Decimal(20), currency)
        if not isinstance(raw, str):
            self.problem(
                section,
                key,
                f"{section}.{key} must be a string, not {_toml_type(raw)}",
                f'write it in quotes, like  {key} = "{example}": '
                "a TOML number would pass through float, and money must not",
            )
            return None
        try:
            return parse_amount(raw, currency)
        except ValueError as exc:
            self.problem(section, key, f"{section}.{key}: {exc}", f"the currency is {currency}")
            return None

    def check_scanner(self) -> ScannerSection:
        s = "scanner"
        driver = self.choice(s, "driver", "evdev", ("evdev", "serial", "fake"))
        device = self.device_path(s, "device")
        match = self.string(s, "match", None) or None
        port = self.device_path(s, "port")
        if driver == "evdev" and device is None and match is None:
            self.problem(
                s,
                "driver",
                "scanner.driver evdev needs scanner.device or scanner.match",
                'device = "/dev/input/by-id/...-event-kbd", or match = "vendor:product"',
            )
        if driver == "evdev" and device is not None:
            self.device_exists(s, "device", device)
        if driver == "serial":
            if port is None:
                self.problem(
                    s,
                    "driver",
                    "scanner.driver serial needs scanner.port",
                    'like  port = "/dev/ttyACM0"',
                )
            else:
                self.serial_port_ok(s, port)
        layout = self.choice(s, "layout", ScannerSection.layout, KNOWN_LAYOUTS)
        return ScannerSection(
            driver=driver,
            device=device,
            match=match,
            grab=self.boolean(s, "grab", True),
            layout=layout,
            port=port,
            baud=self.positive_int(s, "baud", ScannerSection.baud),
        )

    def check_indicators(self) -> IndicatorsSection:
        s = "indicators"
        driver = self.choice(s, "driver", "none", ("gpio", "fake", "none"))
        pins = {key: self.pin(s, key) for key in ("green", "red", "amber", "buzzer")}
        if driver == "gpio" and all(pin is None for pin in pins.values()):
            self.problem(
                s,
                "driver",
                "indicators.driver gpio needs at least one pin (green, red, amber, buzzer)",
                "BCM numbers, like  green = 17",
            )
        return IndicatorsSection(
            driver=driver,
            buzzer_type=self.choice(s, "buzzer_type", "active", ("active", "passive")),
            active_high=self.boolean(s, "active_high", True),
            declined_hold_s=self.duration(s, "declined_hold_s", 3.0),
            green=pins["green"],
            red=pins["red"],
            amber=pins["amber"],
            buzzer=pins["buzzer"],
        )

    def check_vend(self, sale_mode: str) -> VendSection:
        s = "vend"
        driver = self.choice(s, "driver", "serial", ("serial", "relay", "fake"))
        port = self.device_path(s, "port")
        relay_pin = self.pin(s, "relay_pin")
        if driver == "serial":
            if port is None:
                self.problem(
                    s,
                    "driver" if self.has(s, "driver") else None,
                    "vend.driver serial needs vend.port",
                    'like  port = "/dev/ttyAMA0"',
                )
            else:
                self.serial_port_ok(s, port)
        if driver == "relay" and relay_pin is None and not self.has(s, "relay_pin"):
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
        return VendSection(
            driver=driver,
            port=port,
            baud=self.positive_int(s, "baud", VendSection.baud),
            timeout_s=self.duration(s, "timeout_s", VendSection.timeout_s),
            relay_pin=relay_pin,
            pulse_ms=self.duration(s, "pulse_ms", VendSection.pulse_ms),
            sense_pin=self.pin(s, "sense_pin"),
            sense_timeout_s=self.duration(s, "sense_timeout_s", VendSection.sense_timeout_s),
            relay_active_high=self.boolean(s, "relay_active_high", VendSection.relay_active_high),
        )

    def serial_port_ok(self, section: str, port: str) -> None:
        if port == PI5_DEBUG_UART:
            self.warn(
                section,
                "port",
                f"{section}.port {port} is the Raspberry Pi 5 debug console UART",
                "the header UART is /dev/ttyAMA0",
            )
        self.device_exists(section, "port", port)

    def device_exists(self, section: str, key: str, device: str) -> None:
        if not self.check_devices:
            return
        found, why = _stat(Path(device))
        if found is None:
            self.warn(
                section,
                key,
                f"{section}.{key} {device} does not exist now ({why})",
                "fine if the device is plugged in later; otherwise check the path",
            )

    def check_pins(self, indicators: IndicatorsSection, vend: VendSection) -> None:
        used: list[tuple[str, str, int | None]] = []
        if indicators.driver == "gpio":
            used += [
                ("indicators", key, getattr(indicators, key))
                for key in ("green", "red", "amber", "buzzer")
            ]
        if vend.driver == "relay":
            used += [("vend", "relay_pin", vend.relay_pin), ("vend", "sense_pin", vend.sense_pin)]
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


def check_config(
    path: Path, *, check_key_modes: bool = True, check_devices: bool = True
) -> tuple[Config | None, list[ConfigProblem]]:
    """Validate the config and everything it points at; report every problem, sorted by line.

    The config is returned only when there is no error (warnings allowed).
    `check_key_modes=False` is for a config on the FAT boot partition, which has no modes.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        return None, [ConfigProblem(name, 0, f"cannot read the config file: {reason}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        return None, [
            ConfigProblem(
                name,
                int(found.group(1)) if found else 0,
                f"not valid TOML: {exc}",
                'check quotes, brackets and "key = value" on this line or the one before',
            )
        ]
    except RecursionError:  # tomllib recurses once per level of [[[...]]] or {a = {...}}
        line = _nesting_line(text)
        return None, [
            ConfigProblem(
                name,
                line,
                "arrays or tables nested too deeply to read",
                "the kiosk's config needs no nesting at all: key = value under [section]",
            )
        ]
    except ValueError as exc:  # tomllib's int() refuses an integer of over 4300 digits
        long_number = _LONG_NUMBER.search(text)
        line = text.count("\n", 0, long_number.start()) + 1 if long_number else 0
        return None, [
            ConfigProblem(
                name,
                line,
                "not valid TOML: a number with far too many digits"
                if long_number
                else f"not valid TOML: {exc}",
                "no value in the kiosk's config needs more than a few digits",
            )
        ]
    checker = _Checker(name, LineIndex(text), path.parent, check_key_modes, check_devices)
    config = checker.check(data, path)
    problems = sorted(checker.problems, key=lambda p: (p.line, p.warning))
    if any(not p.warning for p in problems):
        return None, problems
    return config, problems


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
    return "\n".join(lines)


def run_check(path: Path) -> int:
    """`kiosk check`: problems and warnings to stderr (exit 2 on any error), summary to stdout."""
    config, problems = check_config(path)
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
