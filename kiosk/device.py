"""The machine's host name, time zone and Wi-Fi, as `[device]` asks, written into the files the
image's own services read (as Raspberry Pi OS's custom.toml does at first boot).

`SystemFiles(root)` writes under `root`: "/" on a kiosk, a temporary folder in tests. It only
writes files; nothing here starts, stops or reloads a service. The host name and Wi-Fi take
effect at the next boot (the provisioning unit runs too early, and sandboxed, to change the
running system); the time zone for every process started after it, the daemon included.

Wi-Fi goes to NetworkManager when the image has it (a keyfile), else to wpa_supplicant with
systemd-networkd (the Debian image). Either way the passphrase is stored only as the 256-bit
key WPA derives from it (as wpa_passphrase does), in a root-only file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.config_keys import DeviceSection

WIFI_CONNECTION = "kiosk-wifi"
NM_KEYFILE = Path("etc/NetworkManager/system-connections/kiosk-wifi.nmconnection")
WPA_CONF = Path("etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
WPA_UNIT = "wpa_supplicant@.service"
WPA_WANTS = Path("etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service")
NETWORKD_WLAN = Path("etc/systemd/network/25-kiosk-wifi.network")
REGDOM_CONF = Path("etc/modprobe.d/kiosk-wifi-country.conf")
UNIT_DIRS = (Path("lib/systemd/system"), Path("usr/lib/systemd/system"))


def hostname_for(terminal_id: str) -> str:
    """A valid host name from a terminal id: lower case, "_" as "-", no "-" at either end."""
    name = terminal_id.lower().replace("_", "-").strip("-")[:63].strip("-")
    return name or "kiosk"


@dataclass(frozen=True)
class Wifi:
    ssid: str
    country: str
    psk: bytes | None = field(default=None, repr=False)  # passphrase or 64 hex digits; None: open

    def wpa_key(self) -> str | None:
        """The 256-bit pre-shared key as 64 hex digits (PBKDF2 of the passphrase, as WPA does)."""
        if self.psk is None:
            return None
        phrase = self.psk.rstrip(b"\r\n")
        if re.fullmatch(rb"[0-9A-Fa-f]{64}", phrase):
            return phrase.decode("ascii").lower()
        return hashlib.pbkdf2_hmac("sha1", phrase, self.ssid.encode("utf-8"), 4096, 32).hex()


@dataclass(frozen=True)
class Identity:
    """What provisioning applies: always a host name; a time zone and Wi-Fi when asked."""

    hostname: str
    timezone: str = ""
    wifi: Wifi | None = None

    @classmethod
    def from_config(cls, device: DeviceSection, terminal_id: str, psk: bytes | None) -> Identity:
        wifi = Wifi(device.wifi_ssid, device.wifi_country, psk) if device.wifi_ssid else None
        return cls(device.hostname.lower() or hostname_for(terminal_id), device.timezone, wifi)


class SystemFiles:
    """The image's configuration files under `root`. Each `set_*` returns True when it changed
    a file, False when it was already so; an OSError says which file could not be written."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def apply(self, identity: Identity) -> tuple[list[str], list[str]]:
        """Apply all; return (what changed, what could not be done), each a line for people."""
        done: list[str] = []
        failed: list[str] = []
        steps: list[tuple[str, object]] = [("host name", identity.hostname)]
        if identity.timezone:
            steps.append(("time zone", identity.timezone))
        if identity.wifi is not None:
            steps.append(("Wi-Fi", identity.wifi.ssid))
        for what, value in steps:
            try:
                if what == "host name":
                    changed = self.set_hostname(identity.hostname)
                elif what == "time zone":
                    changed = self.set_timezone(identity.timezone)
                else:
                    assert identity.wifi is not None
                    changed = self.set_wifi(identity.wifi)
            except (OSError, ValueError) as exc:
                failed.append(f"{what} {value!r} not set: {_why(exc)}")
                continue
            if changed:
                done.append(f"{what} {value!r}")
        return done, failed

    # -- host name

    def set_hostname(self, name: str) -> bool:
        changed = self._write(Path("etc/hostname"), f"{name}\n".encode(), 0o644)
        hosts = self.root / "etc/hosts"
        if hosts.is_file():
            lines = hosts.read_text(encoding="utf-8", errors="replace").splitlines()
            mine = f"127.0.1.1\t{name}"  # Debian's line for the machine's own name
            new: list[str] = []
            for line in lines:
                if not line.startswith("127.0.1.1"):
                    new.append(line)
                elif mine not in new:
                    new.append(mine)
            if mine not in new:
                new.append(mine)
            changed |= self._write(Path("etc/hosts"), ("\n".join(new) + "\n").encode(), 0o644)
        return changed

    # -- time zone

    def set_timezone(self, zone: str) -> bool:
        if not (self.root / "usr/share/zoneinfo" / zone).is_file():
            raise ValueError(f"the image has no /usr/share/zoneinfo/{zone} (tzdata)")
        target = f"/usr/share/zoneinfo/{zone}"
        link = self.root / "etc/localtime"
        changed = not (link.is_symlink() and os.readlink(link) == target)
        if changed:
            link.parent.mkdir(parents=True, exist_ok=True)
            temp = link.with_name(f".localtime.{os.getpid()}")
            temp.unlink(missing_ok=True)
            os.symlink(target, temp)
            os.replace(temp, link)
            _fsync_dir(link.parent)
        return self._write(Path("etc/timezone"), f"{zone}\n".encode(), 0o644) or changed

    # -- Wi-Fi

    def set_wifi(self, wifi: Wifi) -> bool:
        changed = self._write(
            REGDOM_CONF, f"options cfg80211 ieee80211_regdom={wifi.country}\n".encode(), 0o644
        )
        if (self.root / "etc/NetworkManager").is_dir():
            return self._write(NM_KEYFILE, _nm_keyfile(wifi), 0o600) or changed
        unit = next((d / WPA_UNIT for d in UNIT_DIRS if (self.root / d / WPA_UNIT).is_file()), None)
        if unit is None:
            raise ValueError("the image has neither NetworkManager nor wpa_supplicant")
        changed |= self._write(WPA_CONF, _wpa_conf(wifi), 0o600)
        changed |= self._write(NETWORKD_WLAN, b"[Match]\nName=wl*\n\n[Network]\nDHCP=yes\n", 0o644)
        wants = self.root / WPA_WANTS
        if not wants.is_symlink():
            wants.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f"/{unit}", wants)
            changed = True
        return changed

    # -- files

    def _write(self, relative: Path, data: bytes, mode: int) -> bool:
        """Write `data` atomically unless the file already holds it; True when written."""
        path = self.root / relative
        try:
            if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
                return False
        except OSError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return True


