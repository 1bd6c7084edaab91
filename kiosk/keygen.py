"""`kiosk keygen`: the merchant's RSA key pair, made on the kiosk itself, so the private key
never travels on a card or a laptop. The private key goes to /etc/kiosk/keys (owner-only, the
service user's); only the public key goes to the boot partition, with a note saying where to
upload it in Alipay's merchant portal. No key material is ever printed or logged.

Also run by `kiosk provision` when the technician drops `kiosk-keygen.txt` on the boot
partition (the kiosk has no keyboard): that never replaces a key the kiosk already has; it
writes that key's public half again instead.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import os
import pwd
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.signing import load_private_key
from kiosk.errors import KeyFileError, KioskError

PRIVATE_KEY = Path("/etc/kiosk/keys/merchant_private_key.pem")
PUBLIC_KEY = Path("/boot/firmware/merchant_public_key.pem")
REQUEST_FILE = "kiosk-keygen.txt"  # on the boot partition: "make the key pair at next boot"
BITS = (2048, 4096)


class KeygenError(KioskError, RuntimeError):
    """The key pair could not be made or written (exit 1)."""


class KeygenRefused(KeygenError):
    """A key is there already, or the size is not one the kiosk makes (exit 2)."""


@dataclass(frozen=True)
class KeygenReport:
    private_key: Path
    public_key: Path
    note: Path
    bits: int
    fingerprint: str
    new: bool  # False: the kiosk's existing key, its public half written again

    def __str__(self) -> str:
        made = (
            f"made a {self.bits}-bit RSA key pair"
            if self.new
            else f"kept the existing {self.bits}-bit key"
        )
        return "\n".join(
            [
                f"kiosk keygen: {made}",
                f"  private key (stays on this kiosk): {self.private_key}",
                f"  public key, to upload to Alipay:   {self.public_key}",
                f"  how to upload it:                  {self.note}",
                f"  fingerprint: {self.fingerprint}",
            ]
        )


def note_path(public_key: Path) -> Path:
    return public_key.with_name(public_key.stem + ".txt")


def generate(
    private_key: Path = PRIVATE_KEY,
    public_key: Path = PUBLIC_KEY,
    bits: int = 2048,
    *,
    owner: str | None = None,
    group: str | None = None,
    force: bool = False,
    keep_existing: bool = False,
) -> KeygenReport:
    """Make the pair (or, with `keep_existing`, reuse a private key already there) and write
    the public key and its upload note. `owner`/`group` get the private key (None: the current
    user). An existing private key is an error unless `force` (replace) or `keep_existing`."""
    from kiosk.bundle import write_new  # here: `kiosk run` reads this module's paths only

    if bits not in BITS:
        raise KeygenRefused(f"--bits must be 2048 or 4096, not {bits}")
    uid, gid = _ids(owner, group)
    key: rsa.RSAPrivateKey | None = None
    if private_key.exists() and not force:
        if not keep_existing:
            raise KeygenRefused(
                f"{private_key} exists; not replaced (the merchant portal holds its public key: "
                "a new pair needs a new upload). Give --force to replace it"
            )
        try:
            key = load_private_key(private_key.read_bytes(), str(private_key))
        except (OSError, KeyFileError) as exc:
            raise KeygenError(f"cannot reuse {private_key}: {exc}") from None
    new = key is None
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        keys_dir = private_key.parent
        if not keys_dir.is_dir():
            keys_dir.mkdir(parents=True, mode=0o750)
            if gid is not None:
                os.chown(keys_dir, -1, gid)
            os.chmod(keys_dir, 0o750)
        try:
            write_new(private_key, pem, 0o600, replace=force)
            if uid is not None or gid is not None:
                os.chown(private_key, -1 if uid is None else uid, -1 if gid is None else gid)
        except FileExistsError:
            raise KeygenRefused(f"{private_key} appeared meanwhile; not replaced") from None
        except OSError as exc:
            raise KeygenError(f"cannot write {private_key}: {exc.strerror}") from None
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    note = note_path(public_key)
    body = base64.b64encode(der).decode("ascii")
    try:
        # The boot partition is FAT: no modes to set; the public half is no secret anyway.
        write_new(public_key, public_pem, None, replace=True)
        with contextlib.suppress(OSError):  # FAT (the boot partition) takes no mode
            os.chmod(public_key, 0o644)
        text = _note(key.key_size, private_key, body, fingerprint)
        write_new(note, text.encode("utf-8"), None, replace=True)
    except OSError as exc:
        raise KeygenError(f"cannot write the public key: {exc.filename}: {exc.strerror}") from None
    return KeygenReport(private_key, public_key, note, key.key_size, fingerprint, new)


def bits_requested(request: Path) -> int:
    """The size asked for in kiosk-keygen.txt ("bits = 4096"); 2048 when it says none."""
    try:
        text = request.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 2048
    found = re.search(r"bits\s*=\s*(\d+)", text)
    return 4096 if found and found.group(1) == "4096" else 2048


def _note(bits: int, private_key: Path, body: str, fingerprint: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"This kiosk made its own {bits}-bit RSA key pair for Alipay ({when}, the kiosk's clock).",
        f"The private key never leaves the kiosk: {private_key}",
        "Alipay needs the PUBLIC key below; then the kiosk needs Alipay's public key.",
        "",
        "1. Log in to the Alipay Global merchant portal (Alipay Global Site) with the account",
        "   of your partner ID (2088...).",
        "2. Business Center > Online Payment / Instore Payment Product > My Order > See Key.",
        '3. Under "RSA2 Key Information" click "Edit my public key", paste the one line under',
        '   "Public key" below (no BEGIN/END lines, no spaces), and save.',
        '   (sign_type "RSA", with SHA-1: Alipay\'s technical support uploads the key for you;',
        "   send them that line with your partner ID. RSA2 is recommended.)",
        '4. On the same page, "See my public key" shows Alipay\'s public key once yours is',
        "   uploaded: save it on this card as alipay_public_key.pem.",
        "5. In kiosk.toml on this card, under [alipay]:",
        f'       private_key_file = "{private_key}"',
        '       alipay_public_key_file = "alipay_public_key.pem"',
        "   then put the card back in the kiosk and power it on.",
        "",
        "Portal menus change over time: if they are not where this says, look for the RSA2 key",
        "settings of your partner ID.",
        "",
        "Public key:",
        body,
        "",
        f"Fingerprint (SHA-256 of the public key): {fingerprint}",
        "",
    ]
    return "\r\n".join(lines)  # CRLF: it reads in any laptop's editor


def _ids(owner: str | None, group: str | None) -> tuple[int | None, int | None]:
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else None
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        raise KeygenError(
            f"the service user {owner!r} or group {group!r} does not exist "
            "(systemd-sysusers creates them from the image's sysusers.d/kiosk.conf)"
        ) from None
    return uid, gid


def run_keygen(
    private_key: Path, public_key: Path, bits: int, force: bool, owner: str | None = None
) -> int:
    """`kiosk keygen`: 0 done, 2 a key is there already (or bad --bits), 1 cannot write.
    The private key goes to `owner` (default: user and group kiosk as root, else the caller)."""
    who = owner or ("kiosk" if os.geteuid() == 0 else None)
    try:
        report = generate(private_key, public_key, bits, owner=who, group=who, force=force)
    except KeygenError as exc:
        print(f"kiosk keygen: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, KeygenRefused) else 1
    print(report)
    return 0
