"""`alipay.pin_sha256`: the checker takes a short list of canonical base64 SHA-256 pins, says
which one is wrong and why, and refuses pins on a gateway they would never be checked on."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import jsonschema
import pytest

from kiosk.config import check_config, load_config
from tests.test_config import GOOD, edit, errors, line_of, write_config

ROOT = Path(__file__).resolve().parents[1]
PIN_A = base64.b64encode(hashlib.sha256(b"a").digest()).decode()
PIN_B = base64.b64encode(hashlib.sha256(b"b").digest()).decode()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with an MD5 key (the pins do not care how requests are signed)."""
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys/md5.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    return tmp_path


def with_pins(value: str, gateway: str | None = None) -> str:
    text = edit(GOOD, 'sign_type = "RSA2"', 'sign_type = "MD5"\nmd5_key_file = "keys/md5.key"')
    text = edit(text, 'currency = "USD"', f'currency = "USD"\npin_sha256 = {value}')
    if gateway is not None:
        text = edit(text, 'gateway = "https://globalmapi.alipay.com/gateway.do"', gateway)
    return text


def test_no_pins_by_default(site: Path) -> None:
    text = edit(GOOD, 'sign_type = "RSA2"', 'sign_type = "MD5"\nmd5_key_file = "keys/md5.key"')
    assert load_config(write_config(site, text)).alipay.pin_sha256 == ()


def test_pins_load_in_order_each_once(site: Path) -> None:
    config = load_config(write_config(site, with_pins(f'["{PIN_B}", "{PIN_A}", "{PIN_B}"]')))
    assert config.alipay.pin_sha256 == (PIN_B, PIN_A)


def test_an_empty_list_pins_nothing(site: Path) -> None:
    assert load_config(write_config(site, with_pins("[]"))).alipay.pin_sha256 == ()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (f'"{PIN_A}"', "must be a list of pins, not the string"),
        ("[42]", "must hold strings, not the number 42"),
        (f'["{PIN_A[:-2]}="]', "must be base64 of a SHA-256"),  # 31 bytes
        (f'["{PIN_A.rstrip("=")}"]', "must be base64 of a SHA-256"),  # no padding
        ('["' + hashlib.sha256(b"a").hexdigest() + '"]', "must be base64 of a SHA-256"),  # hex
        (f'["{PIN_A[:42]}B="]', "must be base64 of a SHA-256"),  # not canonical: stray bits
        ("[" + ", ".join([f'"{PIN_A}"'] * 17) + "]", "holds 17 pins; at most 16"),
    ],
)
def test_a_wrong_pin_list_is_refused_on_its_line(site: Path, value: str, says: str) -> None:
    text = with_pins(value)
    config, problems = check_config(write_config(site, text))
    assert config is None
    [problem] = errors(problems)
    assert says in problem.message
    assert problem.message.startswith("alipay.pin_sha256 ")
    assert problem.line == line_of(text, "pin_sha256")


def test_pins_with_an_http_gateway_are_refused(site: Path) -> None:
    text = with_pins(
        f'["{PIN_A}"]', 'gateway = "http://127.0.0.1:8080/gateway.do"\nallow_http = true'
    )
    _, problems = check_config(write_config(site, text))
    [problem] = errors(problems)
    assert "alipay.gateway is not https: nothing would be checked" in problem.message


def test_the_schema_takes_what_the_checker_takes() -> None:
    schema = json.loads((ROOT / "docs/kiosk.schema.json").read_text())
    pins = jsonschema.Draft7Validator(schema["properties"]["alipay"]["properties"]["pin_sha256"])
    assert list(pins.iter_errors([PIN_A, PIN_B])) == []
    assert list(pins.iter_errors([PIN_A[:42] + "B="]))
    assert list(pins.iter_errors(PIN_A))
