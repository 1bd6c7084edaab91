"""Signed provisioning: with the operator's public key on the kiosk, only a bundle signed by
its private key (`kiosk provision sign`) is installed; anything else is refused, its secrets
still taken off the card."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk import bundle
from kiosk.provision import ERROR_FILE, ProvisionFailed, provision, run_provision

from .test_provision import SOURCE


def kiosk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KIOSK_OPERATOR_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "kiosk", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def pems() -> tuple[bytes, bytes]:
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        merchant.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        alipay.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's key pair, made by the command line: operator.key and operator.key.pub."""
    folder = tmp_path_factory.mktemp("laptop")
    done = kiosk("provision", "sign", "--keygen", "--key", str(folder / "operator.key"))
    assert done.returncode == 0, done.stderr
    return folder / "operator.key"


@pytest.fixture
def card(tmp_path: Path, pems: tuple[bytes, bytes]) -> Path:
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "kiosk.toml").write_text(SOURCE)
    (folder / "merchant_private_key.pem").write_bytes(pems[0])
    (folder / "alipay_public_key.pem").write_bytes(pems[1])
    return folder


@pytest.fixture
def etc(tmp_path: Path, operator: Path) -> Path:
    """The kiosk's /etc/kiosk, with the operator's public key the image build put there."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "operator.pub").write_bytes(operator.with_name("operator.key.pub").read_bytes())
    return folder


def sign(card: Path, key: Path) -> None:
    done = kiosk("provision", "sign", "--key", str(key), str(card))
    assert done.returncode == 0, done.stderr


def provision_signed(card: Path, etc: Path) -> object:
    return provision(card / "kiosk.toml", etc, owner=None, group=None,
                     operator_key=etc / "operator.pub")  # fmt: skip


def test_operator_keygen_writes_an_owner_only_key_and_a_public_key(operator: Path) -> None:
    assert stat.S_IMODE(operator.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in operator.read_bytes()
    public = bundle.load_public_key(operator.with_name("operator.key.pub"))
    assert bundle.fingerprint(public).startswith("ed25519:")
    again = kiosk("provision", "sign", "--keygen", "--key", str(operator))
    assert (again.returncode, again.stderr.strip()) == (
        2,
        f"kiosk provision sign: {operator} exists; not overwritten",
    )


def test_sign_lists_the_config_and_every_file_it_names(card: Path, operator: Path) -> None:
    done = kiosk("provision", "sign", "--key", str(operator), str(card))

    assert done.returncode == 0, done.stderr
    text = (card / "kiosk.sig").read_text()
    lines = text.splitlines()
    assert lines[0] == "kiosk-provisioning-bundle 1"
    assert lines[1].startswith("created ")
    names = sorted(line.split("  ", 1)[1] for line in lines if line.startswith("sha256 "))
    assert names == ["alipay_public_key.pem", "kiosk.toml", "merchant_private_key.pem"]
    assert lines[-1].startswith("ed25519 ")
    assert "BEGIN" not in text and "BEGIN" not in done.stdout


def test_a_signed_bundle_is_installed(card: Path, etc: Path, operator: Path) -> None:
    sign(card, operator)

    report = provision_signed(card, etc)

    assert report.status == "installed"  # type: ignore[attr-defined]
    assert report.signed_by == bundle.fingerprint(  # type: ignore[attr-defined]
        bundle.load_public_key(etc / "operator.pub")
    )
    assert not (card / "kiosk.sig").exists()  # it lists the secrets' hashes: off the card too
    assert not (card / "merchant_private_key.pem").exists()


def test_an_unsigned_drop_is_refused_and_its_secrets_still_leave(card: Path, etc: Path) -> None:
    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert raised.value.problems[0].message == (
        "this kiosk takes only signed bundles, and kiosk.sig is missing"
    )
    assert not (etc / "kiosk.toml").exists()
    assert not (card / "merchant_private_key.pem").exists()
    assert "kiosk provision sign --key operator.key DIR" in (card / ERROR_FILE).read_text()


def test_a_config_changed_after_signing_is_refused(card: Path, etc: Path, operator: Path) -> None:
    sign(card, operator)
    (card / "kiosk.toml").write_text(SOURCE.replace("2088101122334455", "2088999999999999"))

    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert [p.message for p in raised.value.problems] == [
        "kiosk.toml is not the one kiosk.sig signed"
    ]
    assert not (etc / "kiosk.toml").exists()


def test_a_key_file_swapped_after_signing_is_refused(card: Path, etc: Path, operator: Path) -> None:
    sign(card, operator)
    fake = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (card / "alipay_public_key.pem").write_bytes(
        fake.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert [p.message for p in raised.value.problems] == [
        "alipay_public_key.pem (alipay_public_key_file) is not the file that was signed"
    ]


def test_a_bundle_signed_by_another_key_is_refused(card: Path, etc: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    assert kiosk("provision", "sign", "--keygen", "--key", str(other)).returncode == 0
    sign(card, other)

    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert raised.value.problems[0].message.startswith(
        "kiosk.sig is not signed by this kiosk's operator key (ed25519:"
    )


def test_a_forged_line_in_the_signature_file_is_refused(
    card: Path, etc: Path, operator: Path
) -> None:
    sign(card, operator)
    text = (card / "kiosk.sig").read_text()
    (card / "kiosk.sig").write_text(text.replace("created 2", "created 3", 1))

    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert "is not signed by this kiosk's operator key" in raised.value.problems[0].message


def test_an_older_bundle_is_never_put_back(card: Path, etc: Path, operator: Path) -> None:
    sign(card, operator)
    old_sig = (card / "kiosk.sig").read_bytes()
    provision_signed(card, etc)
    # A newer bundle, then the older one dropped again (say, a copy kept by someone else).
    key = bundle.load_private_key(operator)
    manifest = bundle.verify(old_sig, key.public_key())
    newer = bundle.Manifest("2999-01-01T00:00:00Z", manifest.files)
    (card / "kiosk.toml.provisioned").rename(card / "kiosk.toml")
    (card / "kiosk.sig").write_bytes(bundle.sign(newer, key))
    (card / "merchant_private_key.pem").write_bytes(
        (etc / "keys/merchant_private_key.pem").read_bytes()
    )
    provision_signed(card, etc)
    (card / "kiosk.toml.provisioned").rename(card / "kiosk.toml")
    (card / "kiosk.sig").write_bytes(old_sig)

    with pytest.raises(ProvisionFailed) as raised:
        provision_signed(card, etc)

    assert "before the one installed (2999-01-01T00:00:00Z)" in raised.value.problems[0].message


def test_signed_reprovisioning_may_change_the_config(
    card: Path, etc: Path, operator: Path, pems: tuple[bytes, bytes]
) -> None:
    sign(card, operator)
    provision_signed(card, etc)
    (card / "kiosk.toml.provisioned").unlink()
    (card / "kiosk.toml").write_text(SOURCE.replace('price = "1.50"', 'price = "2.00"'))
    (card / "merchant_private_key.pem").write_bytes(pems[0])
    sign(card, operator)

    report = provision_signed(card, etc)

    assert report.status == "installed"  # type: ignore[attr-defined]
    assert 'price = "2.00"' in (etc / "kiosk.toml").read_text()


def test_run_provision_uses_the_operator_key_in_etc(
    card: Path, etc: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: no chown to user kiosk

    assert run_provision(card / "kiosk.toml", etc) == 2
    assert "takes only signed bundles" in capsys.readouterr().err


def test_a_broken_operator_key_fails_closed(
    card: Path, etc: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    (etc / "operator.pub").write_text("not a key\n")

    assert run_provision(card / "kiosk.toml", etc) == 1
    assert "is not a PEM public key" in capsys.readouterr().err
    assert not (etc / "kiosk.toml").exists()
    assert not (card / "merchant_private_key.pem").exists()  # the secrets left all the same


def test_an_operator_key_named_but_missing_fails_closed(
    card: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    etc = tmp_path / "etc-unsigned"

    status = run_provision(card / "kiosk.toml", etc, operator_key=tmp_path / "nowhere.pub")

    assert status == 1
    assert not (etc / "kiosk.toml").exists()


def test_an_encrypted_operator_key_signs_with_its_passphrase(card: Path, tmp_path: Path) -> None:
    key = tmp_path / "enc.key"
    env = {**os.environ, "KIOSK_OPERATOR_PASSPHRASE": "a long passphrase"}
    made = subprocess.run(
        [sys.executable, "-m", "kiosk", "provision", "sign", "--keygen", "--passphrase",
         "--key", str(key)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()

    without = kiosk("provision", "sign", "--key", str(key), str(card))
    assert without.returncode == 2
    assert "is encrypted: give its passphrase" in without.stderr

    signed = subprocess.run(
        [sys.executable, "-m", "kiosk", "provision", "sign", "--key", str(key), str(card)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    bundle.verify((card / "kiosk.sig").read_bytes(), bundle.load_private_key(
        key, b"a long passphrase").public_key())  # fmt: skip


def test_sign_refuses_a_config_with_problems(card: Path, operator: Path) -> None:
    (card / "kiosk.toml").write_text(SOURCE.replace("2088101122334455", "123"))

    done = kiosk("provision", "sign", "--key", str(operator), str(card))

    assert done.returncode == 2
    assert "has problems; not signed" in done.stderr
    assert not (card / "kiosk.sig").exists()
