"""`kiosk provision`: first boot. Install the config and keys a technician dropped on the FAT
boot partition into /etc/kiosk with safe modes, and take every secret off the boot partition.

Secrets leave the card whatever happens, before anything is checked: each secret file (every
key file the config declares secret, any file holding a PEM private key, the signature file)
is copied into a root-only quarantine, then overwritten in place with zeros up to the end of
its last cluster, flushed, and only then deleted. A bad config leaves its error file on the
card and its secrets in the quarantine, where the next good provisioning finds them (when the
fixed config names the same files) and afterwards wipes them.

Who may provision: with an operator key (`/etc/kiosk/operator.pub`, Ed25519, put there by the
image build) only a bundle signed by it is installed, never older than the one installed
(kiosk/bundle.py). Without one, the first drop is trusted; after that a drop must bring the
very same kiosk.toml and the same public files, and may only replace the secret files (a key
rotation). Any other change needs a signed bundle, or `--replace-config` from a root shell.

Who owns what after install (the service runs as user `kiosk`; `read_secret_file` refuses any
group or other bits on a secret, so group-readable 0640 is not an option):

    /etc/kiosk/                      root:root    0755  (created if missing)
    /etc/kiosk/kiosk.toml            root:kiosk   0640  no secrets; key paths point below
    /etc/kiosk/keys/                 root:kiosk   0750  only the service user may enter
    /etc/kiosk/keys/merchant_private_key.pem, md5.key, (other secrets the service reads)
                                     kiosk:kiosk  0600  the service user reads, nobody else
    /etc/kiosk/keys/wifi.psk         root:kiosk   0600  root only (`root_only` secrets)
    /etc/kiosk/keys/alipay_public_key.pem, ca_bundle.pem
                                     root:kiosk   0640
    /etc/kiosk/quarantine/           root:root    0700  secrets of a drop not installed yet
    /etc/kiosk/provisioned.json      root:root    0644  what was done; no key material

The `[device]` section (host name, time zone, Wi-Fi) is written through kiosk/device.py.
Out of scope: it does not start or reload the daemon (systemd orders this before kiosk.service)
and does not touch the journal.
"""

from __future__ import annotations

import errno
import getpass
import grp
import json
import os
import pwd
import re
import stat
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiosk import bundle, keygen
from kiosk.config import ConfigProblem, LineIndex, check_config
from kiosk.config_keys import ROWS, Row, installed_name, key_file_rows
from kiosk.device import Identity, SystemFiles
from kiosk.errors import ConfigError, KioskError

ERROR_FILE = "kiosk-config-error.txt"
RECORD_FILE = "provisioned.json"
DONE_SUFFIX = ".provisioned"
QUARANTINE = "quarantine"
OPERATOR_KEY = "operator.pub"
SNIFF_LIMIT = 64 * 1024  # a key file is a few KiB; firmware blobs are not read
PRIVATE_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


class ProvisionError(KioskError, RuntimeError):
    """Provisioning could not run (no such user, a write failed): exit 1."""


class ProvisionFailed(ConfigError):
    """The dropped config is bad or not trusted; nothing was installed (exit 2)."""

    def __init__(
        self,
        problems: list[ConfigProblem],
        error_file: Path | None,
        moved: list[str] | None = None,
    ) -> None:
        self.problems = list(problems)
        self.error_file = error_file
        self.moved = list(moved or [])
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class InstalledFile:
    key: str  # the config key it came from ("section.key"; alipay's keys by name), or "config"
    path: Path
    mode: int


