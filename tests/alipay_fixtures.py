"""Test helpers for the MAPI client: keys for each sign type, and a crafted-answer gateway on
127.0.0.1 that records what it was sent.

The gateway answers with whatever the test's `responder` returns: a body, a status, or a fault
(hold the answer until released, drop the connection, reset it).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from kiosk.alipay.signing import Md5Signature, RsaSignature, Signature, SignType

MD5_KEY = b"0123456789abcdef0123456789abcdef"


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per name, made once per test run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class KeyPair:
    """Both ends of one sign type: what the kiosk holds and what Alipay holds."""

    kiosk: Signature  # signs requests, verifies answers
    alipay: Signature  # verifies requests, signs answers


def key_pair(sign_type: SignType) -> KeyPair:
    if sign_type is SignType.MD5:
        return KeyPair(Md5Signature(MD5_KEY), Md5Signature(MD5_KEY))
    merchant, alipay = rsa_key("merchant"), rsa_key("alipay")
    return KeyPair(
        kiosk=RsaSignature(sign_type, private_key=merchant, public_key=alipay.public_key()),
        alipay=RsaSignature(sign_type, private_key=alipay, public_key=merchant.public_key()),
    )


@dataclass(frozen=True)
class Received:
    """One request as the gateway saw it."""

    path: str
    query: dict[str, str]
    params: dict[str, str]  # the form body
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    hold: bool = False  # keep the answer until the gateway is released
    drop: bool = False  # close the connection without a word
    reset: bool = False  # reset the connection (RST) without a word
    content_length: bool = True  # False: no Content-Length, the body ends at close
    headers: dict[str, str] = field(default_factory=dict)


Responder = Callable[[Received], Reply]


class CraftedGateway:
    """A MAPI gateway stand-in on 127.0.0.1 that answers what the test tells it to."""

    def __init__(self, responder: Responder, tls: ssl.SSLContext | None = None) -> None:
        self.responder = responder
        self._tls = tls
        self.received: queue.Queue[Received] = queue.Queue()
        self.release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                split = urlsplit(self.path)
                got = Received(
                    path=split.path,
                    query=dict(parse_qsl(split.query)),
                    params=dict(parse_qsl(body.decode("ascii"), keep_blank_values=True)),
                    body=body,
                    content_type=self.headers.get("Content-Type", ""),
                    headers=dict(self.headers.items()),
                )
                gateway.received.put(got)
                reply = gateway.responder(got)
                if reply.hold:
                    gateway.release.wait(10)
                    return
                if reply.drop or reply.reset:
                    if reply.reset:
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/xml; charset=GBK")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                else:
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{port}/gateway.do"

    def start(self) -> CraftedGateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()  # frees a held handler at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def last(self) -> Received:
        return self.received.get(timeout=5)


class RefusingPort:
    """A loopback port that refuses connections: bound, never listening."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/gateway.do"

    def close(self) -> None:
        self._socket.close()


def tls_certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    signer: rsa.RSAPrivateKey,
    ca: bool,
) -> x509.Certificate:
    """A certificate Python 3.13's strict verification (VERIFY_X509_STRICT) also takes."""
    now = datetime.datetime.now(datetime.UTC)
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    usage.update(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca)
    usage.update(key_encipherment=not ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
        serving = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
        builder = builder.add_extension(serving, critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a leaf for 127.0.0.1: returns (ca.pem, leaf.pem, leaf.key)."""
    ca_key, leaf_key = rsa_key("tls-ca"), rsa_key("tls-leaf")
    ca_cert = tls_certificate("Kiosk test CA", ca_key, "Kiosk test CA", ca_key, ca=True)
    leaf_cert = tls_certificate("127.0.0.1", leaf_key, "Kiosk test CA", ca_key, ca=False)
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def server_tls(leaf: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    return context
