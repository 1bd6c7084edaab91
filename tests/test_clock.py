"""Is the clock synchronised: the kernel's word (adjtimex, read only) or timesyncd's flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiosk.clock import STA_UNSYNC, TIME_ERROR, clock_synchronised, kernel_clock_state

TIME_OK = 0


@pytest.mark.parametrize(
    ("state", "synced"),
    [
        ((TIME_OK, 0), True),
        ((TIME_OK, STA_UNSYNC), False),  # status says unsynchronised
        ((TIME_ERROR, 0), False),  # the return value says so
        ((TIME_ERROR, STA_UNSYNC), False),  # this build machine: 5, 0x40
        (None, False),  # refused (ProtectClock=yes gives EPERM): no word from the kernel
    ],
)
def test_the_kernel_decides_without_timesyncds_flag(
    tmp_path: Path, state: tuple[int, int] | None, synced: bool
) -> None:
    assert clock_synchronised(lambda: state, tmp_path / "no-flag") is synced


def test_timesyncds_flag_says_synchronised_when_the_kernel_cannot(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    flag.touch()
    assert clock_synchronised(lambda: None, flag) is True
    assert clock_synchronised(lambda: (TIME_ERROR, STA_UNSYNC), flag) is True


def test_the_kernel_is_not_asked_once_timesyncd_says_synchronised(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    flag.touch()
    asked: list[bool] = []
    assert clock_synchronised(lambda: asked.append(True) or None, flag) is True
    assert asked == []  # so a kiosk on a synchronised clock never loads ctypes


def test_the_real_kernel_answers_or_is_refused_without_an_exception() -> None:
    state = kernel_clock_state()
    assert state is None or (isinstance(state[0], int) and isinstance(state[1], int))
    assert isinstance(clock_synchronised(), bool)
