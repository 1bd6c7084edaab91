"""The image's kiosk layer, laid out into a temp folder (`kiosk-layer.sh --no-chroot`), and a
static check of every image-build script."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE_BUILD = REPO / "image-build"
LAYER = IMAGE_BUILD / "kiosk-layer.sh"
SCRIPTS = sorted(IMAGE_BUILD.rglob("*.sh"))
UNIT_DIR = "usr/lib/systemd/system"
WANTS = "etc/systemd/system/multi-user.target.wants"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("root")
    result = subprocess.run(
        ["bash", str(LAYER), "--no-chroot", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _sysusers_lines(root: Path) -> list[list[str]]:
    text = (root / "usr/lib/sysusers.d/kiosk.conf").read_text()
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_units_are_installed_as_shipped(root: Path) -> None:
    for unit in ("kiosk.service", "kiosk-provision.service"):
        installed = root / UNIT_DIR / unit
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()
        assert _mode(installed) == 0o644


def test_both_units_are_enabled_for_multi_user(root: Path) -> None:
    for unit in ("kiosk.service", "kiosk-provision.service"):
        link = root / WANTS / unit
        assert link.is_symlink()
        assert str(link.readlink()) == f"/{UNIT_DIR}/{unit}"


def test_modemmanager_is_masked(root: Path) -> None:
    mask = root / "etc/systemd/system/ModemManager.service"
    assert mask.is_symlink()
    assert str(mask.readlink()) == "/dev/null"


def test_sysusers_creates_the_kiosk_user_in_its_device_groups(root: Path) -> None:
    lines = _sysusers_lines(root)
    users = [line for line in lines if line[0] == "u"]
    assert [line[1] for line in users] == ["kiosk"]
    assert users[0][-1] == "/usr/sbin/nologin"
    members = {line[2] for line in lines if line[0] == "m" and line[1] == "kiosk"}
    assert members == {"input", "gpio", "dialout"}


def test_sysusers_creates_the_gpio_group_plain_debian_lacks(root: Path) -> None:
    assert ["g", "gpio", "-"] in _sysusers_lines(root)


def test_tmpfiles_closes_the_key_and_state_folders_to_others(root: Path) -> None:
    text = (root / "usr/lib/tmpfiles.d/kiosk.conf").read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert ["d", "/etc/kiosk/keys", "0750", "root", "kiosk", "-"] in lines
    assert ["d", "/var/lib/kiosk", "0700", "kiosk", "kiosk", "-"] in lines


def test_udev_rules_are_installed(root: Path) -> None:
    rules = root / "usr/lib/udev/rules.d/60-kiosk.rules"
    assert rules.read_bytes() == (REPO / "systemd/udev/rules.d/60-kiosk.rules").read_bytes()
    assert _mode(rules) == 0o644


def test_secret_folders_are_owner_only(root: Path) -> None:
    assert _mode(root / "etc/kiosk/keys") == 0o750
    assert _mode(root / "var/lib/kiosk") == 0o700
    assert _mode(root / "etc/kiosk") == 0o755


def test_no_chroot_layout_stages_no_packages(root: Path) -> None:
    assert not (root / "opt/kiosk/bin").exists()
    assert not (root / "var/cache/kiosk-layer").exists()


def test_layer_refuses_the_host_root() -> None:
    result = subprocess.run(
        ["bash", str(LAYER), "--no-chroot", "/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "refusing" in result.stderr


def test_layer_is_rerunnable_over_its_own_output(root: Path) -> None:
    result = subprocess.run(
        ["bash", str(LAYER), "--no-chroot", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (root / WANTS / "kiosk.service").is_symlink()


def test_image_build_has_every_script() -> None:
    names = {str(script.relative_to(IMAGE_BUILD)) for script in SCRIPTS}
    assert {
        "kiosk-layer.sh",
        "build-debian-image.sh",
        "image-test.sh",
        "pi-gen/stage-kiosk/prerun.sh",
        "pi-gen/stage-kiosk/00-install/00-run.sh",
        "pi-gen/stage-kiosk/00-install/01-run-chroot.sh",
    } <= names
    assert (IMAGE_BUILD / "pi-gen/stage-kiosk/EXPORT_IMAGE").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: str(s.relative_to(IMAGE_BUILD)))
def test_script_parses(script: Path) -> None:
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: str(s.relative_to(IMAGE_BUILD)))
def test_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--external-sources", "--shell=bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=script.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