@dataclass
class ProvisionReport:
    """What `provision` did. `status`: installed | already_installed | nothing_to_do."""

    status: str
    source: Path
    config_path: Path | None = None
    installed: list[InstalledFile] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # secrets wiped off the boot partition
    left_in_place: list[Path] = field(default_factory=list)  # secrets outside the boot folder
    warnings: list[ConfigProblem] = field(default_factory=list)
    record: Path | None = None
    signed_by: str | None = None
    device: list[str] = field(default_factory=list)  # settings changed (host name, ...)
    device_failed: list[str] = field(default_factory=list)
    keygen: keygen.KeygenReport | None = None
    bundle_created: str | None = None  # when the installed bundle was signed

    def __str__(self) -> str:
        lines = [str(self.keygen)] if self.keygen else []
        if self.status == "nothing_to_do" and self.record is None:
            lines.append(f"kiosk provision: no {self.source} to install")
        elif self.status == "nothing_to_do":
            lines.append(f"kiosk provision: nothing to do: {self.source} was already provisioned")
        elif self.status == "already_installed":
            lines.append(
                f"kiosk provision: {self.source} is already installed as {self.config_path}"
            )
        else:
            lines.append(f"kiosk provision: installed {self.source} as {self.config_path}")
            lines += [f"  {f.path} (mode {f.mode:04o})" for f in self.installed]
        if self.signed_by:
            lines.append(f"  signed by the operator key {self.signed_by}")
        lines += [f"  removed from the boot partition: {path}" for path in self.removed]
        lines += [
            f"  left in place (not in the boot folder; delete it yourself): {path}"
            for path in self.left_in_place
        ]
        lines += [f"  set {what} (from the next boot)" for what in self.device]
        lines += [f"  NOT set: {what}" for what in self.device_failed]
        lines += [f"  {problem}" for problem in self.warnings]
        if self.record:
            lines.append(f"  record: {self.record}")
        return "\n".join(lines)


@dataclass(frozen=True)
class NamedFile:
    """A file the config names under one of the key-file keys."""

    row: Row
    path: Path  # resolved against the config's folder
    rel: str | None  # its path inside the boot folder, or None when it lies elsewhere

    @property
    def label(self) -> str:
        return self.row.name if self.row.section == "alipay" else self.row.dotted

    @property
    def secret(self) -> bool:
        return self.row.key.secret


