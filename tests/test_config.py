"""The config file: loading, every validation problem with its FILE:LINE, and `kiosk check`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.signing import SignType
from kiosk.config import (
    KNOWN_LAYOUTS,
    ConfigInvalid,
    ConfigProblem,
    check_config,
    default_config_path,
    format_summary,
    load_config,
    run_check,
)
from kiosk.errors import ConfigError

GOOD = """\
# a test kiosk
[kiosk]
terminal_id = "VM-0042"
state_dir = "state"

[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
sign_type = "RSA2"
private_key_file = "keys/merchant_private_key.pem"   # relative to this file
alipay_public_key_file = "keys/alipay_public_key.pem"
currency = "USD"
query_interval_s = 0.5
query_deadline_s = 5

[merchant]
secondary_merchant_id = "M-001"
store_id = "S-042"

[sale]
mode = "fixed"
price = "1.50"
item = "coffee"

[scanner]
driver = "fake"

[indicators]
driver = "gpio"
green = 17
red = 27
amber = 22
buzzer = 18

[vend]
driver = "relay"
relay_pin = 23
sense_pin = 24
"""


@dataclass(frozen=True)
class Keys:
    private_pem: bytes
    public_pem: bytes  # Alipay's: a different pair from the merchant's


@pytest.fixture(scope="module")
def keys() -> Keys:
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(
        private_pem=merchant.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_pem=alipay.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@pytest.fixture
def site(tmp_path: Path, keys: Keys) -> Path:
    """A folder with key files in keys/: secrets 0600, the Alipay public key world-readable."""
    folder = tmp_path / "site"
    (folder / "keys").mkdir(parents=True)
    write_file(folder / "keys/merchant_private_key.pem", keys.private_pem, 0o600)
    write_file(folder / "keys/alipay_public_key.pem", keys.public_pem, 0o644)
    write_file(folder / "keys/md5.key", b"0123456789abcdef0123456789abcdef\n", 0o600)
    return folder


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def write_config(folder: Path, text: str) -> Path:
    path = folder / "kiosk.toml"
    path.write_text(text, encoding="utf-8")
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def line_of(text: str, fragment: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in the config")


def errors(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return [p for p in problems if not p.warning]


# --- a good config -------------------------------------------------------------------------


def test_good_config_loads_with_typed_values(site: Path) -> None:
    config = load_config(write_config(site, GOOD))

    assert config.kiosk.terminal_id == "VM-0042"
    assert config.alipay.sign_type is SignType.RSA2
    assert config.alipay.effective_seller_id == "2088101122334455"
    assert config.sale.price == Decimal("1.50")
    assert config.alipay.query_interval_s == 0.5
    assert config.indicators.green == 17
    assert config.vend.relay_pin == 23
    assert config.source == site / "kiosk.toml"


def test_good_config_has_no_problems_at_all(site: Path) -> None:
    config, problems = check_config(write_config(site, GOOD))

    assert config is not None
    assert problems == []


def test_relative_paths_resolve_against_the_config_folder(site: Path) -> None:
    config = load_config(write_config(site, GOOD))

    assert config.kiosk.state_dir == site / "state"
    assert config.alipay.private_key_file == site / "keys/merchant_private_key.pem"
    assert config.alipay.alipay_public_key_file == site / "keys/alipay_public_key.pem"


def test_absolute_paths_stay_absolute(site: Path, tmp_path: Path) -> None:
    text = edit(GOOD, 'state_dir = "state"', f'state_dir = "{tmp_path / "journal"}"')

    config = load_config(write_config(site, text))

    assert config.kiosk.state_dir == tmp_path / "journal"


def test_defaults_follow_the_spec(site: Path) -> None:
    text = "\n".join(
        line for line in GOOD.splitlines() if not line.startswith(("state_dir", "query_"))
    )

    config = load_config(write_config(site, text))

    assert config.kiosk.state_dir == Path("/var/lib/kiosk")
    assert config.alipay.query_interval_s == 3.0
    assert config.alipay.query_deadline_s == 60.0
    assert config.alipay.pay_timeout_s == 10.0
    assert config.vend.timeout_s == 30.0


def test_scanner_layout_is_accepted(site: Path) -> None:
    text = edit(GOOD, 'driver = "fake"', 'driver = "fake"\nlayout = "de"')

    assert load_config(write_config(site, text)).scanner.layout == "de"


def test_known_layouts_are_the_keymaps_layouts() -> None:
    from drivers import keymap  # the core must not import drivers; only this test ties them

    assert set(KNOWN_LAYOUTS) == set(keymap.LAYOUTS)


@pytest.mark.parametrize(
    ("layout", "hint"),
    [("DE", 'did you mean "de"?'), ("gb", 'write one of: "us", "de", "fr"')],
)
def test_unknown_scanner_layout_is_refused_with_a_hint(site: Path, layout: str, hint: str) -> None:
    text = edit(GOOD, 'driver = "fake"', f'driver = "fake"\nlayout = "{layout}"')

    _, problems = check_config(write_config(site, text))

    assert [(p.line, p.message, p.hint) for p in errors(problems)] == [
        (
            line_of(text, "layout ="),
            f"scanner.layout must be one of us, de, fr, not {layout!r}",
            hint,
        )
    ]


def test_relay_active_high_defaults_to_true(site: Path) -> None:
    assert load_config(write_config(site, GOOD)).vend.relay_active_high is True


def test_relay_active_high_false_loads_for_an_active_low_relay_module(site: Path) -> None:
    text = edit(GOOD, "relay_pin = 23", "relay_pin = 23\nrelay_active_high = false")

    config = load_config(write_config(site, text))

    assert config.vend.relay_active_high is False
    assert "relay pin 23 (active low)" in format_summary(config)


def test_relay_active_high_must_be_a_boolean(site: Path) -> None:
    text = edit(GOOD, "relay_pin = 23", 'relay_pin = 23\nrelay_active_high = "no"')

    _, problems = check_config(write_config(site, text))

    assert [(p.line, p.message) for p in errors(problems)] == [
        (
            line_of(text, "relay_active_high"),
            "vend.relay_active_high must be true or false, not the string 'no'",
        )
    ]


def test_active_low_relay_rests_with_its_pin_high(site: Path) -> None:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from drivers import build_vend_output

    text = edit(GOOD, "relay_pin = 23", "relay_pin = 23\nrelay_active_high = false")
    config = load_config(write_config(site, text))
    saved, Device.pin_factory = Device.pin_factory, MockFactory()
    try:
        output = build_vend_output(config)
        try:
            assert Device.pin_factory.pin(23).state == 1  # off, for a relay that switches on low
        finally:
            output.close()
    finally:
        Device.pin_factory.close()
        Device.pin_factory = saved


def test_md5_sign_type_with_its_key_loads(site: Path) -> None:
    text = edit(GOOD, 'sign_type = "RSA2"', 'sign_type = "MD5"\nmd5_key_file = "keys/md5.key"')
    text = edit(
        text, 'private_key_file = "keys/merchant_private_key.pem"   # relative to this file\n', ""
    )
    text = edit(text, 'alipay_public_key_file = "keys/alipay_public_key.pem"\n', "")

    config, problems = check_config(write_config(site, text))

    assert problems == []
    assert config is not None and config.alipay.md5_key_file == site / "keys/md5.key"


def test_loopback_http_gateway_is_allowed_for_a_simulator(site: Path) -> None:
    text = edit(
        GOOD,
        'gateway = "https://globalmapi.alipay.com/gateway.do"',
        'gateway = "http://127.0.0.1:8099/gateway.do"\nallow_http = true',
    )

    assert load_config(write_config(site, text)).alipay.allow_http is True


def test_vmc_mode_with_serial_vend_loads(site: Path) -> None:
    text = edit(GOOD, 'mode = "fixed"\nprice = "1.50"\n', 'mode = "vmc"\n')
    text = edit(text, 'driver = "relay"\nrelay_pin = 23\nsense_pin = 24', 'driver = "fake"')

    assert load_config(write_config(site, text)).sale.mode == "vmc"


# --- each problem at its line --------------------------------------------------------------

# (old text, new text, part of the message); the problem's line is that of the new text's
# first line, or of `at` when given (a missing key points at its section header).
PROBLEMS = [
    pytest.param(
        'terminal_id = "VM-0042"',
        'terminal_id = "VM 0042!"',
        "1 to 32 letters",
        None,
        id="terminal_id-pattern",
    ),
    pytest.param(
        'terminal_id = "VM-0042"\n',
        "",
        "kiosk.terminal_id is required",
        "[kiosk]",
        id="terminal_id-missing",
    ),
    pytest.param(
        'terminal_id = "VM-0042"',
        "terminal_id = 42",
        "must be a string, not the number 42",
        None,
        id="terminal_id-type",
    ),
    pytest.param(
        'gateway = "https://globalmapi.alipay.com/gateway.do"\n',
        "",
        "alipay.gateway is required",
        "[alipay]",
        id="gateway-missing",
    ),
    pytest.param(
        'gateway = "https://globalmapi.alipay.com/gateway.do"',
        'gateway = "http://globalmapi.alipay.com/gateway.do"',
        "uses http, which needs allow_http = true",
        None,
        id="gateway-http",
    ),
    pytest.param(
        'gateway = "https://globalmapi.alipay.com/gateway.do"',
        'gateway = "http://10.0.0.5/gateway.do"\nallow_http = true',
        "allow_http only works for a loopback host",
        None,
        id="allow_http-not-loopback",
    ),
    pytest.param(
        'gateway = "https://globalmapi.alipay.com/gateway.do"',
        'gateway = "globalmapi.alipay.com"',
        "is not an https URL",
        None,
        id="gateway-no-scheme",
    ),
    pytest.param(
        'partner = "2088101122334455"',
        'partner = "1088101122334455"',
        "16 digits starting with 2088",
        None,
        id="partner-prefix",
    ),
    pytest.param(
        'partner = "2088101122334455"',
        "partner = 2088101122334455",
        "must be a string",
        None,
        id="partner-number",
    ),
    pytest.param(
        'partner = "2088101122334455"',
        'partner = "2088101122334455"\nseller_id = "2088123"',
        "alipay.seller_id '2088123' must be 16 digits",
        "seller_id",
        id="seller_id",
    ),
    pytest.param(
        'currency = "USD"',
        'currency = "usd"',
        "ISO 4217 code in upper case",
        None,
        id="currency-case",
    ),
    pytest.param(
        'sign_type = "RSA2"',
        'sign_type = "rsa2"',
        "must be one of RSA2, RSA, MD5",
        None,
        id="sign_type",
    ),
    pytest.param(
        'sign_type = "RSA2"',
        'sign_type = "MD5"',
        "sign_type MD5 needs alipay.md5_key_file",
        "[alipay]",
        id="md5-without-key",
    ),
    pytest.param(
        'alipay_public_key_file = "keys/alipay_public_key.pem"\n',
        "",
        "sign_type RSA2 needs alipay.alipay_public_key_file",
        "[alipay]",
        id="rsa2-without-public",
    ),
    pytest.param(
        'alipay_public_key_file = "keys/alipay_public_key.pem"',
        'alipay_public_key_file = "keys/missing.pem"',
        "No such file",
        None,
        id="key-file-missing",
    ),
    pytest.param(
        'alipay_public_key_file = "keys/alipay_public_key.pem"',
        'alipay_public_key_file = "keys/merchant_private_key.pem"',
        "this is a private key",
        None,
        id="private-key-as-public",
    ),
    pytest.param(
        'private_key_file = "keys/merchant_private_key.pem"',
        'private_key_file = "keys/md5.key"',
        "is not an unencrypted PKCS#1 or PKCS#8 PEM RSA key",
        None,
        id="private-key-garbage",
    ),
    pytest.param(
        "query_deadline_s = 5",
        'query_deadline_s = "5"',
        "must be a number of seconds",
        None,
        id="duration-string",
    ),
    pytest.param(
        "query_deadline_s = 5", "query_deadline_s = true", "not a boolean", None, id="duration-bool"
    ),
    pytest.param(
        "query_deadline_s = 5",
        "query_deadline_s = 0",
        "must be greater than 0",
        None,
        id="duration-zero",
    ),
    pytest.param(
        "query_deadline_s = 5",
        "query_deadline_s = 0.5",
        "query_interval_s (0.5) must be less than query_deadline_s (0.5)",
        "query_interval_s",
        id="interval-not-below-deadline",
    ),
    pytest.param(
        'store_id = "S-042"\n',
        "",
        "merchant.store_id is required",
        "[merchant]",
        id="store_id-missing",
    ),
    pytest.param(
        'price = "1.50"', "price = 1.50", "sale.price must be a string", None, id="price-float"
    ),
    pytest.param(
        'price = "1.50"', 'price = "1.5"', "exactly 2 minor digits", None, id="price-digits"
    ),
    pytest.param(
        'price = "1.50"\n', "", "sale.price is required in fixed mode", "[sale]", id="price-missing"
    ),
    pytest.param(
        'mode = "fixed"',
        'mode = "free"',
        "sale.mode must be one of fixed, vmc",
        None,
        id="sale-mode",
    ),
    pytest.param(
        'item = "coffee"', 'item = "hot coffee"', "1 to 32 letters", None, id="item-pattern"
    ),
    pytest.param(
        'driver = "fake"',
        'driver = "evdev"',
        "scanner.driver evdev needs scanner.device or scanner.match",
        None,
        id="evdev-without-device",
    ),
    pytest.param(
        'driver = "fake"',
        'driver = "serial"',
        "scanner.driver serial needs scanner.port",
        None,
        id="serial-scanner-without-port",
    ),
    pytest.param(
        'driver = "fake"',
        'driver = "fake"\ngrab = "yes"',
        "must be true or false",
        "grab",
        id="bool-as-string",
    ),
    pytest.param(
        'driver = "gpio"',
        'driver = "led"',
        "indicators.driver must be one of",
        None,
        id="indicators-driver",
    ),
    pytest.param("green = 17", "green = 28", "BCM GPIO number from 0 to 27", None, id="pin-range"),
    pytest.param(
        "buzzer = 18",
        "buzzer = 23",
        "GPIO 23 is used twice: indicators.buzzer and vend.relay_pin",
        "relay_pin",
        id="pin-twice",
    ),
    pytest.param(
        "buzzer = 18",
        'buzzer = 18\nbuzzer_type = "piezo"',
        "buzzer_type must be one of active, passive",
        "buzzer_type",
        id="buzzer_type",
    ),
    pytest.param(
        'driver = "relay"\nrelay_pin = 23',
        'driver = "serial"',
        "vend.driver serial needs vend.port",
        None,
        id="vend-serial-without-port",
    ),
    pytest.param(
        "relay_pin = 23\n",
        "",
        "vend.driver relay needs vend.relay_pin",
        'driver = "relay"',
        id="relay-without-pin",
    ),
    pytest.param(
        "sense_pin = 24",
        "sense_pin = 24\ntimeout_s = -1",
        "vend.timeout_s must be greater than 0",
        "timeout_s",
        id="vend-timeout",
    ),
    pytest.param(
        'mode = "fixed"\nprice = "1.50"',
        'mode = "vmc"',
        "sale.mode vmc needs vend.driver serial",
        'driver = "relay"',
        id="vmc-with-relay",
    ),
]


@pytest.mark.parametrize(("old", "new", "message", "at"), PROBLEMS)
def test_problem_is_reported_at_its_line(
    site: Path, old: str, new: str, message: str, at: str | None
) -> None:
    text = edit(GOOD, old, new)
    path = write_config(site, text)

    config, problems = check_config(path)

    assert config is None
    found = [p for p in errors(problems) if message in p.message]
    assert found, [str(p) for p in problems]
    expected_line = line_of(text, at or new.splitlines()[0])
    assert (found[0].file, found[0].line) == (str(path), expected_line)
    assert found[0].hint


def test_missing_section_is_reported_at_the_end_of_the_file(site: Path) -> None:
    text = edit(GOOD, '[merchant]\nsecondary_merchant_id = "M-001"\nstore_id = "S-042"\n', "")

    _, problems = check_config(write_config(site, text))

    last_line = len(text.splitlines())
    assert [(p.line, p.message) for p in problems] == [(last_line, "section [merchant] is missing")]
    assert problems[0].hint == "add [merchant] with secondary_merchant_id, store_id at the end"


def test_misspelt_key_gets_did_you_mean(site: Path) -> None:
    text = edit(GOOD, 'partner = "2088101122334455"', 'parnter = "2088101122334455"')

    _, problems = check_config(write_config(site, text))

    unknown = [p for p in problems if "unknown key" in p.message]
    assert len(unknown) == 1
    assert unknown[0].line == line_of(text, "parnter")
    assert unknown[0].message == "unknown key 'parnter' in [alipay]"
    assert unknown[0].hint == "did you mean partner?"


def test_misspelt_section_gets_did_you_mean(site: Path) -> None:
    text = edit(GOOD, "[indicators]", "[indicator]")

    _, problems = check_config(write_config(site, text))

    assert [(p.line, p.message, p.hint) for p in problems] == [
        (line_of(text, "[indicator]"), "unknown section [indicator]", "did you mean [indicators]?")
    ]


def test_key_in_the_wrong_section_says_where_it_belongs(site: Path) -> None:
    text = edit(GOOD, 'item = "coffee"', 'item = "coffee"\ncurrency = "USD"')

    _, problems = check_config(write_config(site, text))

    assert problems[0].message == "unknown key 'currency' in [sale]"
    assert problems[0].hint == "currency belongs under [alipay]"


def test_several_problems_are_reported_at_once_in_line_order(site: Path) -> None:
    text = edit(GOOD, 'terminal_id = "VM-0042"', 'terminal_id = "VM 0042"')
    text = edit(text, 'currency = "USD"', 'currency = "EURO"')
    text = edit(text, "green = 17", "green = 99")

    _, problems = check_config(write_config(site, text))

    assert [p.line for p in problems] == [
        line_of(text, "terminal_id"),
        line_of(text, "currency"),
        line_of(text, "green"),
    ]


def test_toml_syntax_error_gives_tomllib_line(site: Path) -> None:
    text = edit(GOOD, 'store_id = "S-042"', 'store_id = "S-042')

    config, problems = check_config(write_config(site, text))

    assert config is None
    assert len(problems) == 1
    assert problems[0].line == line_of(text, "store_id")
    assert problems[0].message.startswith("not valid TOML")


def test_unreadable_config_file_is_one_problem(tmp_path: Path) -> None:
    config, problems = check_config(tmp_path / "absent.toml")

    assert config is None
    assert (problems[0].line, problems[0].column) == (1, 1)
    assert "cannot read the config file" in problems[0].message


# --- key files -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_private_key_readable_by_group_or_others_is_refused(site: Path, mode: int) -> None:
    (site / "keys/merchant_private_key.pem").chmod(mode)
    text = GOOD

    _, problems = check_config(write_config(site, text))

    assert len(problems) == 1
    assert problems[0].line == line_of(text, "private_key_file")
    assert "readable by group or others" in problems[0].message
    assert f"{mode:04o}" in problems[0].message
    assert "chmod 600" in problems[0].hint


def test_md5_key_readable_by_others_is_refused(site: Path) -> None:
    (site / "keys/md5.key").chmod(0o644)
    text = edit(GOOD, 'sign_type = "RSA2"', 'sign_type = "MD5"\nmd5_key_file = "keys/md5.key"')

    _, problems = check_config(write_config(site, text))

    refused = [p for p in errors(problems) if "readable by group or others" in p.message]
    assert [p.line for p in refused] == [line_of(text, "md5_key_file")]


def test_world_readable_alipay_public_key_is_accepted(site: Path) -> None:
    (site / "keys/alipay_public_key.pem").chmod(0o644)

    config, problems = check_config(write_config(site, GOOD))

    assert config is not None and problems == []


def test_key_mode_check_can_be_skipped_for_a_boot_partition(site: Path) -> None:
    (site / "keys/merchant_private_key.pem").chmod(0o755)

    config, problems = check_config(write_config(site, GOOD), check_key_modes=False)

    assert config is not None and problems == []


def test_md5_key_of_the_wrong_length_is_refused(site: Path) -> None:
    (site / "keys/md5.key").write_bytes(b"tooshort\n")
    text = edit(GOOD, 'sign_type = "RSA2"', 'sign_type = "MD5"\nmd5_key_file = "keys/md5.key"')

    _, problems = check_config(write_config(site, text))

    assert any("32-character MD5 key, it holds 8" in p.message for p in problems)
    assert all("tooshort" not in str(p) for p in problems)


def test_key_for_another_sign_type_is_a_warning(site: Path) -> None:
    text = edit(GOOD, 'currency = "USD"', 'currency = "USD"\nmd5_key_file = "keys/md5.key"')

    config, problems = check_config(write_config(site, text))

    assert config is not None
    assert [(p.warning, p.line) for p in problems] == [(True, line_of(text, "md5_key_file"))]
    assert "not used with sign_type RSA2" in problems[0].message


def test_key_for_another_sign_type_is_not_checked(site: Path) -> None:
    text = edit(GOOD, 'currency = "USD"', 'currency = "USD"\nmd5_key_file = "/etc/kiosk/keys/none"')

    config, problems = check_config(write_config(site, text))

    assert config is not None
    assert [p.warning for p in problems] == [True]


def test_merchant_public_key_given_as_alipay_key_is_a_warning(site: Path, keys: Keys) -> None:
    own = serialization.load_pem_private_key(keys.private_pem, None).public_key()
    (site / "keys/alipay_public_key.pem").write_bytes(
        own.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    config, problems = check_config(write_config(site, GOOD))

    assert config is not None
    assert [p.warning for p in problems] == [True]
    assert "merchant's own public key" in problems[0].message


# --- warnings ------------------------------------------------------------------------------


def test_price_in_vmc_mode_is_a_warning_and_ignored(site: Path) -> None:
    text = edit(GOOD, 'mode = "fixed"', 'mode = "vmc"')
    text = edit(text, 'driver = "relay"\nrelay_pin = 23\nsense_pin = 24', 'driver = "fake"')

    config, problems = check_config(write_config(site, text))

    assert config is not None and config.sale.price is None
    assert [(p.warning, p.line) for p in problems] == [(True, line_of(text, "price"))]


def test_pi5_debug_uart_is_a_warning(site: Path) -> None:
    text = edit(
        GOOD,
        'driver = "relay"\nrelay_pin = 23\nsense_pin = 24',
        'driver = "serial"\nport = "/dev/ttyAMA10"',
    )

    config, problems = check_config(write_config(site, text), check_devices=False)

    assert config is not None
    assert len(problems) == 1 and problems[0].warning
    assert "Raspberry Pi 5 debug console UART" in problems[0].message


def test_missing_device_path_is_a_warning_in_check_only(site: Path) -> None:
    text = edit(GOOD, 'driver = "fake"', 'driver = "evdev"\ndevice = "/dev/input/by-id/nothing"')
    path = write_config(site, text)

    config, problems = check_config(path)

    assert config is not None
    assert [(p.warning, p.line) for p in problems] == [(True, line_of(text, "device ="))]
    assert "does not exist now" in problems[0].message
    assert load_config(path).scanner.device == "/dev/input/by-id/nothing"


# --- load_config, default path, kiosk check ------------------------------------------------


def test_load_config_raises_config_invalid_listing_every_problem(site: Path) -> None:
    text = edit(GOOD, 'terminal_id = "VM-0042"', 'terminal_id = "VM 0042"')
    text = edit(text, 'currency = "USD"', 'currency = "usd"')
    path = write_config(site, text)

    with pytest.raises(ConfigInvalid) as raised:
        load_config(path)

    assert isinstance(raised.value, ConfigError)
    assert len(raised.value.problems) == 2
    assert str(raised.value).splitlines() == [str(p) for p in raised.value.problems]
    assert str(raised.value).startswith(f"{path}:{line_of(text, 'terminal_id')}:1: error: ")


def test_default_config_path_honours_kiosk_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIOSK_CONFIG", "/srv/kiosk.toml")
    assert default_config_path() == Path("/srv/kiosk.toml")
    monkeypatch.delenv("KIOSK_CONFIG")
    assert default_config_path() == Path("/etc/kiosk/kiosk.toml")


def test_run_check_prints_problems_and_exits_2(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = edit(GOOD, "green = 17", "green = 99")
    path = write_config(site, text)

    assert run_check(path) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:{line_of(text, 'green')}:1: error: indicators.green must be a BCM GPIO" in err
    assert "(hint: " in err


def test_run_check_prints_summary_and_exits_0(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_check(write_config(site, GOOD)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert "VM-0042" in out and "coffee at 1.50 USD" in out and "relay pin 23" in out


def test_summary_shows_no_key_material(site: Path, keys: Keys) -> None:
    summary = format_summary(load_config(write_config(site, GOOD)))

    assert "BEGIN" not in summary
    assert keys.private_pem.decode().splitlines()[1] not in summary


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, whatever its mode")
def test_unreadable_public_key_is_refused(site: Path) -> None:
    (site / "keys/alipay_public_key.pem").chmod(0o000)

    _, problems = check_config(write_config(site, GOOD))

    assert any("Permission denied" in p.message for p in problems)


# --- the keys added for the daemon: clock, retry cap, price cap --------------------------------


def test_require_synced_clock_defaults_to_true_and_a_rig_may_turn_it_off(site: Path) -> None:
    assert load_config(write_config(site, GOOD)).kiosk.require_synced_clock is True
    text = edit(GOOD, 'state_dir = "state"', 'state_dir = "state"\nrequire_synced_clock = false')
    assert load_config(write_config(site, text)).kiosk.require_synced_clock is False


def test_require_synced_clock_must_be_a_boolean(site: Path) -> None:
    text = edit(GOOD, 'state_dir = "state"', 'state_dir = "state"\nrequire_synced_clock = "no"')
    _, problems = check_config(write_config(site, text))
    assert [(p.line, p.message) for p in errors(problems)] == [
        (
            line_of(text, "require_synced_clock"),
            "kiosk.require_synced_clock must be true or false, not the string 'no'",
        )
    ]


def test_retry_max_s_defaults_to_five_minutes_and_may_be_fractional(site: Path) -> None:
    assert load_config(write_config(site, GOOD)).alipay.retry_max_s == 300.0
    text = edit(GOOD, "query_deadline_s = 5", "query_deadline_s = 5\nretry_max_s = 0.5")
    assert load_config(write_config(site, text)).alipay.retry_max_s == 0.5


@pytest.mark.parametrize("value", ["0", "-1", '"60"'])
def test_retry_max_s_must_be_a_positive_number(site: Path, value: str) -> None:
    text = edit(GOOD, "query_deadline_s = 5", f"query_deadline_s = 5\nretry_max_s = {value}")
    _, problems = check_config(write_config(site, text))
    [problem] = errors(problems)
    assert problem.line == line_of(text, "retry_max_s") and "alipay.retry_max_s" in problem.message


def test_max_price_is_an_amount_in_the_currency(site: Path) -> None:
    assert load_config(write_config(site, GOOD)).sale.max_price is None  # no cap by default
    text = edit(GOOD, 'item = "coffee"', 'item = "coffee"\nmax_price = "20.00"')
    assert load_config(write_config(site, text)).sale.max_price == Decimal("20.00")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20.00", "sale.max_price must be a string, not the number 20.0"),
        ('"20"', "sale.max_price: '20' is not a USD amount: it needs exactly 2 minor digits"),
        ('"0.00"', "sale.max_price: '0.00' must be more than zero"),
    ],
)
def test_max_price_problems_are_reported_at_its_line(site: Path, value: str, message: str) -> None:
    text = edit(GOOD, 'item = "coffee"', f'item = "coffee"\nmax_price = {value}')
    _, problems = check_config(write_config(site, text))
    [problem] = errors(problems)
    assert problem.line == line_of(text, "max_price")
    assert problem.message.startswith(message)


def test_a_fixed_price_above_max_price_is_a_warning(site: Path) -> None:
    text = edit(GOOD, 'item = "coffee"', 'item = "coffee"\nmax_price = "1.00"')
    config, problems = check_config(write_config(site, text))
    assert config is not None
    [warning] = problems
    assert warning.warning and warning.line == line_of(text, "price =")
    assert "sale.price 1.50 is above sale.max_price 1.00" in warning.message


def test_summary_shows_the_price_cap(site: Path) -> None:
    text = edit(GOOD, 'item = "coffee"', 'item = "coffee"\nmax_price = "20.00"')
    assert "at most 20.00 USD" in format_summary(load_config(write_config(site, text)))
