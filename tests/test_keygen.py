"""`kiosk keygen`: the merchant's RSA key pair made on the kiosk; only the public key leaves."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.signing import load_private_key
from kiosk.keygen import KeygenRefused, generate


def kiosk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiosk", *args], capture_output=True, text=True)


def owner() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "etc/kiosk/keys/merchant_private_key.pem", tmp_path / "boot/merchant.pem"


def test_keygen_writes_an_owner_only_private_key_and_only_the_public_key_to_boot(
    paths: tuple[Path, Path],
) -> None:
    private, public = paths
    public.parent.mkdir()

    done = kiosk("keygen", "--owner", owner(), "--private-key", str(private),
                 "--public-key", str(public))  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o750
    key = load_private_key(private.read_bytes())
    assert key.key_size == 2048
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()  # PKCS#8, unencrypted
    loaded = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert sorted(p.name for p in public.parent.iterdir()) == ["merchant.pem", "merchant.txt"]
    body = private.read_bytes().splitlines()[1].decode()
    assert body not in done.stdout + done.stderr  # never printed
    assert "PRIVATE" not in done.stdout


def test_the_note_says_where_to_upload_the_public_key(paths: tuple[Path, Path]) -> None:
    private, public = paths

    report = generate(private, public)

    note = report.note.read_bytes().decode("utf-8")
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    lines = note.split("\r\n")
    assert base64.b64encode(der).decode() in lines  # one line to paste into the portal
    assert any("Edit my public key" in line for line in lines)
    assert any("RSA2 Key Information" in line for line in lines)
    assert f'       private_key_file = "{private}"' in lines
    assert "-----BEGIN" not in note
    assert all(line.decode() not in note for line in private.read_bytes().splitlines()[1:-1])


def test_an_existing_key_is_never_replaced_without_force(paths: tuple[Path, Path]) -> None:
    private, public = paths
    generate(private, public)
    first = private.read_bytes()

    with pytest.raises(KeygenRefused, match="exists; not replaced"):
        generate(private, public)
    assert private.read_bytes() == first

    again = kiosk("keygen", "--owner", owner(), "--private-key", str(private),
                  "--public-key", str(public))  # fmt: skip
    assert again.returncode == 2 and "Give --force to replace it" in again.stderr

    generate(private, public, force=True)
    assert private.read_bytes() != first
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_4096_bits_on_request(paths: tuple[Path, Path]) -> None:
    report = generate(*paths, bits=4096)

    assert report.bits == 4096
    assert load_private_key(paths[0].read_bytes()).key_size == 4096


def test_other_sizes_are_refused(paths: tuple[Path, Path]) -> None:
    done = kiosk("keygen", "--bits", "1024", "--private-key", str(paths[0]))

    assert done.returncode == 2
    assert "invalid choice: 1024" in done.stderr
    assert not paths[0].exists()


def test_as_root_the_key_goes_to_the_service_user_who_must_exist(
    paths: tuple[Path, Path],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        import pwd

        pwd.getpwnam("kiosk")
        pytest.skip("this machine has a kiosk user")
    except KeyError:
        pass

    done = kiosk("keygen", "--private-key", str(paths[0]), "--public-key", str(paths[1]))

    assert done.returncode == 1
    assert "the service user 'kiosk' or group 'kiosk' does not exist" in done.stderr
    assert not paths[0].exists()


def test_a_key_made_on_the_kiosk_is_used_in_place_by_provisioning(tmp_path: Path) -> None:
    from kiosk.provision import provision

    from .test_provision import SOURCE

    etc = tmp_path / "etc"
    boot = tmp_path / "boot"
    boot.mkdir()
    generate(etc / "keys/merchant_private_key.pem", boot / "merchant_public_key.pem")
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (boot / "alipay_public_key.pem").write_bytes(
        alipay.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    made = (etc / "keys/merchant_private_key.pem").read_bytes()
    (boot / "kiosk.toml").write_text(
        SOURCE.replace('"merchant_private_key.pem"', f'"{etc}/keys/merchant_private_key.pem"')
    )

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "installed" and report.left_in_place == []
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == made
    assert (boot / "merchant_public_key.pem").exists()  # public: stays for the upload
