"""`kiosk check` on the key files: too small, encrypted, the wrong half, the wrong format. Each
problem is named precisely, and no message ever quotes key material."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from kiosk.config import ConfigInvalid, check_config, load_config

CONFIG = """\
[kiosk]
terminal_id = "VM-0042"

[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
private_key_file = "merchant.pem"
alipay_public_key_file = "alipay.pem"

[merchant]
secondary_merchant_id = "M-001"
store_id = "S-042"

[sale]
price = "1.50"

[scanner]
driver = "fake"

[vend]
driver = "fake"
"""
PRIVATE_LINE, PUBLIC_LINE = 7, 8


@pytest.fixture(scope="module")
def merchant() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def alipay() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(
    key: rsa.RSAPrivateKey,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    password: bytes | None = None,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bare(pem: bytes) -> bytes:
    """The base64 body alone, as Alipay's key tool writes keys."""
    return b"".join(line for line in pem.splitlines() if not line.startswith(b"-----")) + b"\n"


@pytest.fixture
def site(tmp_path: Path, merchant: rsa.RSAPrivateKey, alipay: rsa.RSAPrivateKey) -> Path:
    (tmp_path / "kiosk.toml").write_text(CONFIG)
    (tmp_path / "merchant.pem").write_bytes(private_pem(merchant))
    (tmp_path / "alipay.pem").write_bytes(public_pem(alipay))
    for name in ("merchant.pem", "alipay.pem"):
        (tmp_path / name).chmod(0o600)
    return tmp_path


def errors(site: Path) -> list[str]:
    _, problems = check_config(site / "kiosk.toml")
    found = [str(p) for p in problems if not p.warning]
    text = "\n".join(found)
    for name in ("merchant.pem", "alipay.pem"):
        for line in (site / name).read_bytes().splitlines():
            if len(line) > 20 and not line.startswith(b"-----"):
                assert line.decode(errors="replace") not in text  # no key material, ever
    return found


def only_error(site: Path, line: int, what: str) -> str:
    found = errors(site)
    assert len(found) == 1, found
    prefix = f"{site}/kiosk.toml:{line}:1: error: {what} "
    assert found[0].startswith(prefix), found[0]
    return found[0][len(prefix) :]


def test_good_keys_pass(site: Path) -> None:
    assert errors(site) == []


def test_a_private_key_of_1024_bits_is_refused(site: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (site / "merchant.pem").write_bytes(private_pem(weak))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith("an RSA key of 1024 bits is too weak; the kiosk needs 2048 or more")
    assert "kiosk keygen" in said


def test_an_alipay_public_key_of_1024_bits_is_refused(site: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (site / "alipay.pem").write_bytes(public_pem(weak))

    said = only_error(site, PUBLIC_LINE, f"alipay.alipay_public_key_file {site}/alipay.pem:")
    assert said.startswith("an RSA key of 1024 bits is too weak")


def test_a_4096_bit_key_passes(site: Path) -> None:
    strong = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    (site / "merchant.pem").write_bytes(private_pem(strong))

    assert errors(site) == []


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_an_encrypted_private_key_is_named(
    site: Path, merchant: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat
) -> None:
    (site / "merchant.pem").write_bytes(private_pem(merchant, fmt, b"passphrase"))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith(
        "this private key is encrypted with a passphrase; the kiosk needs it unencrypted "
        "(nobody is there to type the passphrase) (hint: write it out without one: "
        "openssl pkey -in KEY -out merchant_private_key.pem"
    )


@pytest.mark.parametrize("form", ["pem", "bare base64"])
def test_a_public_key_given_as_the_private_key_is_named(
    site: Path, merchant: rsa.RSAPrivateKey, form: str
) -> None:
    pem = public_pem(merchant)
    (site / "merchant.pem").write_bytes(pem if form == "pem" else bare(pem))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith(
        "this is a public key given as the private key; the merchant's private key goes here"
    )


def test_a_private_key_given_as_alipays_public_key_is_named(
    site: Path, merchant: rsa.RSAPrivateKey
) -> None:
    (site / "alipay.pem").write_bytes(private_pem(merchant))

    said = only_error(site, PUBLIC_LINE, f"alipay.alipay_public_key_file {site}/alipay.pem:")
    assert said.startswith("this is a private key; Alipay's public key goes here")


def test_an_openssh_private_key_is_named(site: Path, merchant: rsa.RSAPrivateKey) -> None:
    (site / "merchant.pem").write_bytes(private_pem(merchant, serialization.PrivateFormat.OpenSSH))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith("this is an OpenSSH key (ssh-keygen's own format), not a PEM RSA key")


def test_a_certificate_is_named(site: Path, merchant: rsa.RSAPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "merchant")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(merchant.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(merchant, hashes.SHA256())
    )
    (site / "merchant.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem:")
    assert said.startswith("this is a certificate, not a key")


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_a_bare_base64_private_key_from_alipays_tool_is_taken(
    site: Path, merchant: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat
) -> None:
    (site / "merchant.pem").write_bytes(bare(private_pem(merchant, fmt)))

    assert errors(site) == []
    config, _ = check_config(site / "kiosk.toml")
    assert config is not None


def test_garbage_is_not_quoted(site: Path) -> None:
    secretish = base64.b64encode(b"x" * 300)
    (site / "merchant.pem").write_bytes(secretish + b"\n")

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem")
    assert "is not an unencrypted PKCS#1 or PKCS#8 PEM RSA key" in said
    assert secretish.decode()[:40] not in said


def numbers_changed(key: rsa.RSAPrivateKey, *, private_exponent_too: bool) -> bytes:
    """A PEM with the structure of a good key and numbers that do not belong together."""
    n = key.private_numbers()
    d = n.d ^ 2 if private_exponent_too else n.d
    changed = rsa.RSAPrivateNumbers(n.p, n.q, d, n.dmp1 ^ 2, n.dmq1, n.iqmp, n.public_numbers)
    return private_pem(changed.private_key(unsafe_skip_rsa_key_validation=True))


def test_check_names_a_key_whose_numbers_do_not_belong_together(
    site: Path, merchant: rsa.RSAPrivateKey
) -> None:
    (site / "merchant.pem").write_bytes(numbers_changed(merchant, private_exponent_too=False))

    said = only_error(site, PRIVATE_LINE, f"alipay.private_key_file {site}/merchant.pem")
    assert said.startswith("is an RSA key whose numbers do not belong together")


def test_the_daemon_refuses_a_key_whose_numbers_do_not_belong_together_as_kiosk_check_does(
    site: Path, merchant: rsa.RSAPrivateKey
) -> None:
    """`kiosk run` gives the merchant's key cryptography's full check too: a key whose CRT
    numbers alone are wrong still signs right, but a check by signatures alone also let through
    keys that sign wrong at random, and the full check is what tells them apart."""
    (site / "merchant.pem").write_bytes(numbers_changed(merchant, private_exponent_too=False))

    with pytest.raises(ConfigInvalid) as raised:
        load_config(site / "kiosk.toml")
    assert "is an RSA key whose numbers do not belong together" in str(raised.value)


def test_the_daemon_refuses_a_key_that_signs_wrong_before_it_sells(
    site: Path, merchant: rsa.RSAPrivateKey
) -> None:
    (site / "merchant.pem").write_bytes(numbers_changed(merchant, private_exponent_too=True))

    with pytest.raises(ConfigInvalid) as raised:
        load_config(site / "kiosk.toml")
    said = str(raised.value)
    prefix = f"{site}/kiosk.toml:{PRIVATE_LINE}:1: error: alipay.private_key_file "
    assert f"{prefix}{site}/merchant.pem is an RSA key whose numbers do not belong together" in (
        said
    )
    for line in (site / "merchant.pem").read_bytes().splitlines():
        if len(line) > 20 and not line.startswith(b"-----"):
            assert line.decode() not in said
