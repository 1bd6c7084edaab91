"""Signed provisioning: the operator's Ed25519 key signs a manifest of SHA-256 hashes of the
config and every file it names. A kiosk whose image carries the operator's public key installs
nothing else, so a card or USB stick with another config cannot divert its payments.

The signature file, `kiosk.sig` beside `kiosk.toml`, is UTF-8 text a person can read and
`sha256sum` can check by hand:

    kiosk-provisioning-bundle 1
    created 2025-06-01T09:30:00Z
    sha256 3b1f...e0  kiosk.toml
    sha256 9c4d...77  merchant_private_key.pem
    ed25519 <base64 signature of every byte above this line>

Out of scope: key distribution (the image build installs the public key) and revocation
(a new image, or a signed bundle, replaces what a stolen laptop signed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kiosk.errors import KioskError

SIGNATURE_FILE = "kiosk.sig"
HEADER = "kiosk-provisioning-bundle 1"
_LINE = re.compile(r"sha256 ([0-9a-f]{64})  (\S.*)")
_CREATED = re.compile(r"created (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


class BundleError(KioskError, ValueError):
    """A signature file that is missing, malformed, or not signed by the operator's key."""


@dataclass(frozen=True)
class Manifest:
    created: str  # ISO 8601 UTC, to the second: a later bundle never sorts before an earlier
    files: dict[str, str]  # relative POSIX path -> lowercase hex SHA-256

    def text(self) -> bytes:
        lines = [HEADER, f"created {self.created}"]
        lines += [f"sha256 {digest}  {name}" for name, digest in sorted(self.files.items())]
        return ("\n".join(lines) + "\n").encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short name for an operator key: SHA-256 of its raw 32 bytes, first 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    """The signature file's bytes for this manifest."""
    body = manifest.text()
    signature = base64.b64encode(key.sign(body)).decode("ascii")
    return body + f"ed25519 {signature}\n".encode("ascii")


def verify(signed: bytes, key: Ed25519PublicKey) -> Manifest:
    """The manifest, if `signed` is a well-formed signature file signed by `key`."""
    text = signed.replace(b"\r\n", b"\n")  # a laptop's editor may have touched it
    cut = text.rstrip(b"\n").rfind(b"\n") + 1
    body, last = text[:cut], text[cut:].strip()
    if not last.startswith(b"ed25519 "):
        raise BundleError(f"{SIGNATURE_FILE} has no 'ed25519 ...' signature line at its end")
    try:
        signature = base64.b64decode(last[len(b"ed25519 ") :], validate=True)
        key.verify(signature, body)
    except (binascii.Error, ValueError, InvalidSignature):
        raise BundleError(
            f"{SIGNATURE_FILE} is not signed by this kiosk's operator key ({fingerprint(key)})"
        ) from None
    return _parse(body.decode("utf-8"))


def _parse(body: str) -> Manifest:
    lines = body.splitlines()
    if not lines or lines[0] != HEADER:
        raise BundleError(f"{SIGNATURE_FILE} does not start with '{HEADER}'")
    created = _CREATED.fullmatch(lines[1]) if len(lines) > 1 else None
    if created is None:
        raise BundleError(f"{SIGNATURE_FILE} has no 'created YYYY-MM-DDTHH:MM:SSZ' line")
    files: dict[str, str] = {}
    for line in lines[2:]:
        found = _LINE.fullmatch(line)
        if found is None or not safe_name(found.group(2)):
            raise BundleError(f"{SIGNATURE_FILE}: cannot read the line {line[:80]!r}")
        files[found.group(2)] = found.group(1)
    return Manifest(created.group(1), files)


def safe_name(name: str) -> bool:
    """A relative path inside the bundle's folder: no '..', not absolute, no backslash."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- operator keys ----------------------------------------------------------------------------


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The operator's public key: PEM (`BEGIN PUBLIC KEY`), as `kiosk provision sign --keygen`
    writes it. Any problem is a BundleError: provisioning must fail closed, never unsigned."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"operator key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise BundleError(f"operator key {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"operator key {path} is not an Ed25519 key")
    return key


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"operator key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise BundleError(
            f"operator key {path} is encrypted: give its passphrase "
            "(a terminal asks; else set KIOSK_OPERATOR_PASSPHRASE)"
            if passphrase is None
            else f"operator key {path} is not encrypted; give no passphrase"
        ) from None
    except ValueError:
        raise BundleError(
            f"operator key {path} is not a PEM private key, or the passphrase is wrong"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"operator key {path} is not an Ed25519 key")
    return key


def is_encrypted(path: Path) -> bool:
    try:
        return b"ENCRYPTED" in path.read_bytes()
    except OSError:
        return False


def generate(private_path: Path, public_path: Path, passphrase: bytes | None) -> str:
    """A new operator key pair: the private key owner-only (encrypted when a passphrase is
    given), the public key for the image. Refuses to overwrite either. Returns the fingerprint."""
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path} exists; not overwritten")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_new(private_path, private, 0o600)
    write_new(public_path, public, 0o644)
    return fingerprint(key.public_key())


def write_new(path: Path, data: bytes, mode: int | None, replace: bool = False) -> None:
    """Write a file atomically with `mode` from the start (never readable by others on the
    way); refuse an existing file unless `replace`. `mode` None: as the folder gives (FAT)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)  # fails if the name exists, unlike rename
            except FileExistsError:
                raise
            except OSError:  # FAT has no hard links
                if path.exists():
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(temp, path)
            else:
                os.unlink(temp)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(dir_fd)
