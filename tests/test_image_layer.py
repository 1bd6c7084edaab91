"""The image's kiosk layer, laid out into a temp folder (`kiosk-layer.sh --no-chroot`), and a
static check of every image-build script."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
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


def test_the_service_byte_code_is_compiled_with_the_units_python_settings(
    tmp_path: Path,
) -> None:
    """--inside compiles the daemon's modules with the unit's Environment=PYTHON* settings
    (writing byte code allowed), so the service finds its byte code on a read-only root."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nenv | grep "^PYTHON" | sort > "$(dirname "$0")/env"\n')
    python.chmod(0o755)
    function = re.search(r"^compile_for_the_service\(\) \{$.*?^\}$", LAYER.read_text(), re.M | re.S)
    assert function is not None
    script = "\n".join(
        [
            "set -euo pipefail",
            f"UNIT_DIR={REPO / 'systemd'}",
            f"VENV={venv}",
            "DAEMON_MODULES=(kiosk.daemon)",
            function.group(0),
            "PYTHONDONTWRITEBYTECODE=1 compile_for_the_service",
        ]
    )
    subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, check=True, timeout=30)
    unit = (REPO / "systemd" / "kiosk.service").read_text().splitlines()
    settings = [line.removeprefix("Environment=") for line in unit]
    wanted = [s for s in settings if s.startswith("PYTHON") and "DONTWRITEBYTECODE" not in s]
    assert {"PYTHONOPTIMIZE=2", "PYTHONNODEBUGRANGES=1"} <= set(wanted)
    assert (venv / "bin" / "env").read_text().split() == sorted(wanted)


