"""`kiosk provision`: first boot. Install the config and keys a technician dropped on the FAT
boot partition into /etc/kiosk with safe modes, then take the secrets off the boot partition.

Who owns what after install (the service runs as user `kiosk`; `read_secret_file` refuses any
group or other bits on a secret, so group-readable 0640 is not an option):

    /etc/kiosk/                      root:root    0755  (created if missing)
    /etc/kiosk/kiosk.toml            root:kiosk   0640  no secrets; key paths point below
    /etc/kiosk/keys/                 root:kiosk   0750  only the service user may enter
    /etc/kiosk/keys/merchant_private_key.pem, md5.key
                                     kiosk:kiosk  0600  the service user reads, nobody else
    /etc/kiosk/keys/alipay_public_key.pem, ca_bundle.pem
                                     root:kiosk   0640
    /etc/kiosk/provisioned.json      root:root    0644  what was done; no key material

Out of scope: it does not start or reload the daemon (systemd orders this before kiosk.service)
and does not touch the journal.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiosk.config import ConfigProblem, LineIndex, check_config
from kiosk.errors import ConfigError, KioskError

ERROR_FILE = "kiosk-config-error.txt"
RECORD_FILE = "provisioned.json"
DONE_SUFFIX = ".provisioned"

# Config key -> installed file name (the names SPEC section 3 shows), and whether it is secret.
_INSTALLED_NAMES = {
    "private_key_file": ("merchant_private_key.pem", True),
    "alipay_public_key_file": ("alipay_public_key.pem", False),
    "md5_key_file": ("md5.key", True),
    "ca_bundle": ("ca_bundle.pem", False),
}


class ProvisionError(KioskError, RuntimeError):
    """Provisioning could not run (no such user, a write failed): exit 1."""


class ProvisionFailed(ConfigError):
    """The dropped config is bad; nothing was installed (exit 2). `problems` says why."""

    def __init__(self, problems: list[ConfigProblem], error_file: Path | None) -> None:
        self.problems = list(problems)
        self.error_file = error_file
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class InstalledFile:
    key: str  # the config key it came from, or "config"
    path: Path
    mode: int


@dataclass
class ProvisionReport:
    """What `provision` did. `status`: installed | already_installed | nothing_to_do."""

    status: str
    source: Path
    config_path: Path | None = None
    installed: list[InstalledFile] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    left_in_place: list[Path] = field(default_factory=list)  # secrets outside the boot folder
    warnings: list[ConfigProblem] = field(default_factory=list)
    record: Path | None = None

    def __str__(self) -> str:
        if self.status == "nothing_to_do":
            return f"kiosk provision: nothing to do: {self.source} was already provisioned"
        if self.status == "already_installed":
            lines = [f"kiosk provision: {self.source} is already installed as {self.config_path}"]
        else:
            lines = [f"kiosk provision: installed {self.source} as {self.config_path}"]
            lines += [f"  {f.path} (mode {f.mode:04o})" for f in self.installed]
        lines += [f"  removed from the boot partition: {path}" for path in self.removed]
        lines += [
            f"  left in place (not in the boot folder; delete it yourself): {path}"
            for path in self.left_in_place
        ]
        lines += [f"  {problem}" for problem in self.warnings]
        if self.record:
            lines.append(f"  record: {self.record}")
        return "\n".join(lines)


def provision(
    source: Path,
    etc_dir: Path = Path("/etc/kiosk"),
    owner: str | None = "kiosk",
    group: str | None = "kiosk",
) -> ProvisionReport:
    """Validate `source`, install it and its key files under `etc_dir`, clean the boot partition.

    `owner`/`group` name the service user and group; `None` keeps the current user (tests run
    unprivileged). Safe to run again: with no source, or with the config already installed, it
    only finishes the cleanup and says so.
    """
    source = source.absolute()
    done_marker = source.with_name(source.name + DONE_SUFFIX)
    record_path = etc_dir / RECORD_FILE
    installed_config = etc_dir / "kiosk.toml"
    if not source.exists():
        if done_marker.exists() or record_path.exists():
            return ProvisionReport("nothing_to_do", source, record=record_path)
        problem = ConfigProblem(
            str(source), 1, "no config file to provision", "copy kiosk.toml onto the boot partition"
        )
        raise ProvisionFailed([problem], None)

    source_bytes = source.read_bytes()
    source_sha = hashlib.sha256(source_bytes).hexdigest()
    previous = _read_record(record_path)
    if previous.get("source_sha256") == source_sha and installed_config.exists():
        config, problems = check_config(installed_config)
        if config is not None:
            # The same config again, or a power cut after install but before the cleanup.
            report = ProvisionReport("already_installed", source, installed_config)
            report.warnings = problems
            _clean_boot_partition(source, etc_dir, _named_files(source, source_bytes), report)
            return report

    config, problems = check_config(source, check_key_modes=False)
    if config is None:
        raise ProvisionFailed(problems, _write_error_file(source, problems))

    uid, gid = _lookup(owner, group)
    report = ProvisionReport("installed", source, installed_config)
    report.warnings = [p for p in problems if p.warning]
    keys_dir = etc_dir / "keys"
    if not etc_dir.is_dir():
        etc_dir.mkdir(parents=True)
        os.chmod(etc_dir, 0o755)  # explicitly: the unit's UMask=0077 would lock the service out
    keys_dir.mkdir(mode=0o750, exist_ok=True)
    _secure(keys_dir, 0o750, None, gid)
    named = _named_files(source, source_bytes)
    new_paths: dict[str, Path] = {}
    for key, src in named.items():
        name, secret = _INSTALLED_NAMES[key]
        dest = keys_dir / name
        mode = 0o600 if secret else 0o640
        file_uid = uid if secret else None
        if not (dest.exists() and src.exists() and os.path.samefile(src, dest)):
            _write_atomic(dest, src.read_bytes(), mode, file_uid, gid)
        _secure(dest, mode, file_uid, gid)
        new_paths[key] = dest
        report.installed.append(InstalledFile(key, dest, mode))

    text = _rewrite_paths(source_bytes.decode("utf-8"), new_paths)
    staged = etc_dir / "kiosk.toml.new"
    _write_atomic(staged, text.encode("utf-8"), 0o640, None, gid)
    verified, verify_problems = check_config(staged)
    if verified is None:
        staged.unlink(missing_ok=True)
        raise ProvisionFailed(verify_problems, _write_error_file(source, verify_problems))
    os.replace(staged, installed_config)
    _fsync_dir(etc_dir)
    report.installed.insert(0, InstalledFile("config", installed_config, 0o640))

    # The record goes down before the cleanup, so a power cut in between is recognised on the
    # next boot as "already installed" rather than a config whose keys went missing.
    record = {
        "provisioned_at": _now(),
        "source": str(source),
        "source_sha256": source_sha,
        "config": str(installed_config),
        "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "files": [
            {"key": f.key, "path": str(f.path), "mode": f"{f.mode:04o}"} for f in report.installed
        ],
        "secrets_removed_from_boot": [
            str(path)
            for key, path in named.items()
            if _INSTALLED_NAMES[key][1] and _inside(path, source.parent)
        ],
    }
    _write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode(), 0o644, None, None)
    report.record = record_path
    _clean_boot_partition(source, etc_dir, named, report)
    return report


def run_provision(source: Path, etc_dir: Path = Path("/etc/kiosk")) -> int:
    """`kiosk provision --from SOURCE`: 0 done (or nothing to do), 2 bad config, 1 failure.

    As root the installed secrets go to user `kiosk`; otherwise the current user keeps them.
    """
    who = "kiosk" if os.geteuid() == 0 else None
    try:
        report = provision(source, etc_dir, owner=who, group=who)
    except ProvisionFailed as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if exc.error_file:
            print(f"kiosk provision: nothing installed; see {exc.error_file}", file=sys.stderr)
        return 2
    except (ProvisionError, OSError, UnicodeDecodeError) as exc:
        print(f"kiosk provision: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


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


def _named_files(source: Path, source_bytes: bytes) -> dict[str, Path]:
    """The files the config names, resolved against its folder (it already passed the check,
    or was installed before, so it parses)."""
    try:
        alipay = tomllib.loads(source_bytes.decode("utf-8")).get("alipay", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    named: dict[str, Path] = {}
    for key in _INSTALLED_NAMES:
        value = alipay.get(key) if isinstance(alipay, dict) else None
        path = (
            source.parent / Path(value).expanduser() if isinstance(value, str) and value else None
        )
        # A key for another sign type may name a file that is not there; it is only a warning.
        if path is not None and path.is_file():
            named[key] = path
    return named


def _inside(path: Path, folder: Path) -> bool:
    return path.absolute().resolve().is_relative_to(folder.resolve())


def _clean_boot_partition(
    source: Path, etc_dir: Path, named: dict[str, Path], report: ProvisionReport
) -> None:
    """Remove the secrets from the boot folder, the old error file, and mark the source done."""
    for key, path in named.items():
        if not _INSTALLED_NAMES[key][1] or not path.exists():
            continue
        if _inside(path, etc_dir):
            continue  # already the installed file
        if not _inside(path, source.parent):
            report.left_in_place.append(path)
            continue
        # Plain unlink: overwriting with zeros first is pointless on flash (wear levelling
        # writes elsewhere) and on FAT; the card must be treated as having held the key.
        path.unlink()
        report.removed.append(path)
    (source.parent / ERROR_FILE).unlink(missing_ok=True)
    os.replace(source, source.with_name(source.name + DONE_SUFFIX))
    _fsync_dir(source.parent)


def _rewrite_paths(text: str, new_paths: dict[str, Path]) -> str:
    """Point each installed key's value at its new path, editing only that value (comments and
    layout stay as the technician wrote them)."""
    index = LineIndex(text)
    lines = text.splitlines(keepends=True)
    for key, path in new_paths.items():
        number = index.keys.get(("alipay", key))
        line = lines[number - 1] if number else ""
        body = line.rstrip("\r\n")
        pattern = rf"""(\s*["']?{key}["']?\s*=\s*)("(?:[^"\\]|\\.)*"|'[^']*')(.*)"""
        found = re.fullmatch(pattern, body)
        if not number or not found:
            problem = ConfigProblem(
                "kiosk.toml",
                number or 1,
                f"cannot rewrite alipay.{key} for the installed config",
                f'write it on one line under [alipay] as  {key} = "path"',
            )
            raise ProvisionFailed([problem], None)
        value = '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines[number - 1] = found.group(1) + value + found.group(3) + line[len(body) :]
    return "".join(lines)


def _write_error_file(source: Path, problems: list[ConfigProblem]) -> Path | None:
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
    lines += [
        "",
        "What to do: put this card in a computer, fix the lines above in kiosk.toml on the boot",
        "partition (keep the key files beside it), put the card back and power on. Provisioning",
        "runs again at boot and removes this file when it succeeds.",
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
