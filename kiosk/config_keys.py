"""The config file's declaration: what a key is, besides its name, type and default.

Each key of SPEC section 3 is a field of a section dataclass in kiosk/config.py: the field gives
its name, Python type and default, and its `Key` (in the field's metadata) gives the rest — the
kind of value the technician writes, its range or choices, its unit, a one-line doc and the hint
for a wrong value. The checker, docs/config.md, examples/kiosk.toml and docs/kiosk.schema.json
all read these rows (see kiosk/config_docs.py); nothing else lists the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from kiosk.alipay.signing import SignType
from kiosk.iso4217 import SETTLED

# What the technician writes. Each kind has one validator in the checker and one JSON Schema.
Kind = Literal[
    "text",  # a string; `pattern` and `must` constrain it
    "choice",  # one of `choices`
    "bool",
    "duration",  # a number > 0 in `unit` ("s" or "ms"), at most one day
    "int",  # a whole number from `minimum` to `maximum`
    "pin",  # a BCM GPIO number, or a gpiozero pin name (GPIO17, BCM17, BOARD11, J8:11)
    "path",  # a file path; relative to the config file's folder
    "device",  # a device path, taken as written
    "url",  # the gateway: https (http only on loopback with allow_http)
    "money",  # a string with exactly the currency's minor digits
    "currency",  # an ISO 4217 code Alipay settles
    "broker",  # an MQTT broker: mqtts (mqtt only on loopback with allow_plain)
    "spki_pins",  # a list of base64 SHA-256 public key pins (kiosk/alipay/pinning.py)
]

NO_EXAMPLE = object()


@dataclass(frozen=True)
class Key:
    """One key's declaration, beside its dataclass field."""

    kind: Kind
    doc: str
    hint: str = ""  # for a wrong value
    choices: tuple[str, ...] = ()
    pattern: str = ""  # a regex the whole string must match
    must: str = ""  # what the pattern means, for the message: "must be <must>"
    minimum: int | None = None
    maximum: int | None = None
    unit: str = ""
    example: Any = NO_EXAMPLE  # what examples/kiosk.toml shows; default: the default
    commented: bool = False  # examples/kiosk.toml shows it commented out
    secret: bool = False  # a key file only its owner may read
    # `kiosk provision` copies the file this key names into /etc/kiosk/keys/ under this name
    # (every secret key is copied; its name is the example's, else section_key).
    install_as: str = ""
    root_only: bool = False  # a secret only provisioning (root) reads, never the service user
    required: bool = False  # required although the dataclass has a default
    # The default when the section's `driver` is one of these: (("mdb", 115200),).
    driver_defaults: tuple[tuple[str, Any], ...] = ()


def declare(kind: Kind, doc: str, **rest: Any) -> Mapping[str, Key]:
    """A field's metadata: `field(default=..., metadata=declare("int", "...", minimum=1))`."""
    return {"key": Key(kind, doc, **rest)}


@dataclass(frozen=True)
class Section:
    name: str
    doc: str
    required: bool = False
    # Absent means the feature is off (the example shows it commented out); present, its
    # keys are read like any other section's.
    optional: bool = False


@dataclass(frozen=True)
class Row:
    """A key as the generators and the checker see it: declaration, field and default."""

    section: str
    name: str
    key: Key
    default: Any  # dataclasses.MISSING when required
    type_name: str

    @property
    def required(self) -> bool:
        return self.key.required or self.default is dataclasses.MISSING

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def rows_of(section: str, cls: type) -> list[Row]:
    found = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("key")
        if declared is None:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        found.append(Row(section, f.name, declared, default, str(f.type)))
    return found


# --- the keys of SPEC section 3 -----------------------------------------------------------


ID = r"[A-Za-z0-9_-]{1,32}"
ID_MUST = "1 to 32 letters, digits, '_' or '-'"
# Beyond any UART or USB serial port, and what the C int of termios still takes.
MAX_BAUD = 4_000_000
PID = r"2088\d{12}"
PID_MUST = "16 digits starting with 2088"
KEY_DIR = "/etc/kiosk/keys/"
MAX_PINS = 16
# Base64 of exactly 32 bytes, canonical: 42 characters, one whose last two bits are zero
# (the hash's last 4 bits), then one '='.
PIN = r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="
PIN_MUST = "base64 of a SHA-256 (44 characters ending in '=')"
# The form of a pin, for the example only (the SHA-256 of nothing).
EXAMPLE_PIN = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def _seconds(default: float, doc: str) -> Any:
    return field(default=default, metadata=declare("duration", doc, unit="s"))


