"""`kiosk check` and `kiosk init` as a technician runs them: a real file, a subprocess, and the
exact first line printed (issue 12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
[kiosk]
terminal_id = "VM-0042"
state_dir = "state"

[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
private_key_file = "keys/merchant.pem"
alipay_public_key_file = "keys/alipay.pem"
currency = "USD"

[merchant]
secondary_merchant_id = "M-001"
store_id = "S-042"

[sale]
mode = "fixed"
price = "1.50"

[scanner]
driver = "fake"

[indicators]
driver = "gpio"
green = 17

[vend]
driver = "fake"
"""


def kiosk(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def pem_private(key: rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def merchant_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def site(tmp_path: Path, merchant_key: rsa.RSAPrivateKey) -> Path:
    (tmp_path / "keys").mkdir()
    private = tmp_path / "keys/merchant.pem"
    private.write_bytes(pem_private(merchant_key))
    private.chmod(0o600)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "keys/alipay.pem").write_bytes(pem_public(alipay))
    return tmp_path


def check(site: Path, text: str, *extra: str, encoding: str = "utf-8") -> tuple[str, str, int]:
    """Run `kiosk check` on TEXT; return the config's path, the first line of stderr, the code."""
    path = site / "kiosk.toml"
    path.write_bytes(text.encode(encoding))
    done = kiosk("check", "--config", str(path), *extra)
    first = (done.stderr or done.stdout).splitlines()[0]
    return str(path), first, done.returncode


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def test_good_config_passes(site: Path) -> None:
    path, first, code = check(site, GOOD)
    assert (first, code) == (f"config OK: {path}", 0)


def test_problems_print_as_file_line_column_error_with_a_hint(site: Path) -> None:
    path, first, code = check(site, edit('partner = "2088101122334455"', 'partner = "123"'))
    assert code == 2
    assert first == (
        f"{path}:7:1: error: alipay.partner '123' must be 16 digits starting with 2088 "
        "(hint: the partner ID (PID) from the Alipay merchant portal)"
    )


def test_warnings_print_as_file_line_column_warning(site: Path) -> None:
    path, first, code = check(site, edit('mode = "fixed"', 'mode = "vmc"'))
    assert code == 0
    assert first == (
        f"{path}:18:1: warning: sale.price is ignored in vmc mode: the amount in VEND wins "
        "(hint: remove it)"
    )


def test_a_missing_section_points_at_the_end_of_the_file_not_line_0(site: Path) -> None:
    text = edit('[merchant]\nsecondary_merchant_id = "M-001"\nstore_id = "S-042"\n', "")
    path, first, _ = check(site, text)
    last = len(text.splitlines())
    assert first == (
        f"{path}:{last}:1: error: section [merchant] is missing "
        "(hint: add [merchant] with secondary_merchant_id, store_id at the end)"
    )


def test_a_problem_inside_an_inline_table_has_its_line_and_column(site: Path) -> None:
    text = edit(
        '[kiosk]\nterminal_id = "VM-0042"\nstate_dir = "state"\n',
        'kiosk = { terminal_id = "VM 42" }\n',
    )
    path, first, _ = check(site, text)
    assert first == (
        f"{path}:1:11: error: kiosk.terminal_id 'VM 42' must be 1 to 32 letters, digits, "
        "'_' or '-' (hint: no spaces or other characters)"
    )


def test_a_wrong_driver_is_one_problem_without_knock_on_errors(site: Path) -> None:
    path = site / "kiosk.toml"
    path.write_text(edit('driver = "fake"\n\n[indicators]', 'driver = "evdeb"\n\n[indicators]'))
    done = kiosk("check", "--config", str(path))
    assert done.stderr.splitlines() == [
        f"{path}:21:1: error: scanner.driver must be one of evdev, serial, fake, not "
        f"'evdeb' (hint: did you mean \"evdev\"?)",
        f"{path}: 1 problem(s); the kiosk will not start with this config",
    ]


def test_a_file_saved_with_a_byte_order_mark_is_read(site: Path) -> None:
    path, first, code = check(site, GOOD, encoding="utf-8-sig")
    assert (first, code) == (f"config OK: {path}", 0)


def test_a_utf16_file_is_named_as_such(site: Path) -> None:
    path, first, code = check(site, GOOD, encoding="utf-16")
    assert code == 2
    assert first == (
        f"{path}:1:1: error: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
        'TOML is UTF-8 (hint: save it again as "UTF-8" (Notepad: Save as, Encoding))'
    )


@pytest.mark.parametrize(
    ("currency", "message"),
    [
        ("XYZ", "'XYZ' is not an ISO 4217 currency code"),
        ("BTC", "'BTC' is not an ISO 4217 currency code"),
        ("INR", "'INR' is not a currency Alipay settles"),
        ("KWD", "'KWD' has 3 minor digits; the kiosk takes currencies with 0 or 2"),
    ],
)
def test_currency_must_be_iso_4217_and_settled_by_alipay(
    site: Path, currency: str, message: str
) -> None:
    path, first, _ = check(site, edit('currency = "USD"', f'currency = "{currency}"'))
    assert first.startswith(f"{path}:10:1: error: alipay.currency {message} (hint: Alipay ")


def test_a_settled_zero_digit_currency_takes_whole_prices(site: Path) -> None:
    text = edit('currency = "USD"', 'currency = "JPY"').replace('"1.50"', '"150"')
    path, first, code = check(site, text)
    assert (first, code) == (f"config OK: {path}", 0)


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ("-1.00", "'-1.00' must be more than zero"),
        ("1000000000.00", "'1000000000.00' is over Alipay's limit of 100000000.00"),
        ("1.5", "'1.5' is not a USD amount: it needs exactly 2 minor digits (like '1.50')"),
    ],
)
def test_prices_say_what_is_wrong_with_them(site: Path, price: str, message: str) -> None:
    path, first, _ = check(site, edit('price = "1.50"', f'price = "{price}"'))
    assert first == f"{path}:18:1: error: sale.price: {message} (hint: the currency is USD)"