def _keyfile_value(text: str) -> str:
    """A GLib key file string: backslash, line breaks and edge spaces escaped."""
    escaped = (
        text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    if escaped.startswith(" "):
        escaped = "\\s" + escaped[1:]
    return escaped


def _nm_keyfile(wifi: Wifi) -> bytes:
    key = wifi.wpa_key()
    lines = [
        "[connection]",
        f"id={WIFI_CONNECTION}",
        f"uuid={uuid.uuid5(uuid.NAMESPACE_URL, 'kiosk-wifi:' + wifi.ssid)}",
        "type=wifi",
        "autoconnect=true",
        "",
        "[wifi]",
        "mode=infrastructure",
        f"ssid={_keyfile_value(wifi.ssid)}",
        "",
    ]
    if key is not None:
        lines += ["[wifi-security]", "key-mgmt=wpa-psk", f"psk={key}", ""]
    lines += ["[ipv4]", "method=auto", "", "[ipv6]", "method=auto", ""]
    return "\n".join(lines).encode("utf-8")


def _wpa_conf(wifi: Wifi) -> bytes:
    key = wifi.wpa_key()
    security = f"\tpsk={key}\n\tkey_mgmt=WPA-PSK\n" if key else "\tkey_mgmt=NONE\n"
    return (
        "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
        "update_config=0\n"
        f"country={wifi.country}\n\n"
        "network={\n"
        f"\tssid={wifi.ssid.encode('utf-8').hex()}\n"  # hex: any byte, no quoting to get wrong
        "\tscan_ssid=1\n"
        f"{security}"
        "}\n"
    ).encode("ascii")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    return str(exc)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