def provision(
    source: Path,
    etc_dir: Path = Path("/etc/kiosk"),
    owner: str | None = "kiosk",
    group: str | None = "kiosk",
    *,
    operator_key: Path | None = None,
    system: SystemFiles | None = None,
    replace_config: bool = False,
    scrub: bool = False,
) -> ProvisionReport:
    """Take the secrets off the boot folder, check trust and config, install under `etc_dir`.

    `owner`/`group` name the service user and group; `None` keeps the current user (tests run
    unprivileged). `operator_key`: the operator's Ed25519 public key; when given, only a bundle
    it signed is installed (a missing or broken key file fails, never falls back to unsigned).
    `system`: where `[device]` is applied (None: not applied). `scrub`: when secrets were
    taken off, also overwrite the boot partition's free space (see scrub_free_space). Safe to
    run again: with no
    source, or with the config already installed, it only finishes the cleanup and says so.
    """
    source = source.absolute()
    boot = source.parent
    quarantine = etc_dir / QUARANTINE
    record_path = etc_dir / RECORD_FILE
    installed_config = etc_dir / "kiosk.toml"
    report = ProvisionReport("installed", source, installed_config)
    report.keygen = _keygen_request(boot, etc_dir, owner, group)

    if not source.exists():
        _evacuate(boot, [], quarantine, report)  # a key dropped without its config
        done = source.with_name(source.name + DONE_SUFFIX)
        if done.exists() or record_path.exists() or report.keygen:
            report.status = "nothing_to_do"
            report.record = record_path if record_path.exists() else None
            return report
        problem = ConfigProblem(
            str(source), 1, "no config file to provision", "copy kiosk.toml onto the boot partition"
        )
        raise ProvisionFailed([problem], None)

    source_bytes = source.read_bytes()
    text = source_bytes.decode("utf-8", errors="replace")
    named = named_files(source, text)
    moved = _evacuate(boot, named, quarantine, report)
    if moved and scrub:
        scrub_free_space(boot)
    previous = _read_record(record_path)
    same_source = previous.get("source_sha256") == bundle.sha256(source_bytes)

    def fail(problems: list[ConfigProblem]) -> ProvisionFailed:
        return ProvisionFailed(problems, _write_error_file(source, problems, moved), moved)

    if source.name in moved:  # the config itself held a private key
        message = "the config holds a private key; it was taken off the card"
        raise fail([_problem(source, message, "keys go in files of their own")])
    contents = _gather(named, boot, quarantine, etc_dir, same_source and not replace_config)
    uid, gid = _lookup(owner, group)

    problems, manifest, signer = _trust(
        source, source_bytes, named, contents, etc_dir, previous, operator_key, replace_config
    )
    if problems:
        raise fail(problems)
    if manifest is not None:
        report.signed_by, report.bundle_created = signer, manifest.created
    config, problems = _check_in_place(source, text, named, contents, boot, quarantine, etc_dir)
    if config is None:
        raise fail(problems)
    report.warnings = [p for p in problems if p.warning]

    # Install.
    keys_dir = etc_dir / "keys"
    _make_etc(etc_dir)
    keys_dir.mkdir(mode=0o750, exist_ok=True)
    _secure(keys_dir, 0o750, None, gid)
    changed = not same_source or not installed_config.exists()
    new_paths: dict[tuple[str, str], Path] = {}
    for item in named:
        where = contents.get(item.row.dotted)
        if where is None:
            continue  # a key for another sign type naming a file that is not there
        dest = keys_dir / installed_name(item.row)
        mode = 0o600 if item.secret else 0o640
        file_uid = None if item.row.key.root_only or not item.secret else uid
        if not (dest.exists() and os.path.samefile(where, dest)):
            data = where.read_bytes()
            if not (dest.is_file() and dest.read_bytes() == data):
                changed = True
                _write_atomic(dest, data, mode, file_uid, gid)
        _secure(dest, mode, file_uid, gid)
        new_paths[(item.row.section, item.row.name)] = dest
        report.installed.append(InstalledFile(item.label, dest, mode))
        if item.secret and item.rel is None and not _inside(item.path, etc_dir):
            report.left_in_place.append(item.path)

    try:
        installed_text = _rewrite_paths(source_bytes.decode("utf-8"), new_paths)
    except ProvisionFailed as exc:
        raise fail(exc.problems) from None
    staged = etc_dir / "kiosk.toml.new"
    _write_atomic(staged, installed_text.encode("utf-8"), 0o640, None, gid)
    verified, verify_problems = check_config(staged)
    if verified is None:
        staged.unlink(missing_ok=True)
        raise fail(verify_problems)
    os.replace(staged, installed_config)
    _fsync_dir(etc_dir)
    report.installed.insert(0, InstalledFile("config", installed_config, 0o640))
    report.status = "installed" if changed else "already_installed"

    if system is not None:
        psk_path = new_paths.get(("device", "wifi_psk_file"))
        psk = psk_path.read_bytes() if psk_path is not None else None
        identity = Identity.from_config(verified.device, verified.kiosk.terminal_id, psk)
        report.device, report.device_failed = system.apply(identity)

    # The record goes down before the cleanup, so a power cut in between is recognised on the
    # next boot as "already installed" rather than a config whose keys went missing.
    record = {
        "provisioned_at": _now(),
        "source": str(source),
        "source_sha256": bundle.sha256(source_bytes),
        "config": str(installed_config),
        "config_sha256": bundle.sha256(installed_text.encode("utf-8")),
        "files": [
            {"key": f.key, "path": str(f.path), "mode": f"{f.mode:04o}"} for f in report.installed
        ],
        "secrets_removed_from_boot": sorted(moved),
        "bundle": (
            {"signed_by": report.signed_by, "created": report.bundle_created}
            if report.signed_by
            else previous.get("bundle")
        ),
    }
    _write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode(), 0o644, None, None)
    report.record = record_path
    _wipe_tree(quarantine)
    (boot / ERROR_FILE).unlink(missing_ok=True)
    os.replace(source, source.with_name(source.name + DONE_SUFFIX))
    _fsync_dir(boot)
    return report


# --- what the config names --------------------------------------------------------------------


