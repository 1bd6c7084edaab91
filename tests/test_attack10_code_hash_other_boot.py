"""SPEC rule 6 (and the window of rule 7 it rests on): a code's keyed hash, with its key and the
code's last 4 digits, finds the whole code again, so the journal keeps it for rule 7's window
only. A hash journaled in an earlier boot is aged by the wall clock alone; but after a reboot
whose wall clock came back behind the stamp (a Pi has no RTC: after a power cut fake-hwclock
restores its last hourly save, and with the network down no NTP corrects it) the hash is kept
for as long as the wall clock is behind, although the new boot's own clock proves it older
than the window: a hash of another boot was journaled before this boot began, so it is at
least CLOCK_BOOTTIME seconds old, whatever the wall clock says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kiosk.journal import Journal
from kiosk.payment_code import CODE_REUSE_WINDOW_S
from tests.conftest import FakeBootClock, WallClock, open_sale

WINDOW = CODE_REUSE_WINDOW_S
FIRST, NEXT = "286301234567895001", "286301234567895002"


def _sell(journal: Journal, n: int, digits: str) -> None:
    open_sale(journal, f"VM-10-{n}", digits)


def _forget_by_worker(journal: Journal) -> None:
    journal.forget_codes()


def _forget_by_next_sale(journal: Journal) -> None:
    _sell(journal, 2, NEXT)


FORGETTERS = [
    pytest.param(_forget_by_worker, id="journal_worker"),
    pytest.param(_forget_by_next_sale, id="next_sale"),
]


def _after_a_power_cut(tmp_path: Path) -> tuple[Journal, FakeBootClock]:
    """FIRST sold just before a power cut; the Pi boots again with its wall clock an hour
    behind, and runs ten minutes by its boot clock (and its wall clock) without NTP."""
    wall, boot = WallClock(1_800_000_000.0), FakeBootClock(seconds=50_000.0)
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    journal.close()
    boot.reboot("e3" * 16, seconds=20.0)
    wall.now -= 3600.0
    boot.advance(600.0)
    wall.now += 600.0
    return Journal(tmp_path, wall_clock=wall, boot_clock=boot), boot


@pytest.mark.parametrize("forget", FORGETTERS)
def test_a_hash_of_another_boot_is_forgotten_once_this_boot_is_older_than_the_window(
    tmp_path: Path, forget: Callable[[Journal], None]
) -> None:
    journal, boot = _after_a_power_cut(tmp_path)
    forget(journal)
    kept = {seen.digest for seen in journal.recent_codes(since=float("-inf"))}
    assert journal.code_digest(FIRST) not in kept, (
        f"the hash of a code sold before this boot began, {boot.seconds:.0f} s ago at least by "
        f"the boot clock (rule 7's window: {WINDOW:.0f} s), is still in the journal because the "
        "wall clock came back an hour behind its stamp: with its key and last 4 digits it finds "
        "the whole code again, for as long as the wall clock stays behind (rule 6)"
    )
    journal.close()
