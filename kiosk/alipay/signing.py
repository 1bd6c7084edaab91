"""MAPI signatures: the pre-sign string, and MD5, RSA (SHA1) and RSA2 (SHA256) signers.

Used by both sides: the client signs requests and verifies answers; the gateway simulator
verifies requests and signs answers. A `Signature` with only a public key can verify but not
sign, and vice versa.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kiosk.errors import KeyFileError


class SignType(enum.StrEnum):
    RSA2 = "RSA2"  # SHA256withRSA, recommended
    RSA = "RSA"  # SHA1withRSA
    MD5 = "MD5"  # md5(pre-sign string + merchant key)


def presign_string(params: Mapping[str, str]) -> str:
    """Every parameter but `sign` and `sign_type`, empty values left out, sorted by key in byte
    order, joined as `key=value` with `&`, values raw (not URL-encoded)."""
    items = [
        (key, value)
        for key, value in params.items()
        if key not in ("sign", "sign_type") and value is not None and value != ""
    ]
    items.sort(key=lambda kv: kv[0].encode("utf-8"))
    return "&".join(f"{key}={value}" for key, value in items)


class Signature(Protocol):
    sign_type: SignType

    def sign(self, text: str, encoding: str = "utf-8") -> str: ...

    def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool: ...


class Md5Signature:
    """MD5: lowercase hex of md5(text + key); the key appended directly, no `&key=`."""

    sign_type: SignType = SignType.MD5

    def __init__(self, key: bytes) -> None:
        key = key.strip()
        if not key:
            raise KeyFileError("the MD5 key is empty")
        self._key = key

    def sign(self, text: str, encoding: str = "utf-8") -> str:
        return hashlib.md5(text.encode(encoding) + self._key).hexdigest()

    def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool:
        # Compare bytes: compare_digest refuses non-ASCII str, and a forged sign may hold some.
        expected = self.sign(text, encoding).encode("ascii")
        return hmac.compare_digest(expected, signature.strip().lower().encode("utf-8"))

    def __repr__(self) -> str:  # never show the key
        return "Md5Signature(key=<hidden>)"


class RsaSignature:
    """RSA (SHA1withRSA) or RSA2 (SHA256withRSA), PKCS#1 v1.5, base64."""

    def __init__(
        self,
        sign_type: SignType,
        private_key: rsa.RSAPrivateKey | None = None,
        public_key: rsa.RSAPublicKey | None = None,
    ) -> None:
        if sign_type is SignType.MD5:
            raise ValueError("RsaSignature is for RSA and RSA2")
        self.sign_type: SignType = sign_type
        self._private_key = private_key
        self._public_key = public_key

    def _hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.sign_type is SignType.RSA2 else hashes.SHA1()

    def sign(self, text: str, encoding: str = "utf-8") -> str:
        if self._private_key is None:
            raise KeyFileError("no private key to sign with")
        raw = self._private_key.sign(text.encode(encoding), padding.PKCS1v15(), self._hash())
        return base64.b64encode(raw).decode("ascii")

    def verify(self, text: str, signature: str, encoding: str = "utf-8") -> bool:
        if self._public_key is None:
            raise KeyFileError("no public key to verify with")
        try:
            raw = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        try:
            self._public_key.verify(raw, text.encode(encoding), padding.PKCS1v15(), self._hash())
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"RsaSignature({self.sign_type.value}, key=<hidden>)"


# The last private key loaded, by the SHA-256 of its file's bytes. Loading one checks it
# (cryptography tests both primes: about 50 ms for 2048 bits here, several times that on a Pi),
# and `kiosk run` loads the same file three times as it starts: the config check, then the
# clients of the sale and of the journal worker. A changed file is a new key, checked again.
# The check stays whole: a key checked by its signatures alone was found to let through keys
# that sign wrong at random (a "prime" that is not one), a modulus that is a square, and a
# private exponent that makes every signature take seconds.
_last_private_key: tuple[bytes, rsa.RSAPrivateKey] | None = None

# The smallest merchant key the kiosk signs with.
MIN_KEY_BITS = 2048


def load_private_key(pem: bytes, source: str = "private key") -> rsa.RSAPrivateKey:
    """A merchant private key, PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 PEM, with
    cryptography's full check of its numbers.

    Alipay's key tool writes the bare base64 body (no BEGIN/END lines); that is accepted too.
    """
    global _last_private_key
    digest = hashlib.sha256(pem).digest()
    last = _last_private_key
    if last is not None and hmac.compare_digest(last[0], digest):
        return last[1]
    key = _load_private_key(pem, source)
    _last_private_key = (digest, key)
    return key


def _load_private_key(pem: bytes, source: str) -> rsa.RSAPrivateKey:
    if b"-----BEGIN" not in pem:
        for label in _BARE_LABELS:
            try:
                bare = serialization.load_pem_private_key(_wrapped(pem, label), password=None)
            except (ValueError, TypeError):
                continue
            if isinstance(bare, rsa.RSAPrivateKey):
                return bare
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        if holds_private_key(pem):
            raise KeyFileError(
                f"{source} is an RSA key whose numbers do not belong together (its primes, or "
                "the numbers made from them, are wrong: a damaged or hand-edited key)"
            ) from None
        # The library's message can quote key material; say only what is wrong.
        raise KeyFileError(f"{source} is not an unencrypted PKCS#1 or PKCS#8 PEM RSA key") from (
            None if "BEGIN" in str(exc) else exc
        )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{source} is not an RSA key")
    return key


# What a bare base64 body (Alipay's key tool) may be the inside of: PKCS#8, then PKCS#1.
_BARE_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY")


def _wrapped(body: bytes, label: bytes) -> bytes:
    """A bare base64 body (Alipay's key tool) as the PEM it is the inside of."""
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, body.strip(), label)


def holds_private_key(pem: bytes) -> bool:
    """Whether the PEM (or bare base64 body) holds an RSA private key, its numbers unchecked:
    to tell what a file is, never to sign with."""
    bare = b"-----BEGIN" not in pem
    texts = [_wrapped(pem, label) for label in _BARE_LABELS] if bare else [pem]
    for text in texts:
        try:
            key = serialization.load_pem_private_key(
                text, password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError):
            continue
        if isinstance(key, rsa.RSAPrivateKey):
            return True
    return False


def load_public_key(pem: bytes, source: str = "public key") -> rsa.RSAPublicKey:
    """Alipay's public key: an X.509 SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).

    Alipay's portal hands out the bare base64 body too; that is accepted and wrapped.
    """
    text = pem.strip()
    if b"-----BEGIN" not in text:
        text = b"-----BEGIN PUBLIC KEY-----\n" + text + b"\n-----END PUBLIC KEY-----\n"
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError):
        raise KeyFileError(f"{source} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError(f"{source} is not an RSA key")
    return key


def read_secret_file(path: Path, what: str) -> bytes:
    """Read a private key or MD5 key file, refusing one that group or others can read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is readable by group or others (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror}") from None