@dataclass(frozen=True)
class KioskSection:
    terminal_id: str = field(
        metadata=declare(
            "text",
            "The machine's name, sent to Alipay as extend_info.terminal_id.",
            pattern=ID,
            must=ID_MUST,
            hint="no spaces or other characters",
            example="VM-0042",
        )
    )
    state_dir: Path = field(
        default=Path("/var/lib/kiosk"),
        metadata=declare("path", "Where the journal lives; relative to this file's folder."),
    )
    require_synced_clock: bool = field(
        default=True,
        metadata=declare(
            "bool",
            "Stay out of service until the clock is synchronised; false only for rigs.",
        ),
    )


@dataclass(frozen=True)
class AlipaySection:
    gateway: str = field(
        metadata=declare(
            "url",
            "Alipay's MAPI gateway; https unless allow_http = true.",
            example="https://globalmapi.alipay.com/gateway.do",
        )
    )
    partner: str = field(
        metadata=declare(
            "text",
            "The partner ID (PID) from the Alipay merchant portal.",
            pattern=PID,
            must=PID_MUST,
            hint="the partner ID (PID) from the Alipay merchant portal",
            example="2088101122334455",
        )
    )
    backup_gateway: str | None = field(
        default=None,
        metadata=declare(
            "url",
            "A second gateway, tried when the first cannot be reached.",
            example="https://intlmapi.alipay.com/gateway.do",
            commented=True,
        ),
    )
    allow_http: bool = field(
        default=False,
        metadata=declare("bool", "Allow http:// for a gateway simulator on loopback only."),
    )
    seller_id: str = field(
        default="",
        metadata=declare(
            "text",
            'The seller ID; "" means the partner.',
            pattern=PID,
            must=PID_MUST,
            hint="leave it out to use the partner ID",
        ),
    )
    sign_type: SignType = field(
        default=SignType.RSA2,
        metadata=declare(
            "choice",
            "How requests are signed: RSA2 (SHA-256, recommended), RSA (SHA-1) or MD5.",
            choices=tuple(t.value for t in SignType),
        ),
    )
    private_key_file: Path | None = field(
        default=None,
        metadata=declare(
            "path",
            "RSA, RSA2: the merchant's private key, PKCS#1 or PKCS#8 PEM, mode 600.",
            example=KEY_DIR + "merchant_private_key.pem",
            secret=True,
        ),
    )
    alipay_public_key_file: Path | None = field(
        default=None,
        metadata=declare(
            "path",
            "RSA, RSA2: Alipay's public key, from the merchant portal.",
            example=KEY_DIR + "alipay_public_key.pem",
            install_as="alipay_public_key.pem",
        ),
    )
    md5_key_file: Path | None = field(
        default=None,
        metadata=declare(
            "path",
            "MD5: the 32-character MD5 key, mode 600.",
            example=KEY_DIR + "md5.key",
            commented=True,
            secret=True,
        ),
    )
    ca_bundle: str = field(
        default="",
        metadata=declare(
            "path",
            'CA certificates to trust for the gateway; "" means the system\'s trust store.',
            hint='leave it out (or "") to use the system\'s trust store',
            install_as="ca_bundle.pem",
        ),
    )
    pin_sha256: tuple[str, ...] = field(
        default=(),
        metadata=declare(
            "spki_pins",
            "Optional SPKI pins (docs/gateway-tls.md): a TLS connection to the gateway whose "
            "verified chain holds none of these keys is closed before anything is sent.",
            hint="one pin per key, made with  openssl x509 -in CERT.pem -pubkey -noout | "
            "openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            pattern=PIN,
            must=PIN_MUST,
            maximum=MAX_PINS,
            example=(EXAMPLE_PIN,),
            commented=True,
        ),
    )
    currency: str = field(
        default="USD",
        metadata=declare(
            "currency", "ISO 4217 code of a currency Alipay settles.", choices=SETTLED
        ),
    )
    trans_name: str = field(
        default="Vending purchase",
        metadata=declare("text", "Shown in the buyer's Alipay app; 1 to 256 characters."),
    )
    pay_timeout_s: float = _seconds(10.0, "Read timeout of the pay request.")
    query_interval_s: float = _seconds(3.0, "Alipay's guidance: query every 3 s ...")
    query_deadline_s: float = _seconds(60.0, "... up to about 60 s, then cancel.")
    probe_interval_s: float = _seconds(
        300.0, "Out of service: how often to retry a signed request."
    )
    retry_max_s: float = _seconds(
        300.0, "The longest wait between background retries of query, cancel, refund."
    )

    @property
    def effective_seller_id(self) -> str:
        return self.seller_id or self.partner


