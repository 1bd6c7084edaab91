"""`kiosk check` for the MDB cashless device (SPEC section 7, docs/mdb.md section 2): a real
file, a subprocess, the exact first line printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.iso4217 import CURRENCIES, SETTLED, mdb_currency_code, numeric_code
from tests.test_config_cli import GOOD, ROOT, pem_private, pem_public

MDB = GOOD.replace('mode = "fixed"\nprice = "1.50"\n', 'mode = "vmc"\n').replace(
    '[vend]\ndriver = "fake"\n', '[vend]\ndriver = "mdb"\n'
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return pem_private(merchant), pem_public(alipay)


@pytest.fixture
def site(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    (tmp_path / "keys").mkdir()
    private = tmp_path / "keys/merchant.pem"
    private.write_bytes(keys[0])
    private.chmod(0o600)
    (tmp_path / "keys/alipay.pem").write_bytes(keys[1])
    return tmp_path


def check(site: Path, text: str, cmdline: str | None = None) -> tuple[str, list[str], int]:
    """`kiosk check` on TEXT, with /boot's cmdline.txt holding CMDLINE (absent when None):
    the config's path, what it printed (stderr first), the exit status."""
    path = site / "kiosk.toml"
    path.write_text(text)
    boot = site / "cmdline.txt"
    if cmdline is not None:
        boot.write_text(cmdline)
    done = subprocess.run(
        [sys.executable, "-m", "kiosk", "check", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KIOSK_BOOT_CMDLINE": str(boot)},
    )
    return str(path), (done.stderr + done.stdout).splitlines(), done.returncode


def first_line_on_this_machine(path: str) -> str:
    """A good config with the default port: /dev/serial0 is there on a Pi, not on a PC."""
    if Path("/dev/serial0").exists():
        return f"config OK: {path}"
    return (
        f"{path}:27:1: warning: vend.port /dev/serial0 does not exist now (No such file or "
        "directory) (hint: fine if the device is plugged in later; otherwise check the path)"
    )


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_mdb_defaults_to_the_pi_hat_uart_at_115200_and_says_so(site: Path) -> None:
    path, out, code = check(site, MDB)
    assert (out[0], code) == (first_line_on_this_machine(path), 0)
    assert out[-1] == (
        "  vend        mdb /dev/serial0 at 115200 baud, cashless #1, approve within 60 s, "
        "answer within 30 s"
    )


def test_mdb_usb_with_its_own_port_baud_address_and_reset_pin(site: Path) -> None:
    text = edit(
        MDB,
        'driver = "mdb"\n',
        'driver = "mdb"\nport = "/dev/ttyACM0"\nbaud = 57600\nmdb_address = 2\n'
        "mdb_reset_pin = 6\napprove_within_s = 45\n",
    )
    _, out, code = check(site, text)
    assert code == 0, out
    assert out[-1] == (
        "  vend        mdb /dev/ttyACM0 at 57600 baud, cashless #2, reset pin 6, "
        "approve within 45 s, answer within 30 s"
    )


def test_mdb_needs_sale_mode_vmc(site: Path) -> None:
    path, out, code = check(site, edit(MDB, 'mode = "vmc"\n', 'mode = "fixed"\nprice = "1.50"\n'))
    assert code == 2
    assert out[0] == (
        f"{path}:28:1: error: vend.driver mdb needs sale.mode vmc: the vending machine sets "
        'item and price (hint: set  mode = "vmc"  under [sale])'
    )


def test_mdb_needs_sale_mode_vmc_also_when_mode_is_left_out(site: Path) -> None:
    path, out, code = check(site, edit(MDB, 'mode = "vmc"\n', 'price = "1.50"\n'))
    assert code == 2
    assert out[0].startswith(f"{path}:27:1: error: vend.driver mdb needs sale.mode vmc")


def test_the_reset_pin_joins_the_pins_used_twice(site: Path) -> None:
    path, out, code = check(
        site, edit(MDB, 'driver = "mdb"\n', 'mdb_reset_pin = 17\ndriver = "mdb"\n')
    )
    assert code == 2
    assert out[0] == (
        f"{path}:27:1: error: GPIO 17 is used twice: indicators.green and vend.mdb_reset_pin "
        "(hint: every LED, buzzer, relay and sensor needs its own pin)"
    )


@pytest.mark.parametrize("console", ["serial0", "ttyAMA0", "ttyS0"])
def test_a_serial_console_on_the_pi_hat_uart_is_warned_about(site: Path, console: str) -> None:
    cmdline = f"console={console},115200 console=tty1 root=PARTUUID=1234-02 rootwait\n"
    path, out, code = check(site, MDB, cmdline=cmdline)
    boot = site / "cmdline.txt"
    assert code == 0
    assert out[0] == (
        f"{path}:27:1: warning: {boot} gives the serial console to {console}: the kernel's "
        "login prompt would talk to the MDB board on /dev/serial0 (hint: remove  "
        f"console={console},...  from {boot} (raspi-config: Interface Options, Serial Port, "
        "login shell No, hardware Yes))"
    )


def test_no_warning_without_a_serial_console_or_on_mdb_usb(site: Path) -> None:
    path, out, code = check(site, MDB, cmdline="console=tty1 root=PARTUUID=1234-02 rootwait\n")
    assert (out[0], code) == (first_line_on_this_machine(path), 0)
    usb = edit(MDB, 'driver = "mdb"\n', 'driver = "mdb"\nport = "/dev/ttyACM0"\n')
    path, out, code = check(site, usb, cmdline="console=serial0,115200 console=tty1\n")
    assert code == 0
    assert not [line for line in out if "serial console" in line]


def test_approve_within_less_than_a_payment_needs_is_warned_about(site: Path) -> None:
    text = edit(MDB, 'driver = "mdb"\n', 'approve_within_s = 15\ndriver = "mdb"\n')
    path, out, code = check(site, text)
    assert code == 0
    assert out[0] == (
        f"{path}:27:1: warning: vend.approve_within_s 15 s is less than a payment needs "
        "(17 s: alipay.pay_timeout_s + 2 x query_interval_s + 1 s): every scan would be "
        "refused (hint: raise it to at least 17 s (a little below the machine's cashless "
        "timeout), or lower alipay.pay_timeout_s)"
    )


def test_every_settled_currency_has_an_mdb_code() -> None:
    assert mdb_currency_code("USD") == "0x1840"
    assert mdb_currency_code("EUR") == "0x1978"
    assert mdb_currency_code("JPY") == "0x1392"
    assert mdb_currency_code("AUD") == "0x1036"
    assert all(numeric_code(c) == CURRENCIES[c].numeric for c in SETTLED)
    with pytest.raises(ValueError, match="no ISO 4217 numeric code"):
        numeric_code("XXX")
