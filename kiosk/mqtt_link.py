"""One MQTT connection for telemetry, on paho-mqtt, driven by its owner's thread.

paho is imported here only, and this module only when `[telemetry] mqtt_url` is set, so a
kiosk without telemetry never loads it. The owner calls `connect()` (one attempt, raising
`LinkError` with a sentence that names the cause and never the password) and `step()` (one
wait on the socket and the owner's wake descriptor, then paho's read, write and keep-alive
work), all from one thread: paho's own threads are not used.
"""

from __future__ import annotations

import contextlib
import select
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from kiosk.errors import KioskError

KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"mqtts": 8883, "mqtt": 1883}


class LinkError(KioskError, ConnectionError):
    """The broker could not be reached, refused the TLS handshake, or refused the login."""


@dataclass(frozen=True)
class LinkSettings:
    url: str  # mqtts://host[:port] or mqtt://host[:port] (checked by the config)
    client_id: str
    username: str = ""
    password: str = ""  # read from password_file; never logged, never in an error
    ca_bundle: str = ""  # "" = the system's trust store
    will_topic: str = ""  # the broker publishes "offline" here, retained, if we vanish
    will_payload: str = "offline"


class MqttLink:
    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_connected: Callable[[], None],
        on_lost: Callable[[str], None],
        on_published: Callable[[int], None],
    ) -> None:
        parts = urllib.parse.urlsplit(settings.url)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "mqtts"
        self.port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._settings = settings
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._on_published = on_published
        self.connected = False
        self._connecting = False
        self._closing = False
        self._client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        s = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(0)  # the owner keeps its own window
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        if self.tls:
            context = ssl.create_default_context(cafile=s.ca_bundle or None)
            client.tls_set_context(context)
        if s.will_topic:
            client.will_set(s.will_topic, s.will_payload, qos=1, retain=True)
        client.on_connect = self._connect_answered
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        return client

    @property
    def busy(self) -> bool:
        """Connected, or waiting for the broker's answer to a connect."""
        return self.connected or self._connecting

    def connect(self) -> None:
        """One attempt: TCP, TLS, CONNECT. The broker's answer arrives through `step()`."""
        try:
            self._client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        except ssl.SSLCertVerificationError as exc:
            raise LinkError(
                f"TLS: the broker's certificate is not trusted ({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            raise LinkError(f"TLS: {exc.reason or exc}") from None
        except OSError as exc:
            raise LinkError(exc.strerror or type(exc).__name__) from None
        self._connecting = True

    def step(self, timeout: float, wake_fd: int) -> bool:
        """Wait up to `timeout` for the socket or `wake_fd`; do paho's network work. True when
        `wake_fd` became readable (the owner drains it)."""
        sock = self._client.socket()
        readers: list[Any] = [wake_fd]
        writers: list[Any] = []
        if sock is not None:
            readers.append(sock)
            if self._client.want_write():
                writers.append(sock)
        try:
            readable, writable, _ = select.select(readers, writers, [], max(timeout, 0.0))
        except (OSError, ValueError):  # a socket closed under us: paho notices below
            readable, writable = [], []
        if sock is not None:
            if sock in readable:
                self._client.loop_read()
            if sock in writable and self._client.socket() is not None:
                self._client.loop_write()
            if self._client.socket() is not None:
                self._client.loop_misc()
        return wake_fd in readable

    def publish(self, topic: str, payload: str, retain: bool = False) -> int:
        """Hand one QoS 1 message to paho; its message id, reported to `on_published` once
        the broker has it."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        return int(info.mid)

    def wants_write(self) -> bool:
        return self._client.want_write()

    def disconnect(self) -> None:
        """A clean disconnect (the broker does not send the last will)."""
        self._closing = True
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self.connected = self._connecting = False

    # -- paho's callbacks, on the owner's thread (inside step) ------------------------------

    def _connect_answered(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connecting = False
        if reason.is_failure:
            with contextlib.suppress(Exception):
                client.disconnect()
            self._on_lost(f"the broker refused the connection ({reason})")
            return
        self.connected = True
        self._on_connected()

    def _disconnected(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was = self.connected or self._connecting
        self.connected = self._connecting = False
        if was and not self._closing:
            self._on_lost(f"connection lost ({reason})")

    def _published(
        self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        self._on_published(mid)
