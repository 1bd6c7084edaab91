"""The kiosk's TOML config file (SPEC section 3): typed sections, validation, `kiosk check`.

Validation collects every problem as a `ConfigProblem` with the file's line number, so
`kiosk check` can print them all as `FILE:LINE: message` with a hint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from kiosk.alipay.signing import SignType

DEFAULT_CONFIG_PATH = Path("/etc/kiosk/kiosk.toml")


@dataclass(frozen=True)
class KioskSection:
    terminal_id: str
    state_dir: Path = Path("/var/lib/kiosk")


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
        return f"{text} (hint: {self.hint})" if self.hint else text