def test_image_build_has_every_script() -> None:
    names = {str(script.relative_to(IMAGE_BUILD)) for script in SCRIPTS}
    assert {
        "kiosk-layer.sh",
        "build-debian-image.sh",
        "image-test.sh",
        "pi-gen/stage-kiosk/prerun.sh",
        "pi-gen/stage-kiosk/00-install/00-run.sh",
        "pi-gen/stage-kiosk/00-install/01-run-chroot.sh",
        "pi-gen/stage-kiosk/00-install/02-run.sh",
        "pi-gen/stage-kiosk/01-harden/00-run.sh",
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


# --- The hardened system around the kiosk (image-build/hardening/, laid out by the layer) ---

HARDENING = IMAGE_BUILD / "hardening"
SYSTEM_UNITS = "etc/systemd/system"


def _ini(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd-style ini file: section -> key -> every value assigned, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _shell_array(script: Path, name: str) -> list[str]:
    match = re.search(rf"^{name}=\((.*?)\)", script.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"no {name}=(...) in {script.name}"
    return [word.strip('"') for word in match.group(1).split()]


def test_every_hardening_file_is_laid_out_as_shipped(root: Path) -> None:
    shipped = sorted(p.relative_to(HARDENING) for p in HARDENING.rglob("*") if p.is_file())
    assert shipped, "image-build/hardening is empty"
    for relative in shipped:
        installed = root / relative
        assert installed.read_bytes() == (HARDENING / relative).read_bytes(), relative
        expected = 0o755 if str(relative) == "etc/nftables.conf" else 0o644
        assert _mode(installed) == expected, relative


@pytest.mark.parametrize(
    "unit",
    [
        "getty@.service",
        "serial-getty@.service",
        "autovt@.service",
        "console-getty.service",
        "getty-static.service",
        "debug-shell.service",
        "ctrl-alt-del.target",
    ],
)
def test_consoles_and_ctrl_alt_del_are_masked(root: Path, unit: str) -> None:
    mask = root / SYSTEM_UNITS / unit
    assert mask.is_symlink()
    assert str(mask.readlink()) == "/dev/null"


def test_the_getty_systemd_enables_on_tty1_is_removed(tmp_path: Path) -> None:
    wants = tmp_path / SYSTEM_UNITS / "getty.target.wants"
    wants.mkdir(parents=True)
    (wants / "getty@tty1.service").symlink_to("/usr/lib/systemd/system/getty@.service")
    result = subprocess.run(
        ["bash", str(LAYER), "--no-chroot", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not (wants / "getty@tty1.service").is_symlink()


def test_logind_spawns_and_reserves_no_virtual_console(root: Path) -> None:
    login = _ini(root / "etc/systemd/logind.conf.d/kiosk-lockdown.conf")["Login"]
    assert login["NAutoVTs"] == ["0"]
    assert login["ReserveVT"] == ["0"]


def test_ctrl_alt_del_burst_does_nothing(root: Path) -> None:
    manager = _ini(root / "etc/systemd/system.conf.d/kiosk-lockdown.conf")["Manager"]
    assert manager["CtrlAltDelBurstAction"] == ["none"]


def test_sysrq_is_off(root: Path) -> None:
    settings = {}
    for line in (root / "etc/sysctl.d/90-kiosk-lockdown.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings == {"kernel.sysrq": "0"}
    # Applied after the distribution's defaults (systemd's 50-default.conf sets it too).
    assert "90-kiosk-lockdown.conf" > "50-default.conf"


def test_resolved_answers_no_llmnr_or_mdns(root: Path) -> None:
    resolve = _ini(root / "etc/systemd/resolved.conf.d/kiosk.conf")["Resolve"]
    assert resolve["LLMNR"] == ["no"]
    assert resolve["MulticastDNS"] == ["no"]


def test_timesyncd_uses_fixed_servers_only(root: Path) -> None:
    time_section = _ini(root / "etc/systemd/timesyncd.conf.d/kiosk.conf")["Time"]
    (servers,) = time_section["NTP"]
    assert len(servers.split()) >= 2
    assert time_section["FallbackNTP"] == [""]


def test_debian_network_takes_no_ntp_server_or_multicast_dns_from_the_network() -> None:
    script = (IMAGE_BUILD / "build-debian-image.sh").read_text()
    network = script[script.index("20-wired.network") :]
    network = network[: network.index("\tEOF")]
    for line in ("UseNTP=no", "LLMNR=no", "MulticastDNS=no"):
        assert line in network
    assert network.count("UseNTP=no") == 2  # DHCPv4 and DHCPv6


def test_wait_for_clock_sync_is_enabled_and_bounded(root: Path) -> None:
    link = root / SYSTEM_UNITS / "sysinit.target.wants/systemd-time-wait-sync.service"
    assert link.is_symlink()
    assert link.readlink().name == "systemd-time-wait-sync.service"
    drop_in = _ini(root / SYSTEM_UNITS / "systemd-time-wait-sync.service.d/kiosk.conf")
    # The bound counts from timesyncd's start, not from early boot.
    assert drop_in["Unit"]["After"] == ["systemd-timesyncd.service"]
    service = drop_in["Service"]
    # Upstream says infinity; the drop-in's later assignment bounds it.
    (bound,) = service["TimeoutStartSec"]
    match = re.fullmatch(r"(\d+)s", bound)
    assert match and 0 < int(match.group(1)) <= 300


def test_kiosk_waits_for_time_sync_target(root: Path) -> None:
    unit = _ini(root / UNIT_DIR / "kiosk.service")["Unit"]
    assert "time-sync.target" in " ".join(unit["After"]).split()
    assert "time-sync.target" in " ".join(unit["Wants"]).split()


def test_firewall_is_enabled_at_boot_and_gates_the_network(root: Path) -> None:
    link = root / SYSTEM_UNITS / "sysinit.target.wants/nftables.service"
    assert link.is_symlink()
    assert link.readlink().name == "nftables.service"
    for manager in ("systemd-networkd", "NetworkManager"):
        unit = _ini(root / SYSTEM_UNITS / f"{manager}.service.d/kiosk-firewall.conf")["Unit"]
        assert unit["Requires"] == ["nftables.service"]
        assert unit["After"] == ["nftables.service"]


def _nft_rules() -> str:
    return "\n".join(
        line.split("#", 1)[0].rstrip()
        for line in (HARDENING / "etc/nftables.conf").read_text().splitlines()
    )


def test_firewall_drops_inbound_by_default() -> None:
    rules = _nft_rules()
    assert "flush ruleset" in rules
    assert re.search(r"type filter hook input priority filter; policy drop;", rules)
    assert re.search(r"type filter hook forward priority filter; policy drop;", rules)
    assert "ct state established,related accept" in rules
    assert 'iif "lo" accept' in rules


def test_firewall_opens_no_port_to_a_new_connection() -> None:
    accepted = [
        line.strip() for line in _nft_rules().splitlines() if line.strip().endswith("accept")
    ]
    for line in accepted:
        if "dport" in line:
            # Only the DHCP client's ports, and only from a DHCP server's port.
            assert re.search(r"udp sport (67|547) udp dport (68|546) accept$", line), line
        assert "tcp" not in line, line


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) is not installed")
def test_firewall_ruleset_loads_in_a_scratch_network_namespace() -> None:
    probe = subprocess.run(
        ["unshare", "--net", "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"no network namespace with nf_tables here: {probe.stderr.strip()}")
    result = subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", str(HARDENING / "etc/nftables.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_layer_masks_and_enables_what_it_lists() -> None:
    assert set(_shell_array(LAYER, "MASKED_UNITS")) >= {
        "getty@.service",
        "serial-getty@.service",
        "autovt@.service",
        "ctrl-alt-del.target",
    }
    assert set(_shell_array(LAYER, "SYSINIT_UNITS")) == {
        "nftables.service",
        "systemd-time-wait-sync.service",
    }
    assert "nftables" in _shell_array(LAYER, "HARDENING_PACKAGES")


# --- pi-gen: Raspberry Pi OS Lite's extras, run here with pi-gen's helpers stubbed ---

STAGE = IMAGE_BUILD / "pi-gen/stage-kiosk"
# pi-gen's own stage1 files, as the bookworm-arm64 branch ships them.
PI_GEN_CMDLINE = (
    "console=serial0,115200 console=tty1 root=ROOTDEV rootfstype=ext4 fsck.repair=yes rootwait\n"
)
PI_GEN_CONFIG = "# For more options and information see\n[all]\ndtparam=audio=on\n"


def _pi_gen(script: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a stage script as pi-gen does (bash -e, in its folder), on_chroot and
    copy_previous replaced by stubs that record what they were given."""
    stubs = (
        'on_chroot() { cat >>"${CHROOT_LOG}"; }; export -f on_chroot; '
        'copy_previous() { mkdir -p "${ROOTFS_DIR}"; echo copied >"${CHROOT_LOG}.copy"; }; '
        "export -f copy_previous; "
        f'bash -e "{script}"'
    )
    return subprocess.run(
        ["bash", "-c", stubs],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
    )


PI_GEN_ENV = {
    "RELEASE": "bookworm",
    "ARCH": "arm64",
    "DISABLE_FIRST_BOOT_USER_RENAME": "1",
    "ENABLE_SSH": "0",
    "FIRST_USER_NAME": "pi",
}


def test_pi_gen_stage_starts_from_the_lite_root_when_configured_for_a_kiosk(
    tmp_path: Path,
) -> None:
    env = {
        **PI_GEN_ENV,
        "ROOTFS_DIR": str(tmp_path / "rootfs"),
        "CHROOT_LOG": str(tmp_path / "log"),
    }
    result = _pi_gen(STAGE / "prerun.sh", env, STAGE)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log.copy").read_text() == "copied\n"


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("DISABLE_FIRST_BOOT_USER_RENAME", "0", "DISABLE_FIRST_BOOT_USER_RENAME=1"),
        ("ENABLE_SSH", "1", "ENABLE_SSH=0"),
        ("RELEASE", "trixie", "bookworm"),
        ("ARCH", "armhf", "arm64"),
    ],
)
def test_pi_gen_stage_refuses_a_config_that_leaves_a_way_in_or_a_wrong_python(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    env = {
        **PI_GEN_ENV,
        setting: value,
        "ROOTFS_DIR": str(tmp_path / "rootfs"),
        "CHROOT_LOG": str(tmp_path / "log"),
    }
    result = _pi_gen(STAGE / "prerun.sh", env, STAGE)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "log.copy").exists()


@pytest.fixture
def pi_gen_hardened(tmp_path: Path) -> tuple[Path, str]:
    rootfs = tmp_path / "rootfs"
    firmware = rootfs / "boot/firmware"
    firmware.mkdir(parents=True)
    (firmware / "cmdline.txt").write_text(PI_GEN_CMDLINE)
    (firmware / "config.txt").write_text(PI_GEN_CONFIG)
    env = {**PI_GEN_ENV, "ROOTFS_DIR": str(rootfs), "CHROOT_LOG": str(tmp_path / "chroot.sh")}
    result = _pi_gen(STAGE / "01-harden/00-run.sh", env, STAGE / "01-harden")
    assert result.returncode == 0, result.stderr
    return rootfs, (tmp_path / "chroot.sh").read_text()


def test_pi_gen_kernel_console_leaves_the_uart_and_sysrq_is_off_from_boot(
    pi_gen_hardened: tuple[Path, str],
) -> None:
    rootfs, _ = pi_gen_hardened
    cmdline = (rootfs / "boot/firmware/cmdline.txt").read_text()
    assert cmdline.count("\n") == 1  # still one line
    words = cmdline.split()
    assert not [word for word in words if word.startswith("console=serial")]
    assert "console=tty1" in words
    assert "sysctl.kernel.sysrq=0" in words
    assert "root=ROOTDEV" in words  # pi-gen's export stage turns it into root=PARTUUID=...


def test_pi_gen_firmware_keeps_bluetooth_off(pi_gen_hardened: tuple[Path, str]) -> None:
    rootfs, _ = pi_gen_hardened
    config = (rootfs / "boot/firmware/config.txt").read_text()
    assert config.startswith(PI_GEN_CONFIG)
    assert config.rstrip().splitlines()[-1] == "dtoverlay=disable-bt"


def test_pi_gen_network_manager_does_no_multicast_dns(pi_gen_hardened: tuple[Path, str]) -> None:
    rootfs, _ = pi_gen_hardened
    conf = _ini(rootfs / "etc/NetworkManager/conf.d/90-kiosk-no-multicast-dns.conf")
    assert conf["connection"] == {"connection.mdns": ["0"], "connection.llmnr": ["0"]}


def test_pi_gen_purges_avahi_bluetooth_and_swap(pi_gen_hardened: tuple[Path, str]) -> None:
    _, chroot = pi_gen_hardened
    purge = next(line for line in chroot.splitlines() if line.startswith("apt-get purge"))
    assert {"avahi-daemon", "bluez", "pi-bluetooth", "dphys-swapfile"} <= set(purge.split())
    assert "rm -f /var/swap" in chroot


def test_pi_gen_masks_the_first_boot_wizard_and_the_ssh_switch(
    pi_gen_hardened: tuple[Path, str],
) -> None:
    _, chroot = pi_gen_hardened
    masked = chroot[chroot.index("for unit in") : chroot.index("; do")].split()[3:]
    assert {"userconfig.service", "sshswitch.service", "bluetooth.service"} <= set(masked)
    assert 'ln -sfn /dev/null "/etc/systemd/system/${unit}"' in chroot


def test_pi_gen_locks_the_first_user(pi_gen_hardened: tuple[Path, str]) -> None:
    _, chroot = pi_gen_hardened
    assert 'usermod --lock --expiredate 1 --shell /usr/sbin/nologin "pi"' in chroot
    assert "rm -f /etc/sudoers.d/010_pi-nopasswd" in chroot


def test_pi_gen_writes_the_sbom_beside_the_exported_image() -> None:
    script = (STAGE / "00-install/02-run.sh").read_text()
    assert '--sbom "${ROOTFS_DIR}"' in script
    assert '"${DEPLOY_DIR}/${IMG_FILENAME}-kiosk.cdx.json"' in script


# --- Supply chain: the hash-locked wheels, the SBOM, the base's security updates ---

LOCK = REPO / "requirements/image.lock"
BUILD = IMAGE_BUILD / "build-debian-image.sh"
TARGET_TAGS = re.compile(r"-(cp311|py3|py2\.py3)-(cp311|abi3|none)-([a-z0-9_.]+)\.whl$")


def _lock_entries() -> list[tuple[str, str, list[str], str]]:
    """(name, version, sha256 hashes, wheel file) for each pin of the lock."""
    entries = []
    text = LOCK.read_text()
    for block in re.split(r"\n(?=[a-z0-9])", text.split("\n", 4)[4]):
        head = re.match(r"([a-z0-9-]+)==(\S+) \\", block)
        assert head, block
        hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", block)
        (wheel,) = re.findall(r"# (\S+\.whl)", block)
        entries.append((head.group(1), head.group(2), hashes, wheel))
    return entries


def test_lock_pins_every_wheel_with_one_sha256_for_the_target() -> None:
    entries = _lock_entries()
    assert entries
    names = [name for name, *_ in entries]
    assert len(names) == len(set(names))
    for name, version, hashes, wheel in entries:
        assert len(hashes) == 1 and len(hashes[0]) == 64, name
        assert wheel.lower().replace("_", "-").startswith(f"{name}-{version}-"), wheel
        tags = TARGET_TAGS.search(wheel)
        assert tags, f"{wheel}: not a CPython 3.11 wheel"
        platform = tags.group(3)
        assert platform == "any" or all(p.endswith("aarch64") for p in platform.split(".")), wheel


def test_lock_is_made_from_the_layers_requirements_and_meets_them() -> None:
    from packaging.requirements import Requirement

    wanted = _shell_array(LAYER, "WHEEL_REQUIREMENTS")
    recorded = re.search(r"^# requirements: (.*)$", LOCK.read_text(), re.MULTILINE)
    assert recorded, "the lock does not say what it was made from"
    assert recorded.group(1).split() == wanted, "stale lock: run image-build/kiosk-layer.sh --lock"
    pinned = {name: version for name, version, *_ in _lock_entries()}
    for line in wanted:
        requirement = Requirement(line)
        assert requirement.specifier.contains(pinned[requirement.name], prereleases=True), line


def test_lock_meets_the_kiosks_own_minimum_versions() -> None:
    import tomllib

    from packaging.requirements import Requirement

    pinned = {name: version for name, version, *_ in _lock_entries()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name in pinned:
            assert requirement.specifier.contains(pinned[requirement.name]), (
                f"{line}: the lock has {pinned[requirement.name]}"
            )


def test_layer_installs_only_hash_checked_wheels_and_checks_the_kiosks_requirements() -> None:
    script = LAYER.read_text()
    body = script[script.index("install_python_packages() {") :]
    body = body[: body.index("\n}\n")]
    assert '--require-hashes -r "${STAGE}/image.lock"' in body
    assert '"${VENV}/bin/pip" check' in body
    # The kiosk wheel goes in after the lock, and pip check comes last.
    assert body.index("image.lock") < body.index("kiosk-*.whl") < body.index('pip" check')
    fetch = script[script.index("fetch_wheels() {") :]
    fetch = fetch[: fetch.index("\n}\n")]
    assert '--require-hashes -r "${LOCK}"' in fetch
    assert "WHEEL_REQUIREMENTS" not in fetch  # the build fetches the lock, never a fresh resolve


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def test_sbom_of_the_images_python_environment_is_valid_cyclonedx(tmp_path: Path) -> None:
    validation = pytest.importorskip("cyclonedx.validation.json")
    from cyclonedx.schema import SchemaVersion

    inventory = REPO / "tests/data/python-inventory.json"
    dists = json.loads(inventory.read_text())["installed"]
    locked = {"cryptography": "50.0.2", "requests": "2.34.2", "certifi": "2026.10.19.post1"}
    lock = tmp_path / "image.lock"
    lock.write_text(
        "".join(
            f"{name}=={version} \\\n    --hash=sha256:{_digest(name)}\n"
            for name, version in locked.items()
        )
    )
    out = tmp_path / "kiosk.cdx.json"
    result = subprocess.run(
        [
            sys.executable,
            str(IMAGE_BUILD / "sbom.py"),
            "--inventory",
            str(inventory),
            "--lock",
            str(lock),
            "--name",
            "kiosk",
            "--version",
            "0.1.0",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    error = validation.JsonStrictValidator(SchemaVersion.V1_5).validate_str(out.read_text())
    assert error is None, getattr(error, "data", error)

    bom = json.loads(out.read_text())
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.5")
    components = {c["name"]: c for c in bom["components"]}
    assert set(components) == {d["metadata"]["name"] for d in dists}
    for name, version in locked.items():
        assert components[name]["hashes"] == [{"alg": "SHA-256", "content": _digest(name)}]
        assert components[name]["purl"] == f"pkg:pypi/{name}@{version}"
    # Debian's packages are named as Debian's, so a scanner uses Debian's security tracker.
    evdev_purl = "pkg:deb/debian/python3-evdev@1.6.1%2Bdfsg-1%2Bb2?arch=arm64"
    assert components["evdev"]["purl"] == evdev_purl
    assert "hashes" not in components["evdev"]
    refs = {c["bom-ref"] for c in bom["components"]} | {bom["metadata"]["component"]["bom-ref"]}
    for dependency in bom["dependencies"]:
        assert dependency["ref"] in refs
        assert set(dependency["dependsOn"]) <= refs
    requests_deps = next(
        d for d in bom["dependencies"] if d["ref"] == components["requests"]["bom-ref"]
    )
    assert components["urllib3"]["bom-ref"] in requests_deps["dependsOn"]


def test_debian_image_is_upgraded_against_the_security_archive() -> None:
    script = BUILD.read_text()
    assert re.search(r"^\t\tdeb \S+ \$\{SUITE\}-security main", script, re.MULTILINE)
    install = script[script.index("install_system() {") :]
    install = install[: install.index("\n}\n")]
    assert (
        install.index("apt-get update")
        < install.index("upgrade_base")
        < install.index("PACKAGES[@]")
    )
    assert "apt-get full-upgrade -y" in script
    finish = script[script.index("finish_root() {") :]
    assert finish.index("check_up_to_date") < finish.index("apt-get clean")


def test_debian_image_mounts_and_boots_by_partuuid() -> None:
    script = BUILD.read_text()
    assert not re.search(r"(^|\s)(LABEL|ROOTPART)=LABEL=|^\s*LABEL=", script, re.MULTILINE)
    fstab = script[script.index('cat >"${ROOT}/etc/fstab"') :]
    fstab = fstab[: fstab.index("\tEOF")]
    assert "PARTUUID=${DISK_ID}-02  /  " in fstab
    assert "PARTUUID=${DISK_ID}-01  /boot/firmware" in fstab
    assert "ROOTPART=PARTUUID=${DISK_ID}-02" in script
    assert "sysctl.kernel.sysrq=0" in script


def _sourced(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'source "{BUILD}"; {command}'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
    )


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (fdisk) is not installed")
def test_partition_table_carries_the_disk_id_the_fstab_names(tmp_path: Path) -> None:
    image = tmp_path / "card.img"
    result = _sourced(
        f'choose_disk_id; truncate -s 400M "{image}"; write_partition_table "{image}" 100; '
        "echo ${DISK_ID}",
        KIOSK_DISK_ID="C0FFEE42",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "c0ffee42"
    dump = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert (dump["label"], dump["id"]) == ("dos", "0xc0ffee42")
    boot, root = dump["partitions"]
    assert (boot["start"], boot["size"], boot["type"]) == (4 * 2048, 256 * 2048, "c")
    assert (root["start"], root["size"], root["type"]) == (260 * 2048, 100 * 2048, "83")


@pytest.mark.parametrize("bad", ["00000000", "xyz", "123456789"])
def test_a_disk_id_that_names_no_disk_is_refused(bad: str) -> None:
    result = _sourced("choose_disk_id", KIOSK_DISK_ID=bad)
    assert result.returncode != 0
    assert "disk identifier" in result.stderr


def test_random_disk_ids_differ_per_build() -> None:
    ids = {_sourced("choose_disk_id; echo ${DISK_ID}").stdout.strip() for _ in range(3)}
    assert len(ids) == 3
    assert all(re.fullmatch(r"[0-9a-f]{8}", value) for value in ids)
