"""[device]: host name, time zone and Wi-Fi from the boot partition, checked by `kiosk check`
and written by provisioning into a temporary root's files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.config import check_config
from kiosk.device import Identity, SystemFiles, Wifi, hostname_for
from kiosk.provision import provision

PASSPHRASE = b"correct horse battery staple"

CONFIG = """\
[kiosk]
terminal_id = "VM_0042"

[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
private_key_file = "merchant_private_key.pem"
alipay_public_key_file = "alipay_public_key.pem"

[merchant]
secondary_merchant_id = "M-001"
store_id = "S-042"

[sale]
price = "1.50"

[scanner]
driver = "fake"

[vend]
driver = "fake"

[device]
"""


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


@pytest.fixture
def boot(tmp_path: Path, pems: tuple[bytes, bytes]) -> Path:
    folder = tmp_path / "boot"
    folder.mkdir()
    (folder / "merchant_private_key.pem").write_bytes(pems[0])
    (folder / "alipay_public_key.pem").write_bytes(pems[1])
    (folder / "wifi.psk").write_bytes(PASSPHRASE + b"\r\n")  # a Windows laptop's line end
    (folder / "wifi.psk").chmod(0o600)
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image's root: tzdata for one zone, wpa_supplicant's unit, an /etc/hosts."""
    root = tmp_path / "root"
    (root / "usr/share/zoneinfo/Europe").mkdir(parents=True)
    (root / "usr/share/zoneinfo/Europe/Berlin").write_bytes(b"TZif2")
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/wpa_supplicant@.service").write_text("[Service]\n")
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tkiosk\n")
    return root


def problems_of(boot: Path, device: str) -> list[str]:
    (boot / "kiosk.toml").write_text(CONFIG + device)
    _, problems = check_config(boot / "kiosk.toml", check_key_modes=False)
    return [str(p).split(": ", 1)[1] for p in problems]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("terminal_id", "hostname"),
    [("VM-0042", "vm-0042"), ("VM_0042", "vm-0042"), ("_kiosk_", "kiosk"), ("___", "kiosk")],
)
def test_the_host_name_defaults_to_the_terminal_id_made_valid(
    terminal_id: str, hostname: str
) -> None:
    assert hostname_for(terminal_id) == hostname


def test_wpa_key_is_derived_as_wpa_passphrase_does() -> None:
    # IEEE 802.11i-2004, H.4.2: passphrase "password", SSID "IEEE".
    wifi = Wifi("IEEE", "DE", b"password\n")
    assert wifi.wpa_key() == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    assert "password" not in repr(wifi)


def test_a_good_device_section_checks_clean(boot: Path) -> None:
    device = (
        'hostname = "Kiosk-7"\ntimezone = "Europe/Berlin"\nwifi_ssid = "KioskNet"\n'
        'wifi_psk_file = "wifi.psk"\nwifi_country = "DE"\n'
    )
    assert problems_of(boot, device) == []


def test_wifi_without_a_country_is_refused(boot: Path) -> None:
    found = problems_of(boot, 'wifi_ssid = "KioskNet"\nwifi_psk_file = "wifi.psk"\n')
    assert found == [
        "error: device.wifi_ssid needs device.wifi_country: the radio stays off without it "
        '(hint: add  wifi_country = "DE"  (the ISO 3166 code of where the kiosk stands))'
    ]


def test_a_short_passphrase_is_refused_without_showing_it(boot: Path) -> None:
    (boot / "wifi.psk").write_bytes(b"zqxjv\n")
    found = problems_of(
        boot, 'wifi_ssid = "KioskNet"\nwifi_psk_file = "wifi.psk"\nwifi_country = "DE"\n'
    )
    assert len(found) == 1
    assert "must hold a WPA passphrase of 8 to 63 printable ASCII characters" in found[0]
    assert "it holds 5 bytes" in found[0] and "zqxjv" not in found[0]


def test_an_open_network_is_a_warning(boot: Path) -> None:
    found = problems_of(boot, 'wifi_ssid = "CafeWifi"\nwifi_country = "DE"\n')
    assert found[0].startswith("warning: device.wifi_ssid 'CafeWifi' has no wifi_psk_file")


def test_an_unknown_time_zone_gets_a_suggestion(boot: Path) -> None:
    found = problems_of(boot, 'timezone = "Europe/Berln"\n')
    assert found == [
        "error: device.timezone 'Europe/Berln' is not a time zone this system knows "
        '(hint: did you mean "Europe/Berlin"?)'
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('hostname = "vm_0042"', "device.hostname 'vm_0042' must be 1 to 63 letters"),
        ('hostname = "-vm"', "device.hostname '-vm' must be 1 to 63 letters"),
        ('wifi_country = "de"', "device.wifi_country 'de' must be a two-letter country code"),
    ],
)
def test_bad_device_values_are_refused(boot: Path, line: str, message: str) -> None:
    found = problems_of(boot, line + '\nwifi_ssid = "KioskNet"\nwifi_psk_file = "wifi.psk"\n')
    assert any(message in f for f in found), found


