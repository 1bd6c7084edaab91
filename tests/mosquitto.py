"""A real Mosquitto broker for the telemetry tests: started by the test on a free loopback port
(plain, or TLS with a test CA and a password file), stopped and started again on the same
port at will, and a subscriber that records every message it sees (waited on, never slept for).

`mosquitto_problem()` says why no broker can run here (Debian: `apt-get install mosquitto`,
listed in tools/host-packages.txt), or None. In CI its absence is a failure, not a skip.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/bin/mosquitto_passwd" if Path("/usr/bin/mosquitto_passwd").exists() else None
)


def mosquitto_problem() -> str | None:
    if MOSQUITTO is None:
        return "no mosquitto binary (Debian: apt-get install mosquitto)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- a test CA ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TestCA:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_ca(folder: Path, name: str = "kiosk-test-ca") -> TestCA:
    """A CA and a server certificate for localhost and 127.0.0.1, signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = TestCA(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.key_pem.chmod(0o600)
    return paths


# -- the broker ---------------------------------------------------------------------------


class Broker:
    """One mosquitto process; `stop()` and `start()` again keep its port (and lose what it
    retained: it runs without persistence, like a broker restarted from scratch)."""

    def __init__(
        self,
        folder: Path,
        *,
        tls: TestCA | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        assert MOSQUITTO is not None, mosquitto_problem()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr"]
        lines += ["log_type error", "log_type warning", "log_type notice", "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")  # read the test's files where they are
        if tls is not None:
            lines += [f"cafile {tls.ca_pem}", f"certfile {tls.cert_pem}", f"keyfile {tls.key_pem}"]
        if users:
            assert MOSQUITTO_PASSWD is not None, "mosquitto_passwd is missing"
            passwd = folder / "passwd"
            passwd.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(passwd), user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        running = threading.Event()

        def read(proc: subprocess.Popen[bytes]) -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if " running" in line:
                    running.set()
            running.set()  # ended: start() looks at the exit status

        threading.Thread(target=read, args=(self.proc,), daemon=True).start()
        if not running.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto did not start: {self.log[-10:]}")

    def stop(self) -> None:
        # SIGKILL: mosquitto may take a SIGTERM only at its next wake-up, seconds later; for
        # its clients either one closes their connections at once.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# -- a subscriber -------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Subscribes to `topics` and keeps every message, in order."""

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        *,
        username: str = "",
        password: str = "",
    ) -> None:
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if username:
            client.username_pw_set(username, password)
        if broker.tls is not None:
            client.tls_set_context(ssl.create_default_context(cafile=str(broker.tls.ca_pem)))

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe([(topic, 1) for topic in topics])

        def on_subscribe(c: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
            self._subscribed.set()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            with self._changed:
                self.messages.append(
                    Message(msg.topic, msg.payload.decode("utf-8"), bool(msg.retain), msg.qos)
                )
                self._changed.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect("localhost" if broker.tls else "127.0.0.1", broker.port, keepalive=30)
        client.loop_start()
        self.client = client
        if not self._subscribed.wait(10):
            raise RuntimeError("the test's subscriber could not subscribe")

    def on(self, topic: str) -> list[Message]:
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float = 15.0, what: str = ""
    ) -> Message:
        """The first message (seen so far or to come) that matches."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages[-15:]]
                    raise AssertionError(f"no message {what} within {timeout} s; last: {seen}")
                self._changed.wait(left)

    def wait_after(
        self,
        start: int,
        predicate: Callable[[Message], bool],
        timeout: float = 15.0,
        what: str = "",
    ) -> Message:
        """Like wait_for, among the messages from index `start` on."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages[start:]:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages[-15:]]
                    raise AssertionError(f"no message {what} within {timeout} s; last: {seen}")
                self._changed.wait(left)

    @property
    def size(self) -> int:
        with self._changed:
            return len(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