_SECTION = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_VALUE = re.compile(r"""\s*["']?([A-Za-z0-9_-]+)["']?\s*=\s*("(?:[^"\\]|\\.)*"|'[^']*')""")


def named_files(source: Path, text: str) -> list[NamedFile]:
    """The files the config names under its key-file keys, resolved against its folder. Read
    from the TOML when it parses, else line by line: a broken config must still give up its
    secrets."""
    values: dict[tuple[str, str], str] = {}
    rows = {(row.section, row.name): row for row in key_file_rows()}
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        section = ""
        for line in text.splitlines():
            header = _SECTION.match(line)
            if header:
                section = header.group(1)
                continue
            found = _VALUE.match(line)
            if found and (section, found.group(1)) in rows:
                try:
                    value = tomllib.loads(f"v = {found.group(2)}")["v"]
                except tomllib.TOMLDecodeError:
                    continue
                values.setdefault((section, found.group(1)), value)
    else:
        for section, name in rows:
            table = data.get(section)
            value = table.get(name) if isinstance(table, dict) else None
            if isinstance(value, str):
                values[(section, name)] = value
    boot = source.parent.resolve()
    found_files = []
    for (section, name), value in values.items():
        if not value or "\0" in value:
            continue
        try:
            path = source.parent / Path(value).expanduser()
        except RuntimeError:
            continue
        resolved = path.resolve()
        rel = resolved.relative_to(boot).as_posix() if resolved.is_relative_to(boot) else None
        found_files.append(NamedFile(rows[(section, name)], path, rel))
    return found_files


# --- secrets off the card ---------------------------------------------------------------------