MCC = {"pattern": r"\d{4}", "must": "a 4-digit MCC"}


@dataclass(frozen=True)
class MerchantSection:
    secondary_merchant_id: str = field(
        metadata=declare("text", "Your ID for the merchant, in extend_info.", example="M-001")
    )
    store_id: str = field(
        metadata=declare("text", "Your ID for the store, in extend_info.", example="S-042")
    )
    secondary_merchant_name: str = field(
        default="", metadata=declare("text", "The merchant's name.", example="Acme Vending")
    )
    secondary_merchant_industry: str = field(
        default="",
        metadata=declare(
            "text",
            "The merchant category code (MCC).",
            **MCC,
            hint='vending machines are usually "5814" or "5499"',
            example="5814",
        ),
    )
    store_name: str = field(
        default="", metadata=declare("text", "The store's name.", example="Acme, Central Station")
    )


@dataclass(frozen=True)
class SaleSection:
    mode: str = field(
        default="fixed",
        metadata=declare(
            "choice",
            "fixed: one price, scan to buy; vmc: the vending controller asks (VEND).",
            choices=("fixed", "vmc"),
        ),
    )
    price: Decimal | None = field(
        default=None,
        metadata=declare("money", "Fixed mode: the price, in quotes.", example="1.50"),
    )
    item: str = field(
        default="item",
        metadata=declare(
            "text",
            "Fixed mode: the item's name in the journal.",
            pattern=ID,
            must=ID_MUST,
            hint="no spaces or other characters",
            example="coffee",
        ),
    )
    scan_timeout_s: float = _seconds(60.0, "Vmc mode: how long to wait for a scan.")
    max_price: Decimal | None = field(
        default=None,
        metadata=declare(
            "money",
            "Vmc and mdb: a VEND above this is refused; no cap when absent.",
            example="20.00",
            commented=True,
        ),
    )


PIN = "a BCM GPIO number (GPIO17 is 17), or a gpiozero pin name"


@dataclass(frozen=True)
class ScannerSection:
    driver: str = field(
        default="evdev",
        metadata=declare(
            "choice",
            "evdev: a USB keyboard-mode scanner; serial: one code per line; fake.",
            choices=("evdev", "serial", "fake"),
        ),
    )
    device: str | None = field(
        default=None,
        metadata=declare(
            "device",
            "evdev: the scanner's input device.",
            example="/dev/input/by-id/usb-Honeywell_Scanner-event-kbd",
        ),
    )
    match: str | None = field(
        default=None,
        metadata=declare(
            "text",
            "evdev, instead of device: vendor:product, or a part of the device's name.",
            example="0c2e:0b61",
            commented=True,
        ),
    )
    grab: bool = field(
        default=True, metadata=declare("bool", "evdev: take the device for the kiosk alone.")
    )
    layout: str = field(
        default="us",
        metadata=declare(
            "choice",
            "evdev: the keyboard layout the scanner types in.",
            # The layouts drivers/keymap.py can decode; a test keeps them in step.
            choices=("us", "de", "fr"),
        ),
    )
    port: str | None = field(
        default=None,
        metadata=declare(
            "device", "serial: the scanner's port.", example="/dev/ttyACM0", commented=True
        ),
    )
    baud: int = field(
        default=9600,
        metadata=declare(
            "int", "serial: the line speed.", minimum=1, maximum=MAX_BAUD, unit="baud"
        ),
    )


def _pin(doc: str, example: int | None = None) -> Any:
    extra = {} if example is None else {"example": example}
    return field(default=None, metadata=declare("pin", doc, hint=PIN, **extra))


@dataclass(frozen=True)
class IndicatorsSection:
    driver: str = field(
        default="none",
        metadata=declare(
            "choice",
            "gpio: LEDs and a buzzer on the header; fake; none.",
            choices=("gpio", "fake", "none"),
            example="gpio",
        ),
    )
    green: int | None = _pin("The green LED's pin.", 17)
    red: int | None = _pin("The red LED's pin.", 27)
    amber: int | None = _pin("The amber LED's pin.", 22)
    buzzer: int | None = _pin("The buzzer's pin.", 18)
    buzzer_type: str = field(
        default="active",
        metadata=declare(
            "choice", "active: on/off; passive: tones.", choices=("active", "passive")
        ),
    )
    active_high: bool = field(
        default=True, metadata=declare("bool", "false when a low pin lights the LEDs.")
    )
    declined_hold_s: float = _seconds(3.0, "How long red stays on after a refusal.")