def test_a_group_readable_passphrase_file_is_refused_by_kiosk_check(boot: Path) -> None:
    (boot / "wifi.psk").chmod(0o644)
    (boot / "kiosk.toml").write_text(
        CONFIG + 'wifi_ssid = "KioskNet"\nwifi_psk_file = "wifi.psk"\nwifi_country = "DE"\n'
    )
    _, problems = check_config(boot / "kiosk.toml")
    assert any("device.wifi_psk_file" in p.message and "0644" in p.message for p in problems)


def test_host_name_goes_to_etc_hostname_and_hosts(root: Path) -> None:
    changed, failed = SystemFiles(root).apply(Identity("vm-0042"))

    assert (changed, failed) == (["host name 'vm-0042'"], [])
    assert (root / "etc/hostname").read_text() == "vm-0042\n"
    assert (root / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tvm-0042\n"


def test_time_zone_links_etc_localtime(root: Path) -> None:
    SystemFiles(root).apply(Identity("vm-0042", "Europe/Berlin"))

    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert (root / "etc/timezone").read_text() == "Europe/Berlin\n"


def test_a_zone_the_image_lacks_is_reported_not_fatal(root: Path) -> None:
    changed, failed = SystemFiles(root).apply(Identity("vm-0042", "Asia/Singapore"))

    assert changed == ["host name 'vm-0042'"]
    assert failed == [
        "time zone 'Asia/Singapore' not set: the image has no /usr/share/zoneinfo/Asia/Singapore "
        "(tzdata)"
    ]


def test_wifi_with_wpa_supplicant_and_networkd(root: Path) -> None:
    wifi = Wifi("Kiosk Net", "DE", PASSPHRASE)

    SystemFiles(root).apply(Identity("vm-0042", wifi=wifi))

    conf = root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    text = conf.read_text()
    assert mode_of(conf) == 0o600
    assert "country=DE\n" in text
    assert f"ssid={b'Kiosk Net'.hex()}\n" in text
    assert f"psk={wifi.wpa_key()}\n" in text
    assert PASSPHRASE.decode() not in text  # only the derived key is stored
    wants = root / "etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"
    assert os.readlink(wants) == "/lib/systemd/system/wpa_supplicant@.service"
    assert "Name=wl*" in (root / "etc/systemd/network/25-kiosk-wifi.network").read_text()
    assert (root / "etc/modprobe.d/kiosk-wifi-country.conf").read_text() == (
        "options cfg80211 ieee80211_regdom=DE\n"
    )


def test_wifi_with_networkmanager_when_the_image_has_it(root: Path) -> None:
    (root / "etc/NetworkManager/system-connections").mkdir(parents=True)
    wifi = Wifi(" Café", "FR", PASSPHRASE)

    SystemFiles(root).apply(Identity("vm-0042", wifi=wifi))

    keyfile = root / "etc/NetworkManager/system-connections/kiosk-wifi.nmconnection"
    text = keyfile.read_text()
    assert mode_of(keyfile) == 0o600
    assert "ssid=\\sCafé\n" in text  # a leading space kept, escaped as GLib key files do
    assert f"psk={wifi.wpa_key()}\n" in text and "key-mgmt=wpa-psk" in text
    assert not (root / "etc/wpa_supplicant").exists()


def test_an_image_without_any_wifi_stack_is_reported(tmp_path: Path) -> None:
    _, failed = SystemFiles(tmp_path).apply(Identity("vm", wifi=Wifi("Net", "DE", PASSPHRASE)))

    assert failed == [
        "Wi-Fi 'Net' not set: the image has neither NetworkManager nor wpa_supplicant"
    ]


def test_applying_twice_changes_nothing_the_second_time(root: Path) -> None:
    identity = Identity("vm-0042", "Europe/Berlin", Wifi("KioskNet", "DE", PASSPHRASE))
    SystemFiles(root).apply(identity)

    assert SystemFiles(root).apply(identity) == ([], [])


def test_provisioning_applies_the_device_section_and_wipes_the_passphrase(
    boot: Path, root: Path, tmp_path: Path
) -> None:
    (boot / "kiosk.toml").write_text(
        CONFIG + 'timezone = "Europe/Berlin"\nwifi_ssid = "KioskNet"\n'
        'wifi_psk_file = "wifi.psk"\nwifi_country = "DE"\n'
    )
    etc = tmp_path / "etc"

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None, system=SystemFiles(root))

    assert not (boot / "wifi.psk").exists()
    assert boot / "wifi.psk" in report.removed
    assert mode_of(etc / "keys/wifi.psk") == 0o600
    assert report.device == [
        "host name 'vm-0042'",
        "time zone 'Europe/Berlin'",
        "Wi-Fi 'KioskNet'",
    ]
    assert (root / "etc/hostname").read_text() == "vm-0042\n"
    wpa = (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    assert Wifi("KioskNet", "DE", PASSPHRASE).wpa_key() in wpa
    assert "set host name 'vm-0042' (from the next boot)" in str(report)
    # The installed config still checks, the passphrase file root-only included.
    assert check_config(etc / "kiosk.toml")[0] is not None
