"""The boot clock the journal stamps recent codes with: the kernel's boot id and CLOCK_BOOTTIME,
the boot id from systemd's variable where /proc/sys is hidden, and no reading at all (never an
exception) where there is neither."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kiosk.boot_clock import BOOT_ID_ENV, BOOT_ID_FILE, BootStamp, SystemBootClock

BOOT_ID = "97b5691a-6b02-4d73-a683-c54d4652f378"
SYSTEMD_FORM = "97b5691a6b024d73a683c54d4652f378"  # what systemd's %b gives

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not BOOT_ID_FILE.exists(),
    reason="needs Linux's /proc/sys/kernel/random/boot_id",
)


@pytest.fixture
def boot_id_file(tmp_path: Path) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(BOOT_ID + "\n")
    return path


@linux_only
def test_the_kernels_boot_clock_names_this_boot_and_never_goes_back() -> None:
    clock = SystemBootClock()
    first, second = clock(), clock()
    assert clock.unavailable is None and first is not None and second is not None
    assert first.boot_id == BOOT_ID_FILE.read_text().strip().replace("-", "")
    assert second.boot_id == first.boot_id and second.seconds >= first.seconds > 0


def test_the_boot_id_is_read_once_in_systemds_form(boot_id_file: Path) -> None:
    clock = SystemBootClock(boot_id_file, environ={})
    boot_id_file.unlink()  # read when made: a process cannot outlive its boot
    stamp = clock()
    assert isinstance(stamp, BootStamp) and stamp.boot_id == SYSTEMD_FORM


def test_where_proc_sys_is_hidden_the_boot_id_comes_from_systemd(tmp_path: Path) -> None:
    clock = SystemBootClock(tmp_path / "hidden", environ={BOOT_ID_ENV: SYSTEMD_FORM})
    stamp = clock()
    assert clock.unavailable is None and stamp is not None and stamp.boot_id == SYSTEMD_FORM


def test_the_file_comes_before_the_variable(boot_id_file: Path) -> None:
    stamp = SystemBootClock(boot_id_file, environ={BOOT_ID_ENV: "ab" * 16})()
    assert stamp is not None and stamp.boot_id == SYSTEMD_FORM


@pytest.mark.parametrize(
    ("environ", "why"),
    [
        ({}, f"${BOOT_ID_ENV} is not set"),
        ({BOOT_ID_ENV: "%b"}, f"${BOOT_ID_ENV} is not one"),
    ],
    ids=["no_variable", "unexpanded_variable"],
)
def test_without_a_boot_id_there_is_no_reading_and_it_says_why(
    tmp_path: Path, environ: dict[str, str], why: str
) -> None:
    clock = SystemBootClock(tmp_path / "hidden", environ=environ)
    assert clock() is None
    assert clock.unavailable is not None
    assert str(tmp_path / "hidden") in clock.unavailable and why in clock.unavailable


def test_a_boot_id_file_that_holds_no_boot_id_is_not_taken_for_one(tmp_path: Path) -> None:
    junk = tmp_path / "boot_id"
    junk.write_bytes(b"\xff\xfe not an id")
    clock = SystemBootClock(junk, environ={})
    assert clock() is None and clock.unavailable is not None


def test_a_system_without_clock_boottime_has_no_boot_clock(boot_id_file: Path) -> None:
    clock = SystemBootClock(boot_id_file, environ={}, clock_id=None)
    assert clock() is None
    assert clock.unavailable == "this system has no CLOCK_BOOTTIME"


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="needs CLOCK_BOOTTIME")
def test_a_clock_the_kernel_refuses_leaves_no_boot_clock(boot_id_file: Path) -> None:
    clock = SystemBootClock(boot_id_file, environ={}, clock_id=12345)
    assert clock() is None and clock.unavailable is not None