@dataclass(frozen=True)
class VendSection:
    driver: str = field(
        default="serial",
        metadata=declare(
            "choice",
            "serial: a VMC link (SPEC 4); relay: pulse a pin; mdb: an MDB cashless device; fake.",
            choices=("serial", "relay", "mdb", "fake"),
        ),
    )
    port: str | None = field(
        default=None,
        metadata=declare(
            "device",
            "serial, mdb: the controller's port (mdb: the Pi HAT's UART by default).",
            example="/dev/ttyAMA0",
            driver_defaults=(("mdb", "/dev/serial0"),),
        ),
    )
    baud: int = field(
        default=9600,
        metadata=declare(
            "int",
            "serial, mdb: the line speed (the MDB boards run at 115200).",
            minimum=1,
            maximum=MAX_BAUD,
            unit="baud",
            driver_defaults=(("mdb", 115200),),
        ),
    )
    timeout_s: float = _seconds(30.0, "serial, mdb: wait for SUCCESS/FAILURE after APPROVED.")
    relay_pin: int | None = _pin("relay: the output pulsed to release the product.")
    pulse_ms: float = field(
        default=500.0, metadata=declare("duration", "relay: the pulse's length.", unit="ms")
    )
    sense_pin: int | None = _pin("relay, optional: a drop sensor that confirms the vend.")
    sense_timeout_s: float = _seconds(10.0, "relay: how long to wait for the sensor.")
    relay_active_high: bool = field(
        default=True, metadata=declare("bool", "false for relay modules that switch on a low pin.")
    )
    mdb_address: int = field(
        default=1,
        metadata=declare(
            "int", "mdb: cashless device #1 (MDB 0x10) or #2 (0x60).", minimum=1, maximum=2
        ),
    )
    mdb_reset_pin: int | None = _pin("mdb: the pin that resets the Pi HAT; omit for MDB-USB.")
    approve_within_s: float = _seconds(60.0, "mdb: no approval later than this after VEND.")


@dataclass(frozen=True)
class JournalSection:
    keep_days: int = field(
        default=90,
        metadata=declare(
            "int",
            "Final transactions older than this fold into daily totals.",
            minimum=1,
            maximum=3650,
            unit="days",
        ),
    )


TOPIC_LEVELS = r"[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}"


@dataclass(frozen=True)
class TelemetrySection:
    mqtt_url: str = field(
        default="",
        metadata=declare(
            "broker",
            'The MQTT broker, mqtts://host[:port]; "" for no MQTT (Prometheus only).',
            hint='like "mqtts://broker.example.net:8883"',
            example="mqtts://broker.example.net:8883",
        ),
    )
    allow_plain: bool = field(
        default=False,
        metadata=declare("bool", "Allow mqtt:// (no TLS) to a broker that is not on this machine."),
    )
    username: str = field(
        default="",
        metadata=declare(
            "text",
            "The user name the kiosk logs in to the broker with.",
            pattern=r"[\x21-\x7e]{1,128}",
            must="1 to 128 printable characters without spaces",
            example="VM-0042",
        ),
    )
    password_file: Path | None = field(
        default=None,
        metadata=declare(
            "path",
            "A file holding the broker password, mode 600.",
            example=KEY_DIR + "mqtt.pass",
            secret=True,
        ),
    )
    ca_bundle: str = field(
        default="",
        metadata=declare(
            "path",
            'CA certificates to trust for the broker; "" means the system\'s trust store.',
            hint='leave it out (or "") to use the system\'s trust store',
            install_as="mqtt_ca.pem",
        ),
    )
    topic_prefix: str = field(
        default="kiosk",
        metadata=declare(
            "text",
            "Topics are <topic_prefix>/<terminal_id>/...",
            pattern=TOPIC_LEVELS,
            must="topic levels of letters, digits, '_' or '-' separated by '/'",
            hint="no '+', '#', spaces, or a '/' at either end",
        ),
    )
    heartbeat_s: float = _seconds(60.0, "The state is published again at least this often.")
    homeassistant_discovery: bool = field(
        default=True,
        metadata=declare(
            "bool", "Publish Home Assistant MQTT discovery configs under homeassistant/."
        ),
    )
    prometheus_textfile: str = field(
        default="",
        metadata=declare(
            "path",
            'Write the figures here for node_exporter\'s textfile collector; "" = off.',
            example="",
            hint="a .prom file in node_exporter's --collector.textfile.directory",
        ),
    )