def test_max_price_is_checked_against_price(site: Path) -> None:
    path, first, _ = check(site, edit('price = "1.50"', 'price = "1.50"\nmax_price = "1.00"'))
    assert first == (
        f"{path}:18:1: warning: sale.price 1.50 is above sale.max_price 1.00 (hint: max_price "
        "caps what a vending controller may ask; raise it or lower the price)"
    )


@pytest.mark.parametrize("pin", ['"GPIO17"', '"BOARD11"', '"J8:11"', '"BCM17"', "17"])
def test_gpiozero_pin_names_are_accepted(site: Path, pin: str) -> None:
    path, first, code = check(site, edit("green = 17", f"green = {pin}"))
    assert (first, code) == (f"config OK: {path}", 0)


def test_a_header_pin_that_is_not_a_gpio_is_refused(site: Path) -> None:
    path, first, _ = check(site, edit("green = 17", 'green = "BOARD6"'))
    assert first == (
        f"{path}:25:1: error: indicators.green 'BOARD6' is header pin 6, which is power or "
        "ground, not a GPIO (hint: see pinout.xyz for the header's GPIO pins)"
    )


def test_a_pin_name_and_a_number_for_the_same_gpio_are_used_twice(site: Path) -> None:
    path, first, _ = check(site, edit("green = 17", 'green = 17\nred = "BOARD11"'))
    assert first.startswith(f"{path}:26:1: error: GPIO 17 is used twice: indicators.green and ")


def test_an_rsa_key_under_2048_bits_is_refused(site: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (site / "keys/merchant.pem").write_bytes(pem_private(weak))
    path, first, _ = check(site, GOOD)
    assert first.startswith(
        f"{path}:8:1: error: alipay.private_key_file {site}/keys/merchant.pem: an RSA key of "
        "1024 bits is too weak; the kiosk needs 2048 or more (hint: make a new pair on the "
        "kiosk with `kiosk keygen`"
    )


def test_an_encrypted_private_key_is_named(site: Path, merchant_key: rsa.RSAPrivateKey) -> None:
    (site / "keys/merchant.pem").write_bytes(pem_private(merchant_key, b"secret"))
    path, first, _ = check(site, GOOD)
    assert first.startswith(
        f"{path}:8:1: error: alipay.private_key_file {site}/keys/merchant.pem: "
        "this private key is encrypted with a passphrase; the kiosk needs it unencrypted "
        "(nobody is there to type the passphrase) (hint: write it out without one: "
    )
    assert "BEGIN" not in first


def test_a_public_key_named_as_the_private_key_is_named(
    site: Path, merchant_key: rsa.RSAPrivateKey
) -> None:
    (site / "keys/merchant.pem").write_bytes(pem_public(merchant_key))
    path, first, _ = check(site, GOOD)
    assert first == (
        f"{path}:8:1: error: alipay.private_key_file {site}/keys/merchant.pem: this is a public "
        "key given as the private key; the merchant's private key goes here (hint: name the "
        "private key file (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) made with the public key "
        "you uploaded; or make a pair with `kiosk keygen`)"
    )


def test_check_format_json_for_fleet_tooling(site: Path) -> None:
    path = site / "kiosk.toml"
    path.write_text(edit('partner = "2088101122334455"', 'partner = "123"'))
    done = kiosk("check", "--config", str(path), "--format", "json")
    assert done.returncode == 2
    assert done.stdout.splitlines()[0] == "{"
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["errors"] == 1
    assert report["problems"][0] == {
        "file": str(path),
        "line": 7,
        "column": 1,
        "severity": "error",
        "message": "alipay.partner '123' must be 16 digits starting with 2088",
        "hint": "the partner ID (PID) from the Alipay merchant portal",
    }


def test_init_writes_the_example_and_never_overwrites(tmp_path: Path) -> None:
    done = kiosk("init", "kiosk.toml", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == (
        "wrote kiosk.toml; edit it, then run: kiosk check --config kiosk.toml"
    )
    assert (tmp_path / "kiosk.toml").read_text() == (ROOT / "examples/kiosk.toml").read_text()
    again = kiosk("init", "kiosk.toml", cwd=tmp_path)
    assert (again.returncode, again.stderr.splitlines()[0]) == (
        2,
        "kiosk: kiosk.toml exists; not overwritten",
    )
