"""Public key pinning for the gateway: `alipay.pin_sha256`, checked on every new TLS connection.

A pin is the base64 SHA-256 of a certificate's DER SubjectPublicKeyInfo (RFC 7469's
`pin-sha256`). A connection passes when any certificate of its *verified* chain (the leaf, an
intermediate or the root that OpenSSL built the path to) has a pinned key, as in HPKP: a pin
on Alipay's issuing CA survives the gateway's certificate renewals, a pin on the leaf key is
the tightest. The chain the server merely sent is never used (anyone can send any certificate
along with theirs). Where Python cannot say the verified chain, only the leaf counts.

The check runs in `connect()`, after the handshake and before a byte of the request leaves, so
a mismatch is a request that was never sent (`PinMismatch`). A kept-alive connection was
checked when it was made.
"""

from __future__ import annotations

import _ssl
import base64
import hashlib
import ssl
from collections.abc import Collection
from typing import Any

from cryptography.hazmat.primitives import serialization
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool


def spki_pin(certificate_der: bytes) -> str:
    """The pin of a certificate (DER): base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    # Loaded at the first pinned connection, not with the client: x509 is a megabyte resident
    # that a kiosk without pins never needs.
    from cryptography import x509

    key = x509.load_der_x509_certificate(certificate_der).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _seen_pin(certificate_der: bytes) -> str:
    try:
        return spki_pin(certificate_der)
    except (ValueError, TypeError):  # a key type this cryptography cannot load: no pin matches
        return "unreadable"


def verified_chain(sock: Any) -> list[bytes]:
    """The peer's verified chain as DER, leaf first. The leaf alone when the chain cannot be
    had, or when verification was off (the "verified" chain is then only what was sent)."""
    leaf = sock.getpeercert(binary_form=True)
    context = getattr(sock, "context", None)
    if getattr(context, "verify_mode", None) != ssl.CERT_REQUIRED:
        return [leaf] if leaf else []
    chain: list[bytes] = []
    public = getattr(sock, "get_verified_chain", None)  # Python 3.13+: DER bytes
    if public is not None:
        chain = [bytes(der) for der in public() or []]
    else:  # 3.10 to 3.12: the same call, private, gives certificate objects
        private = getattr(getattr(sock, "_sslobj", None), "get_verified_chain", None)
        if private is not None:
            chain = [cert.public_bytes(_ssl.ENCODING_DER) for cert in private() or []]
    if chain:
        return chain
    return [leaf] if leaf else []


class PinMismatch(Exception):
    """No key of the gateway's verified chain is pinned: the request was never sent."""

    def __init__(self, host: str, expected: Collection[str], seen: list[str]) -> None:
        self.host = host
        self.expected = sorted(expected)
        self.seen = seen  # the chain's pins, leaf first
        super().__init__(
            f"TLS key pin mismatch for {host}: expected one of {', '.join(self.expected)}; "
            f"the verified chain has {', '.join(seen) or 'no certificate'} (leaf first)"
        )


def chain_pins(sock: Any) -> list[str]:
    """The pins of a TLS socket's verified chain, leaf first."""
    return [_seen_pin(der) for der in verified_chain(sock)]


class PinnedHTTPSConnection(HTTPSConnection):
    """An HTTPS connection whose new connections pass the pin check or close unsent."""

    spki_pins: frozenset[str] = frozenset()

    def connect(self) -> None:
        super().connect()
        if not self.spki_pins:
            return
        seen = chain_pins(self.sock)
        if self.spki_pins.isdisjoint(seen):
            self.close()
            raise PinMismatch(f"{self.host}:{self.port}", self.spki_pins, seen)


def pinned_pool(pins: Collection[str]) -> type[HTTPSConnectionPool]:
    """An HTTPS pool class whose connections check these pins."""

    class Connection(PinnedHTTPSConnection):
        spki_pins = frozenset(pins)

    class Pool(HTTPSConnectionPool):
        ConnectionCls = Connection

    return Pool


class PinnedAdapter(HTTPAdapter):
    """requests' adapter for https://, its pools' connections checking `pins` (none: no check)."""

    def __init__(self, pins: Collection[str], **kwargs: Any) -> None:
        self._pool_class = pinned_pool(pins)  # before HTTPAdapter builds its pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme,
            "https": self._pool_class,
        }