HOSTNAME = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
TIMEZONE = r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+){0,2}"


@dataclass(frozen=True)
class DeviceSection:
    """The machine's identity and network, applied by `kiosk provision` (the daemon reads none)."""

    hostname: str = field(
        default="",
        metadata=declare(
            "text",
            'The host name; "" means the terminal id in lower case, "_" written "-".',
            pattern=HOSTNAME,
            must="1 to 63 letters, digits or '-', not starting or ending with '-'",
            hint="one label, no dots or spaces, like vm-0042",
            example="vm-0042",
            commented=True,
        ),
    )
    timezone: str = field(
        default="",
        metadata=declare(
            "text",
            'The time zone local times are shown in; "" keeps the image\'s (UTC).',
            pattern=TIMEZONE,
            must="an IANA time zone name",
            hint='like "Europe/Berlin" or "Asia/Singapore"',
            example="Europe/Berlin",
            commented=True,
        ),
    )
    wifi_ssid: str = field(
        default="",
        metadata=declare(
            "text",
            'The Wi-Fi network to join; "" means none (Ethernet only).',
            example="KioskNet",
            commented=True,
        ),
    )
    wifi_psk_file: Path | None = field(
        default=None,
        metadata=declare(
            "path",
            "A file holding the Wi-Fi passphrase (8 to 63 characters) or its 64 hex digits.",
            example=KEY_DIR + "wifi.psk",
            commented=True,
            secret=True,
            root_only=True,
        ),
    )
    wifi_country: str = field(
        default="",
        metadata=declare(
            "text",
            "The country whose radio rules the Wi-Fi obeys (ISO 3166); needed with wifi_ssid.",
            pattern=r"[A-Z]{2}",
            must="a two-letter country code in upper case",
            hint='like "DE" or "SG"',
            example="DE",
            commented=True,
        ),
    )


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
    journal: JournalSection = field(default_factory=JournalSection)
    telemetry: TelemetrySection | None = None  # absent: no telemetry (SPEC section 8)
    device: DeviceSection = field(default_factory=DeviceSection)


# The sections, in the file's order; a new section is one dataclass and one line here.
SECTIONS: dict[str, tuple[Section, type]] = {
    s.name: (s, cls)
    for s, cls in (
        (Section("kiosk", "The machine.", required=True), KioskSection),
        (
            Section("alipay", "The Alipay merchant account and gateway.", required=True),
            AlipaySection,
        ),
        (Section("merchant", "Who sells: goes into extend_info.", required=True), MerchantSection),
        (Section("sale", "What a scan buys."), SaleSection),
        (Section("scanner", "The barcode scanner."), ScannerSection),
        (Section("indicators", "Status lights and buzzer."), IndicatorsSection),
        (Section("vend", "How the product is released."), VendSection),
        (Section("journal", "The offline journal."), JournalSection),
        (
            Section(
                "telemetry",
                "Reporting to an MQTT broker and Prometheus (SPEC section 8).",
                optional=True,
            ),
            TelemetrySection,
        ),
        (
            Section("device", "The machine's host name, time zone and Wi-Fi, set at provisioning."),
            DeviceSection,
        ),
    )
}
ROWS: dict[str, dict[str, Row]] = {
    name: {row.name: row for row in rows_of(name, cls)} for name, (_, cls) in SECTIONS.items()
}
KNOWN_LAYOUTS = ROWS["scanner"]["layout"].key.choices


def installed_name(row: Row) -> str:
    """The file name `kiosk provision` gives the key file `row` names, in /etc/kiosk/keys/."""
    if row.key.install_as:
        return row.key.install_as
    example = row.key.example
    rest = example[len(KEY_DIR) :] if isinstance(example, str) else ""
    if isinstance(example, str) and example.startswith(KEY_DIR) and rest and "/" not in rest:
        return rest
    return f"{row.section}_{row.name}"


def key_file_rows() -> list[Row]:
    """The keys naming a file that `kiosk provision` installs: every secret, and the public
    files declared with `install_as`, across every section."""
    return [
        row
        for rows in ROWS.values()
        for row in rows.values()
        if row.key.kind == "path" and (row.key.secret or row.key.install_as)
    ]
