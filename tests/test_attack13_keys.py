"""The daemon's own check of the merchant's key (one signature made and verified, no full check):
a key it cannot sign with at all is a precise key problem, never a traceback; and a key
`kiosk check` refuses for what its numbers are is never taken by `kiosk run` into a sale."""

from __future__ import annotations

import base64
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay import signing
from kiosk.config import ConfigInvalid, check_config, load_config
from kiosk.errors import KeyFileError
from kiosk.simulator import GatewaySimulator
from tests.daemon_rig import DaemonRig
from tests.test_key_checks import PRIVATE_LINE, bare, only_error

# Two 192-bit primes: a valid RSA key of 384 bits, too small for a SHA-256 PKCS#1 signature.
P = 0xFEA68ACBEED1C93EB1EE89144E6BCAFBFDAA62FFF417A54B
Q = 0xF04B36624856FECECC5F13D639FCFBF37A8265793350838F


def _pem(numbers: rsa.RSAPrivateNumbers) -> bytes:
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def tiny_key_pem() -> bytes:
    """A well-formed, valid 384-bit key: `kiosk check` says it is too weak."""
    e = 65537
    d = pow(e, -1, (P - 1) * (Q - 1))
    numbers = rsa.RSAPrivateNumbers(
        P, Q, d, d % (P - 1), d % (Q - 1), pow(Q, -1, P), rsa.RSAPublicNumbers(e, P * Q)
    )
    return _pem(numbers)


def _der_int(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_len(len(raw)) + raw


def _der_len(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def pkcs1_pem(*numbers: int) -> bytes:
    """A PKCS#1 RSAPrivateKey of any numbers (version 0, n, e, d, p, q, dp, dq, qinv)."""
    body = b"".join(_der_int(x) for x in (0, *numbers))
    der = b"\x30" + _der_len(len(body)) + body
    text = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return b"-----BEGIN RSA PRIVATE KEY-----\n" + lines + b"\n-----END RSA PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def good() -> rsa.RSAPrivateNumbers:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()


def zero_prime_pem(n: rsa.RSAPrivateNumbers) -> bytes:
    """A hand-edited key whose first prime was zeroed."""
    pub = n.public_numbers
    return pkcs1_pem(pub.n, pub.e, n.d, 0, n.q, n.dmp1, n.dmq1, n.iqmp)


def exponent_one_pem(n: rsa.RSAPrivateNumbers) -> bytes:
    """e = d = 1: every 'signature' is the padded digest itself, which anybody can make."""
    pub = n.public_numbers
    return pkcs1_pem(pub.n, 1, 1, n.p, n.q, 1, 1, n.iqmp)


@pytest.fixture(autouse=True)
def _no_cached_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "_last_private_key", None)


def test_the_daemons_load_of_a_key_with_a_zeroed_prime_is_a_key_error(
    good: rsa.RSAPrivateNumbers,
) -> None:
    with pytest.raises(KeyFileError) as raised:
        signing.load_private_key(zero_prime_pem(good), "private_key_file")
    assert str(raised.value).startswith("private_key_file ")


def test_the_daemons_load_refuses_a_key_with_public_exponent_one(
    good: rsa.RSAPrivateNumbers,
) -> None:
    """`kiosk check` refuses it; `kiosk run` must not sell with it either."""
    with pytest.raises(KeyFileError):
        signing.load_private_key(exponent_one_pem(good), "private_key_file")


def _site(tmp_path: Path, key: bytes) -> Path:
    from tests.test_key_checks import CONFIG, public_pem

    (tmp_path / "kiosk.toml").write_text(CONFIG)
    (tmp_path / "merchant.pem").write_bytes(key)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "alipay.pem").write_bytes(public_pem(alipay))
    for name in ("merchant.pem", "alipay.pem"):
        (tmp_path / name).chmod(0o600)
    return tmp_path


def test_the_daemons_config_load_names_a_too_small_key(tmp_path: Path) -> None:
    site = _site(tmp_path, tiny_key_pem())
    with pytest.raises(ConfigInvalid) as raised:
        load_config(site / "kiosk.toml")
    assert "384 bits is too weak" in str(raised.value)


def test_check_names_a_too_small_key_in_alipays_bare_format(tmp_path: Path) -> None:
    site = _site(tmp_path, bare(tiny_key_pem()))
    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith("an RSA key of 384 bits is too weak"), said


def test_check_reports_a_zeroed_prime_in_alipays_bare_format(
    tmp_path: Path, good: rsa.RSAPrivateNumbers
) -> None:
    site = _site(tmp_path, bare(zero_prime_pem(good)))
    _, problems = check_config(site / "kiosk.toml")
    assert [p.line for p in problems if not p.warning] == [PRIVATE_LINE]


def test_check_names_damaged_numbers_in_alipays_bare_format(
    tmp_path: Path, good: rsa.RSAPrivateNumbers
) -> None:
    """The bare base64 body Alipay's key tool writes is as good a key file as a PEM: a key in
    it whose numbers are wrong is named so, not called 'no PEM key'."""
    pub = good.public_numbers
    damaged = pkcs1_pem(pub.n, pub.e, good.d, good.p, good.q, good.dmp1 ^ 2, good.dmq1, good.iqmp)
    site = _site(tmp_path, bare(damaged))
    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem")
    assert said.startswith("is an RSA key whose numbers do not belong together"), said


def test_kiosk_run_with_a_key_it_cannot_sign_with_waits_out_of_service(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    """Under systemd a config it cannot use leaves the kiosk out of service, waiting for a
    SIGHUP, with the problem in the log: a traceback and exit 1 would be a restart loop."""
    rig = DaemonRig(tmp_path, simulator)
    try:
        key = tmp_path / "keys" / "merchant_private_key.pem"
        key.write_bytes(tiny_key_pem())
        key.chmod(0o600)
        rig.start(wait_ready=False)
        rig.wait_log(lambda e: e.get("event") == "kiosk.out_of_service", 30, "out_of_service")
        problems = [e.get("problem", "") for e in rig.logs if e.get("event") == "config.invalid"]
        assert any("too weak" in p for p in problems), rig.raw_log[-10:]
        assert not any("Traceback" in line for line in rig.raw_log)
        rig.signal(signal.SIGTERM)
        assert rig.wait_exit() == 0
    finally:
        rig.close()
