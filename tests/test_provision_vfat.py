"""Secrets off a real FAT boot partition. A FAT image is made with mkfs.vfat and filled with
mtools, as a technician's laptop would fill the card; a real kernel's vfat driver mounts it
(loop) and `provision` runs against the mount; then the raw image is searched: no piece of the
private key or the Wi-Fi passphrase may be left anywhere in it, for a good config and a bad
one (whose secrets wait in the quarantine for the fixed config).

The build machines' kernel has no vfat: `test_vfat_tests_pass_in_a_real_kernel` runs this file
inside Debian's kernel under qemu (tests/qemu/run-in-kernel.sh); the `vfat` tests skip on a
host that cannot mount the image themselves.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.device import SystemFiles
from kiosk.provision import ERROR_FILE, ProvisionFailed, provision

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "qemu" / "run-in-kernel.sh"
CANNOT_RUN = 77
MOUNT_OPTIONS = "loop,rw,noatime,umask=0077,nodev,nosuid,noexec"  # as the image's fstab
PSK = b"correct horse battery staple 42"
WINDOW = 32

CONFIG = """\
[kiosk]
terminal_id = "VM-0042"

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
wifi_ssid = "KioskNet"
wifi_psk_file = "wifi.psk"
wifi_country = "DE"
"""


def _tools_missing() -> str | None:
    for tool in ("mkfs.vfat", "mcopy", "mdir", "mtype", "mdel", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} missing (tools/host-packages.sh install tests)"
    return None


@functools.cache
def _cannot_mount() -> str | None:
    """Why this machine cannot loop-mount a FAT image, or None."""
    missing = _tools_missing()
    if missing:
        return missing
    if os.geteuid() != 0:
        return "mounting needs root"
    probe = Path(f"/tmp/kiosk-vfat-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    image = probe / "probe.img"
    try:
        subprocess.run(["mkfs.vfat", "-C", str(image), "1024"], check=True, capture_output=True)
        done = subprocess.run(
            ["mount", "-o", MOUNT_OPTIONS, str(image), str(probe)], capture_output=True, text=True
        )
        if done.returncode != 0:
            return f"this kernel cannot mount FAT: {done.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        image.unlink(missing_ok=True)
        shutil.rmtree(probe, ignore_errors=True)


def vfat(test: Any) -> Any:
    """A test that mounts a FAT image: marked `vfat`, skipped where that cannot be done."""
    skip = pytest.mark.skipif("_cannot_mount() is not None", reason="cannot mount FAT here")
    return pytest.mark.vfat(skip(test))


@pytest.fixture(scope="module")
def merchant_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def alipay_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Card:
    """A FAT boot partition in a file: written with mtools, mounted by the kernel."""

    def __init__(self, folder: Path, fat: int, sectors_per_cluster: int, size_kib: int) -> None:
        self.image = folder / "card.img"
        self.mountpoint = folder / "boot"
        self.mountpoint.mkdir()
        self.cluster = 512 * sectors_per_cluster
        subprocess.run(
            ["mkfs.vfat", "-F", str(fat), "-s", str(sectors_per_cluster), "-n", "RASPIFIRM",
             "-C", str(self.image), str(size_kib)],
            check=True, capture_output=True,
        )  # fmt: skip

    def put(self, name: str, data: bytes) -> None:
        local = self.image.parent / f"put-{name}"
        local.write_bytes(data)
        subprocess.run(["mcopy", "-o", "-i", str(self.image), str(local), f"::/{name}"],
                       check=True)  # fmt: skip
        local.unlink()

    def names(self) -> set[str]:
        done = subprocess.run(
            ["mdir", "-b", "-i", str(self.image), "::/"], capture_output=True, text=True
        )
        return {line.removeprefix("::/").strip() for line in done.stdout.splitlines()}

    def read(self, name: str) -> bytes:
        return subprocess.run(
            ["mtype", "-i", str(self.image), f"::/{name}"], check=True, capture_output=True
        ).stdout

    def raw(self) -> bytes:
        return self.image.read_bytes()

    def mount(self) -> None:
        subprocess.run(
            ["mount", "-o", MOUNT_OPTIONS, str(self.image), str(self.mountpoint)], check=True
        )

    def umount(self) -> None:
        subprocess.run(["umount", str(self.mountpoint)], check=True)


def pieces_of(secret: bytes) -> set[bytes]:
    """Every 16-byte piece of the secret. A 32-byte window of it anywhere in an image always
    covers one 16-byte-aligned block of the image, so looking up the image's aligned blocks
    in this set finds any window (and any 16-byte piece on an aligned offset)."""
    return {secret[i : i + 16] for i in range(len(secret) - 15)}


ZEROS = bytes(4096)


def leaks(image: bytes, secret: bytes) -> list[int]:
    """Offsets in `image` where a piece of `secret` lies (see pieces_of)."""
    pieces = pieces_of(secret)
    found = []
    for big in range(0, len(image), 1 << 16):
        if image.count(0, big, big + (1 << 16)) == min(1 << 16, len(image) - big):
            continue  # zeros: nothing to look at (most of an empty FAT image)
        for page in range(big, min(big + (1 << 16), len(image)), 4096):
            if image[page : page + 4096] == ZEROS:
                continue
            for offset in range(page, min(page + 4096, len(image)), 16):
                if image[offset : offset + 16] in pieces:
                    found.append(offset)
    return found


def assert_no_piece_of(secret: bytes, card: Card) -> None:
    raw = card.raw()
    found = leaks(raw, secret)
    assert not found, f"{len(found)} pieces of the key left, at {found[:4]}..."
    assert all(line not in raw for line in secret.splitlines())


def body_of(pem: bytes) -> bytes:
    """The key material of a PEM: its base64 lines, as the file holds them."""
    return b"\n".join(line for line in pem.splitlines() if not line.startswith(b"-----"))


def copy_twice(card: Card, name: str, data: bytes) -> None:
    """Copy `data` the way a laptop's editor may save it: over an earlier version that filled
    its last cluster (its end: a copy of the key's tail after some padding)."""
    slack = -len(data) % card.cluster
    card.put(name, b"#" * slack + data)  # the earlier version
    card.put(name, data)  # mtools frees its clusters, then allocates again


def provision_on(card: Card, etc: Path, root: Path, scrub: bool = False) -> None:
    card.mount()
    try:
        provision(card.mountpoint / "kiosk.toml", etc, owner=None, group=None,
                  system=SystemFiles(root), scrub=scrub)  # fmt: skip
    finally:
        card.umount()


def fill(card: Card, merchant_pem: bytes, alipay_pem: bytes, config: str = CONFIG) -> None:
    card.put("kiosk.toml", config.encode())
    card.put("alipay_public_key.pem", alipay_pem)
    card.put("merchant_private_key.pem", merchant_pem)
    card.put("wifi.psk", PSK + b"\n")
    assert len(leaks(card.raw(), body_of(merchant_pem))) >= len(merchant_pem) // 16 - 4


# A Pi's boot partition is FAT32; 512-byte clusters keep the image small (FAT32 needs 65525).
FAT32 = (32, 1, 40 * 1024)


@pytest.fixture
def system_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/wpa_supplicant@.service").write_text("[Service]\n")
    return root


@vfat
def test_a_good_config_leaves_no_byte_of_the_key_on_the_card(
    tmp_path: Path, system_root: Path, merchant_pem: bytes, alipay_pem: bytes
) -> None:
    card = Card(tmp_path, *FAT32)
    fill(card, merchant_pem, alipay_pem)
    etc = tmp_path / "etc"

    provision_on(card, etc, system_root)

    assert_no_piece_of(body_of(merchant_pem), card)
    assert PSK not in card.raw()
    assert card.names() >= {"kiosk.toml.provisioned", "alipay_public_key.pem"}
    assert not card.names() & {"merchant_private_key.pem", "wifi.psk", "kiosk.toml"}
    assert card.read("alipay_public_key.pem") == alipay_pem
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == merchant_pem
    assert list((etc / "quarantine").iterdir()) == []


@vfat
def test_a_bad_config_still_takes_its_secrets_off_the_card_and_the_fix_uses_them(
    tmp_path: Path, system_root: Path, merchant_pem: bytes, alipay_pem: bytes
) -> None:
    card = Card(tmp_path, *FAT32)
    fill(card, merchant_pem, alipay_pem, CONFIG.replace("2088101122334455", "123"))
    etc = tmp_path / "etc"

    with pytest.raises(ProvisionFailed):
        provision_on(card, etc, system_root)

    assert_no_piece_of(body_of(merchant_pem), card)
    assert PSK not in card.raw()
    assert "alipay.partner '123'" in card.read(ERROR_FILE).decode()
    assert "kiosk.toml" in card.names()
    quarantine = etc / "quarantine"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700
    assert (quarantine / "merchant_private_key.pem").read_bytes() == merchant_pem
    assert stat.S_IMODE((quarantine / "merchant_private_key.pem").stat().st_mode) == 0o600
    assert not (etc / "kiosk.toml").exists()

    # The technician fixes kiosk.toml only; the key waits on the kiosk.
    card.put("kiosk.toml", CONFIG.encode())
    provision_on(card, etc, system_root)

    assert (etc / "keys/merchant_private_key.pem").read_bytes() == merchant_pem
    assert list(quarantine.iterdir()) == []
    assert ERROR_FILE not in card.names()
    assert_no_piece_of(body_of(merchant_pem), card)


@vfat
def test_the_slack_after_a_key_saved_twice_is_wiped_too(
    tmp_path: Path, system_root: Path, merchant_pem: bytes, alipay_pem: bytes
) -> None:
    card = Card(tmp_path, 16, 16, 32 * 1024)  # FAT16, 8 KiB clusters: much slack after a key
    fill(card, merchant_pem, alipay_pem)
    copy_twice(card, "merchant_private_key.pem", merchant_pem)
    near_the_end = body_of(merchant_pem).splitlines()[-2]
    raw = card.raw()
    first = raw.find(near_the_end)
    second = raw.find(near_the_end, first + 1)
    assert 0 < second - first < card.cluster  # the earlier copy's end: in the file's cluster

    provision_on(card, tmp_path / "etc", system_root)

    assert_no_piece_of(body_of(merchant_pem), card)


@vfat
def test_scrubbing_the_free_space_wipes_an_earlier_save_of_the_key(
    tmp_path: Path, system_root: Path, merchant_pem: bytes, alipay_pem: bytes
) -> None:
    card = Card(tmp_path, *FAT32)
    fill(card, merchant_pem, alipay_pem)
    copy_twice(card, "merchant_private_key.pem", merchant_pem)  # FAT32: the earlier in free space

    provision_on(card, tmp_path / "etc", system_root, scrub=True)

    assert_no_piece_of(body_of(merchant_pem), card)
    assert card.names() >= {"kiosk.toml.provisioned", "alipay_public_key.pem"}


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_a_plain_delete_leaves_the_key_on_the_card(tmp_path: Path, merchant_pem: bytes) -> None:
    """The search finds what a FAT delete leaves (mdel, like rm on a mount), so its silence
    above means something. Needs no mount: it runs on the host."""
    card = Card(tmp_path, *FAT32)
    card.put("merchant_private_key.pem", merchant_pem)

    subprocess.run(["mdel", "-i", str(card.image), "::/merchant_private_key.pem"], check=True)

    assert "merchant_private_key.pem" not in card.names()
    assert len(leaks(card.raw(), body_of(merchant_pem))) >= len(body_of(merchant_pem)) // 16 - 2


def _qemu_missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    if shutil.which("busybox") is None:
        return "busybox missing (apt-get install busybox-static)"
    return _tools_missing()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(_qemu_missing() is not None, reason=str(_qemu_missing()))
def test_vfat_tests_pass_in_a_real_kernel() -> None:
    if _cannot_mount() is None:
        pytest.skip("this kernel mounts FAT itself: the vfat tests ran here")
    python = Path(sys.executable)
    if not python.is_relative_to(REPO):
        pytest.skip(f"the guest runs the host's python through 9p; {python} is outside {REPO}")
    command = [
        str(SCRIPT), str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        "-p", "no:hypothesispytest", "tests/test_provision_vfat.py", "-m", "vfat",
    ]  # fmt: skip
    # Python under emulation: about 30 s a test on a busy 2-core machine.
    env = {**os.environ, "KIOSK_QEMU_TIMEOUT": os.environ.get("KIOSK_QEMU_TIMEOUT", "600")}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode == CANNOT_RUN:
        pytest.skip("qemu run impossible here: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, output[-4000:]
    assert "4 passed" in output, output[-4000:]
    assert "skipped" not in output, output[-4000:]  # the guest must really mount FAT