def _evacuate(
    boot: Path, named: list[NamedFile], quarantine: Path, report: ProvisionReport
) -> list[str]:
    """Copy every secret in the boot folder into the quarantine, then wipe it there. Returns
    the names moved (relative to the boot folder)."""
    candidates: dict[str, Path] = {
        item.rel: boot / item.rel for item in named if item.secret and item.rel
    }
    candidates[bundle.SIGNATURE_FILE] = boot / bundle.SIGNATURE_FILE  # hashes of the secrets
    try:
        entries = list(boot.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if entry.name in candidates or not _small_file(entry):
            continue
        try:
            with entry.open("rb") as file:
                head = file.read(SNIFF_LIMIT)
        except OSError:
            continue
        if PRIVATE_PEM.search(head):
            candidates[entry.name] = entry
    moved = []
    for rel, path in sorted(candidates.items()):
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            path.unlink()  # FAT has none; elsewhere the link's target is not ours to wipe
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        data = path.read_bytes()
        kept = quarantine / rel
        _make_quarantine(quarantine, kept.parent)
        _write_atomic(kept, data, 0o600, None, None)
        wipe_file(path)
        moved.append(rel)
        report.removed.append(path)
    return moved


def _small_file(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= SNIFF_LIMIT


def wipe_file(path: Path) -> None:
    """Overwrite the file's bytes where they lie, flush them to the medium, then unlink it.

    Opened without O_TRUNC and written from offset 0 over its whole size, rounded up to the
    filesystem's block (on FAT, statvfs's block is the cluster): the FAT driver writes into
    the clusters the file already owns, the slack after its end included, and allocates none;
    a truncate would have freed them with the key still in them. This defeats anyone reading
    the card's sectors; not a chip-off reading of flash the card's controller remapped.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        path.unlink()
        _fsync_dir(path.parent)
        return
    try:
        size = os.fstat(fd).st_size
        block = max(512, os.fstatvfs(fd).f_bsize or 4096)
        length = -(-size // block) * block
        zeros = bytes(min(length, 1 << 20))
        offset = 0
        while offset < length:
            offset += os.pwrite(fd, zeros[: min(len(zeros), length - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    _fsync_dir(path.parent)


def scrub_free_space(folder: Path) -> int:
    """Fill the free space of `folder`'s filesystem with zeros, flush, delete; return the
    bytes written. On FAT this overwrites what earlier saves left in free clusters (an editor
    that wrote a new key file and deleted the old one): every free cluster goes to the fill.
    Costs one write of the partition's free space (a few hundred MB on a Pi's boot partition)."""
    chunk = bytes(1 << 20)
    written = 0
    paths: list[Path] = []
    try:
        full = False
        while not full:  # FAT caps a file at 4 GiB: one more file when one is full
            path = folder / f".kiosk-scrub-{len(paths)}"
            paths.append(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                while True:
                    try:
                        count = os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno == errno.EFBIG:
                            break
                        if exc.errno != errno.ENOSPC:
                            raise
                        full = True
                        break
                    if count == 0:
                        full = True
                        break
                    written += count
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        _fsync_dir(folder)
    return written


def _wipe_tree(folder: Path) -> None:
    """Wipe every file under `folder` (the quarantine), keeping the folder itself."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            wipe_file(path)
    _fsync_dir(folder)


def _make_quarantine(quarantine: Path, folder: Path) -> None:
    if not quarantine.parent.is_dir():
        _make_etc(quarantine.parent)
    quarantine.mkdir(mode=0o700, exist_ok=True)
    os.chmod(quarantine, 0o700)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def _make_etc(etc_dir: Path) -> None:
    if not etc_dir.is_dir():
        etc_dir.mkdir(parents=True)
        os.chmod(etc_dir, 0o755)  # explicitly: the unit's UMask=0077 would lock the service out


# --- where each named file's bytes are now ---------------------------------------------------


def _gather(
    named: list[NamedFile], boot: Path, quarantine: Path, etc_dir: Path, reuse_installed: bool
) -> dict[str, Path]:
    """For each named file, where its bytes are: on the boot partition, in the quarantine (a
    secret), installed already (the same config dropped again without it), or elsewhere."""
    found: dict[str, Path] = {}
    for item in named:
        candidates = [item.path] if item.rel is None else [boot / item.rel, quarantine / item.rel]
        if reuse_installed:
            candidates.append(etc_dir / "keys" / installed_name(item.row))
        for path in candidates:
            if path.is_file():
                found[item.row.dotted] = path
                break
    return found


def _check_in_place(
    source: Path,
    text: str,
    named: list[NamedFile],
    contents: dict[str, Path],
    boot: Path,
    quarantine: Path,
    etc_dir: Path,
) -> tuple[Any, list[ConfigProblem]]:
    """Check the config with each key file where it is now (the secrets in the quarantine);
    the problems name the files as the technician wrote them."""
    try:
        where_now = {
            (i.row.section, i.row.name): contents[i.row.dotted]
            for i in named
            if i.row.dotted in contents
        }
        text = _rewrite_paths(text, where_now)
    except ProvisionFailed:
        return check_config(source, check_key_modes=False)  # it says what is wrong with it
    _make_etc(etc_dir)
    fd, temp = tempfile.mkstemp(dir=etc_dir, prefix=".kiosk.toml.check.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        config, problems = check_config(Path(temp), check_key_modes=False)
    finally:
        os.unlink(temp)
    for prefix in (f"{quarantine}/", f"{boot}/"):
        problems = [replace(p, message=p.message.replace(prefix, "")) for p in problems]
    return config, [replace(p, file=str(source)) for p in problems]


# --- who may provision ------------------------------------------------------------------------


def _trust(
    source: Path,
    source_bytes: bytes,
    named: list[NamedFile],
    contents: dict[str, Path],
    etc_dir: Path,
    previous: dict[str, Any],
    operator_key: Path | None,
    replace_config: bool,
) -> tuple[list[ConfigProblem], bundle.Manifest | None, str | None]:
    """Why this drop must not be installed (or nothing), and the signed manifest with the
    operator key's fingerprint in signed mode."""
    if operator_key is not None:
        return _signed(source, source_bytes, named, contents, etc_dir, previous, operator_key)
    if not previous or replace_config:
        return [], None, None  # the first drop is trusted (unsigned mode)
    when = previous.get("provisioned_at", "before")
    rule = (
        "without an operator key a provisioned kiosk takes only the same kiosk.toml again, "
        "with new secret files (a key rotation)"
    )
    if previous.get("source_sha256") != bundle.sha256(source_bytes):
        problem = _problem(
            source,
            f"this kiosk was provisioned on {when}; this kiosk.toml differs from that one: {rule}",
            "to change the config, provision a bundle signed with the operator key, or run "
            "kiosk provision --replace-config as root on the kiosk",
        )
        return [problem], None, None
    problems = []
    for item in named:
        where = contents.get(item.row.dotted)
        installed = etc_dir / "keys" / installed_name(item.row)
        if item.secret or where is None or not installed.is_file():
            continue
        if where.read_bytes() != installed.read_bytes():
            problems.append(
                _problem(
                    source,
                    f"{item.label} {item.rel or item.path} differs from the installed "
                    f"{installed.name}: {rule}",
                    "drop the same file as before, or a bundle signed with the operator key",
                )
            )
    return problems, None, None


def _signed(
    source: Path,
    source_bytes: bytes,
    named: list[NamedFile],
    contents: dict[str, Path],
    etc_dir: Path,
    previous: dict[str, Any],
    operator_key: Path,
) -> tuple[list[ConfigProblem], bundle.Manifest | None, str | None]:
    key = bundle.load_public_key(operator_key)  # a BundleError: exit 1, nothing installed
    hint = "sign the folder on the operator's laptop: kiosk provision sign --key operator.key DIR"
    signature = next(
        (
            path
            for path in (
                source.parent / bundle.SIGNATURE_FILE,
                etc_dir / QUARANTINE / bundle.SIGNATURE_FILE,
            )
            if path.is_file()
        ),
        None,
    )
    if signature is None:
        missing = f"this kiosk takes only signed bundles, and {bundle.SIGNATURE_FILE} is missing"
        return [_problem(source, missing, hint)], None, None
    try:
        manifest = bundle.verify(signature.read_bytes(), key)
    except bundle.BundleError as exc:
        return [_problem(source, str(exc), hint)], None, None
    problems = []
    if manifest.files.get(source.name) != bundle.sha256(source_bytes):
        problems.append(
            _problem(source, f"{source.name} is not the one {bundle.SIGNATURE_FILE} signed", hint)
        )
    for item in named:
        if item.rel is None:
            continue  # a file on the kiosk itself, named by the signed config
        where = contents.get(item.row.dotted)
        listed = manifest.files.get(item.rel)
        if listed is None:
            unlisted = f"{item.rel} ({item.label}) is not in {bundle.SIGNATURE_FILE}"
            problems.append(_problem(source, unlisted, hint))
        elif where is not None and bundle.sha256(where.read_bytes()) != listed:
            changed = f"{item.rel} ({item.label}) is not the file that was signed"
            problems.append(_problem(source, changed, hint))
    installed = previous.get("bundle") or {}
    if installed.get("created") and manifest.created < installed["created"]:
        problems.append(
            _problem(
                source,
                f"this bundle was signed {manifest.created}, before the one installed "
                f"({installed['created']}): an older config is never put back",
                "sign the folder again",
            )
        )
    return problems, manifest, bundle.fingerprint(key)


def _problem(source: Path, message: str, hint: str) -> ConfigProblem:
    return ConfigProblem(str(source), 1, message, hint)


# --- kiosk-keygen.txt -------------------------------------------------------------------------


def _keygen_request(
    boot: Path, etc_dir: Path, owner: str | None, group: str | None
) -> keygen.KeygenReport | None:
    """The technician asked for a key pair (kiosk-keygen.txt): make it, or write the public half
    of the key the kiosk already has. Never replaces a key."""
    request = boot / keygen.REQUEST_FILE
    if not request.is_file():
        return None
    try:
        made = keygen.generate(
            etc_dir / "keys" / installed_name(ROWS["alipay"]["private_key_file"]),
            boot / keygen.PUBLIC_KEY.name,
            keygen.bits_requested(request),
            owner=owner,
            group=group,
            keep_existing=True,
        )
    except keygen.KeygenError as exc:
        raise ProvisionError(f"{keygen.REQUEST_FILE}: {exc}") from None
    os.replace(request, request.with_name(request.name + ".done"))
    _fsync_dir(boot)
    return made


# --- the command ------------------------------------------------------------------------------


def run_provision(
    source: Path,
    etc_dir: Path = Path("/etc/kiosk"),
    *,
    operator_key: Path | None = None,
    system_root: Path | None = None,
    replace_config: bool = False,
    scrub: bool = False,
) -> int:
    """`kiosk provision --from SOURCE`: 0 done (or nothing to do), 2 bad or untrusted config,
    1 failure. As root the installed secrets go to user `kiosk`; otherwise the current user
    keeps them. `operator_key` None: `etc_dir/operator.pub` when it exists (signed mode)."""
    who = "kiosk" if os.geteuid() == 0 else None
    if operator_key is None and (etc_dir / OPERATOR_KEY).exists():
        operator_key = etc_dir / OPERATOR_KEY
    system = SystemFiles(system_root) if system_root is not None else None
    try:
        report = provision(
            source,
            etc_dir,
            owner=who,
            group=who,
            operator_key=operator_key,
            system=system,
            replace_config=replace_config,
            scrub=scrub,
        )
    except ProvisionFailed as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        for name in exc.moved:
            print(f"kiosk provision: taken off the boot partition: {name}", file=sys.stderr)
        if exc.error_file:
            print(f"kiosk provision: nothing installed; see {exc.error_file}", file=sys.stderr)
        return 2
    except (ProvisionError, bundle.BundleError, OSError, UnicodeDecodeError) as exc:
        print(f"kiosk provision: {exc}", file=sys.stderr)
        return 1
    print(report)
    for what in report.device_failed:
        print(f"kiosk provision: warning: {what}", file=sys.stderr)
    return 0


def run_sign(folder: Path, key_path: Path, config_name: str = "kiosk.toml") -> int:
    """`kiosk provision sign --key KEY DIR`: sign DIR/kiosk.toml and the files it names."""
    source = folder.absolute() / config_name
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"kiosk provision sign: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    config, problems = check_config(source, check_key_modes=False)
    for problem in problems:
        print(problem, file=sys.stderr)
    if config is None:
        print(f"kiosk provision sign: {source} has problems; not signed", file=sys.stderr)
        return 2
    files = {config_name: bundle.sha256(source.read_bytes())}
    for item in named_files(source, text):
        if item.rel is not None and item.path.is_file():
            files[item.rel] = bundle.sha256(item.path.read_bytes())
    try:
        key = bundle.load_private_key(key_path, _passphrase(key_path))
        signed = bundle.sign(bundle.Manifest(bundle.now(), files), key)
        bundle.write_new(folder / bundle.SIGNATURE_FILE, signed, None, replace=True)
    except bundle.BundleError as exc:
        print(f"kiosk provision sign: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kiosk provision sign: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"kiosk provision sign: wrote {folder / bundle.SIGNATURE_FILE} for {len(files)} files")
    for name in sorted(files):
        print(f"  {name}")
    print(f"  signed by {bundle.fingerprint(key.public_key())}")
    return 0


def run_operator_keygen(key_path: Path, public_path: Path, ask_passphrase: bool) -> int:
    """`kiosk provision sign --keygen --key KEY`: the operator's key pair."""
    passphrase = None
    if ask_passphrase:
        passphrase = _passphrase_new()
    try:
        fingerprint = bundle.generate(key_path, public_path, passphrase)
    except bundle.BundleError as exc:
        print(f"kiosk provision sign: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kiosk provision sign: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"kiosk provision sign: operator key {fingerprint}")
    print(f"  private (keep it on this laptop, owner-only): {key_path}")
    print(f"  public (the image build installs it as /etc/kiosk/{OPERATOR_KEY}): {public_path}")
    return 0


def _passphrase(key_path: Path) -> bytes | None:
    if not bundle.is_encrypted(key_path):
        return None
    env = os.environ.get("KIOSK_OPERATOR_PASSPHRASE")
    if env is not None:
        return env.encode("utf-8")
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase of {key_path}: ").encode("utf-8")
    return None  # load_private_key says what to do


def _passphrase_new() -> bytes | None:
    env = os.environ.get("KIOSK_OPERATOR_PASSPHRASE")
    if env is not None:
        return env.encode("utf-8") or None
    first = getpass.getpass("passphrase for the new operator key: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("kiosk provision sign: the passphrases differ")
    return first.encode("utf-8") or None


# --- helpers ----------------------------------------------------------------------------------


def _lookup(owner: str | None, group: str | None) -> tuple[int | None, int | None]:
    uid = gid = None
    try:
        if owner:
            uid = pwd.getpwnam(owner).pw_uid
        if group:
            gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ProvisionError(
            f"the service user {owner!r} or group {group!r} does not exist "
            "(systemd-sysusers creates them from the image's sysusers.d/kiosk.conf)"
        ) from None
    return uid, gid


def _inside(path: Path, folder: Path) -> bool:
    return path.absolute().resolve().is_relative_to(folder.resolve())


def _rewrite_paths(text: str, new_paths: dict[tuple[str, str], Path]) -> str:
    """Point each installed key's value at its new path, editing only that value (comments and
    layout stay as the technician wrote them)."""
    index = LineIndex(text)
    lines = text.splitlines(keepends=True)
    for (section, key), path in new_paths.items():
        number = index.keys.get((section, key))
        line = lines[number - 1] if number else ""
        body = line.rstrip("\r\n")
        pattern = rf"""(\s*["']?{key}["']?\s*=\s*)("(?:[^"\\]|\\.)*"|'[^']*')(.*)"""
        found = re.fullmatch(pattern, body)
        if not number or not found:
            problem = ConfigProblem(
                "kiosk.toml",
                number or 1,
                f"cannot rewrite {section}.{key} for the installed config",
                f'write it on one line under [{section}] as  {key} = "path"',
            )
            raise ProvisionFailed([problem], None)
        value = '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines[number - 1] = found.group(1) + value + found.group(3) + line[len(body) :]
    return "".join(lines)


def _write_error_file(
    source: Path, problems: list[ConfigProblem], moved: list[str] | None = None
) -> Path | None:
    """kiosk-config-error.txt beside the source, CRLF so it reads in any laptop's editor."""
    lines = [
        "The kiosk did NOT install this config. Nothing was changed; the kiosk stays out of",
        "service until a good kiosk.toml is provisioned.",
        "",
        f"When: {_now()} (the kiosk's clock, UTC; it may be wrong before the network sets it)",
        f"Config: {source.name}",
        "",
        "Problems (FILE:LINE: message (hint)):",
    ]
    lines += [str(replace(p, file=source.name)) for p in problems]
    if moved:
        lines += [
            "",
            "Taken off this card for safety and kept on the kiosk (root only): " + ", ".join(moved),
            "The next provisioning uses them when kiosk.toml names the same files: no need to",
            "copy them again (a new copy on the card replaces the kept one).",
        ]
    lines += [
        "",
        "What to do: put this card in a computer, fix the lines above in kiosk.toml on the boot",
        "partition, put the card back and power on. Provisioning runs again at boot and removes",
        "this file when it succeeds.",
        "",
    ]
    path = source.parent / ERROR_FILE
    try:
        _write_atomic(path, "\r\n".join(lines).encode("utf-8"), None, None, None)
    except OSError:
        return None  # a read-only boot partition must not hide the real problem
    return path


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_atomic(
    path: Path, data: bytes, mode: int | None, uid: int | None, gid: int | None
) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            if uid is not None or gid is not None:
                os.fchown(file.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            if mode is not None:  # FAT has no modes; chmod would fail there
                os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _secure(path: Path, mode: int, uid: int | None, gid: int | None) -> None:
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (FAT on some kernels) refuse fsync on a directory
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
