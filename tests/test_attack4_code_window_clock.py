"""SPEC rule 7 across a restart, whatever the wall clock did meanwhile (an NTP step, an
operator's `date -s`): a code sold a minute ago must still be refused locally (`CODE_REUSED`)
by the restarted kiosk, and its hash must still leave the journal once its window is over
(rule 6). The journal stamps each code's hash with the wall clock and with the boot clock
(the kernel's boot id and CLOCK_BOOTTIME, which no wall-clock step moves): a hash of this boot
ages by the boot clock; one of another boot, or of an older firmware, by the wall clock, a
stamp ahead of now counting as seen now."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kiosk.alipay.client import AlipayClient
from kiosk.boot_clock import BootClock
from kiosk.journal import Journal
from kiosk.payment_code import CODE_REUSE_WINDOW_S, PaymentCode, RecentCodes
from kiosk.simulator import GatewaySimulator
from tests.conftest import FakeBootClock, WallClock, open_sale, payment_code
from tests.loop_rig import Rig, rig_factory

WINDOW = CODE_REUSE_WINDOW_S
FIRST, NEXT = "286301234567895001", "286301234567895002"


@pytest.fixture
def make_rig(
    tmp_path: Path, simulator: GatewaySimulator, make_client: Callable[..., AlipayClient]
) -> Iterator[Callable[..., Rig]]:
    with rig_factory(tmp_path, simulator.url, make_client) as make:
        yield make


# -- the kiosk restarted after a step of the wall clock --------------------------------------


def _scan_again(rig: Rig, code: str) -> int | None:
    """Scan `code` on a restarted kiosk: the index of its CODE_REUSED refusal, or None if it
    went to the gateway instead."""
    mark = rig.log.size
    rig.scanner.scan(code)
    assert rig.log.wait_until(
        lambda: (
            rig.log.index("scan.refused", after=mark - 1) is not None
            or rig.log.index("payment.result", after=mark - 1) is not None
        ),
        15,
    )
    return rig.log.index("scan.refused", after=mark - 1, reason="CODE_REUSED")


@pytest.mark.parametrize("back_s", [600.0, -600.0], ids=["set_back", "set_ahead"])
def test_a_restart_after_the_clock_was_set_back_still_refuses_a_code_just_sold(
    make_rig: Callable[..., Rig], tmp_path: Path, back_s: float
) -> None:
    state = tmp_path / "state"
    code = payment_code("0001", 81)
    first = make_rig()
    first.scanner.scan(code)
    first.log.wait_for("payment.result", 15)
    first.stop()
    first.kiosk.journal.close()
    # Seconds later the wall clock is stepped back ten minutes, and the kiosk restarts.
    back = datetime.now(UTC) - timedelta(seconds=back_s)
    journal = Journal(state, wall_clock=lambda: time.time() - back_s)
    second = make_rig(wall=back, journal=journal)
    assert _scan_again(second, code) is not None, (
        f"a code sold seconds ago was scanned again after the clock went back {back_s:.0f} s "
        f"(negative: ahead) and a restart, and it was not refused locally "
        f"(rule 7: {WINDOW:.0f} s)"
    )


def test_a_wall_clock_stepped_ahead_past_the_window_before_a_restart_sends_no_second_pay(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    state = tmp_path / "state"
    boot = FakeBootClock()
    code = payment_code("0001", 82)
    first = make_rig(journal=Journal(state, boot_clock=boot))
    first.scanner.scan(code)
    first.log.wait_for("payment.result", 15)
    first.stop()
    first.kiosk.journal.close()
    # Twenty seconds later by the boot clock, the wall clock is stepped ten minutes ahead (an
    # NTP step on a Pi that started with a stale clock) and the kiosk restarts on this boot.
    boot.advance(20)
    ahead = WINDOW + 420
    journal = Journal(state, wall_clock=lambda: time.time() + ahead, boot_clock=boot)
    second = make_rig(wall=datetime.now(UTC) + timedelta(seconds=ahead), journal=journal)
    refused = _scan_again(second, code)
    pays = [r for r in simulator.requests_seen if r.service == "pay"]
    assert refused is not None and len(pays) == 1, (
        f"{len(pays)} pay requests carried a code sold 20 s before (by the boot clock) once the "
        f"wall clock was stepped {ahead:.0f} s ahead and the kiosk restarted; rule 7 wants the "
        "second scan refused locally without a request"
    )


def test_after_a_reboot_a_code_of_the_window_by_the_wall_clock_is_still_refused(
    make_rig: Callable[..., Rig], tmp_path: Path, simulator: GatewaySimulator
) -> None:
    state = tmp_path / "state"
    boot = FakeBootClock(seconds=50_000.0)
    code = payment_code("0001", 83)
    first = make_rig(journal=Journal(state, boot_clock=boot))
    first.scanner.scan(code)
    first.log.wait_for("payment.result", 15)
    first.stop()
    first.kiosk.journal.close()
    boot.reboot("c1" * 16)  # a new boot: its clock starts again, the old stamp tells nothing
    second = make_rig(journal=Journal(state, boot_clock=boot))
    assert _scan_again(second, code) is not None
    assert len([r for r in simulator.requests_seen if r.service == "pay"]) == 1


def test_without_a_boot_clock_the_kiosk_says_so_once_and_ages_codes_by_the_wall_clock(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    code = payment_code("0001", 84)

    def none() -> None:
        return None

    first = make_rig(journal=Journal(state, boot_clock=none))
    first.scanner.scan(code)
    first.log.wait_for("payment.result", 15)
    first.stop()
    first.kiosk.journal.close()
    assert _boot_stamps(state) == [(None, None)]  # stamped by the wall clock alone
    mark = first.log.size
    second = make_rig(journal=Journal(state, boot_clock=none))
    assert _scan_again(second, code) is not None  # seconds ago by the wall clock
    said = [e for e in second.log.events[mark:] if e.get("event") == "kiosk.no_boot_clock"]
    assert len(said) == 1 and said[0]["reason"], said


def _boot_stamps(state: Path) -> list[tuple[object, object]]:
    conn = sqlite3.connect(state / "journal.sqlite3")
    try:
        return conn.execute("SELECT boot_id, boot_s FROM recent_codes").fetchall()
    finally:
        conn.close()


# -- the journal: what it keeps, and for how long ---------------------------------------------


# Where the journal's wall clock (epoch seconds, stepped by the tests below) starts.
START = 1_800_000_000.0


def _sell(journal: Journal, n: int, digits: str) -> None:
    open_sale(journal, f"VM-7-{n}", digits)


def _kept(journal: Journal) -> set[bytes]:
    return {seen.digest for seen in journal.recent_codes(since=float("-inf"))}


def _forget_by_worker(journal: Journal) -> None:
    journal.forget_codes()


def _forget_by_next_sale(journal: Journal) -> None:
    _sell(journal, 2, NEXT)


FORGETTERS = [
    pytest.param(_forget_by_worker, id="journal_worker"),
    pytest.param(_forget_by_next_sale, id="next_sale"),
]


@pytest.mark.parametrize("forget", FORGETTERS)
def test_a_hash_of_this_boot_is_kept_while_the_boot_clock_is_in_the_window(
    tmp_path: Path, forget: Callable[[Journal], None]
) -> None:
    wall, boot = WallClock(START), FakeBootClock()
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    boot.advance(WINDOW - 30)
    wall.now += WINDOW + 600  # the wall clock stepped ahead: the stamp looks old by it
    forget(journal)
    assert journal.code_digest(FIRST) in _kept(journal), (
        f"the hash of a code sold {WINDOW - 30:.0f} s ago by the boot clock was forgotten "
        "because the wall clock was stepped ahead: a restart would then let the code be "
        "charged again (rule 7)"
    )
    journal.close()


@pytest.mark.parametrize("forget", FORGETTERS)
def test_a_hash_of_this_boot_is_forgotten_once_the_boot_clock_passes_the_window(
    tmp_path: Path, forget: Callable[[Journal], None]
) -> None:
    wall, boot = WallClock(START), FakeBootClock()
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    boot.advance(WINDOW + 1)
    wall.now -= 600  # the wall clock was set back: the stamp looks ahead of now by it
    forget(journal)
    assert journal.code_digest(FIRST) not in _kept(journal), (
        f"the hash of a code sold {WINDOW + 1:.0f} s ago by the boot clock is still kept "
        "because the wall clock was set back: with its key and last 4 digits it finds the "
        "whole code again (rule 6)"
    )
    journal.close()


def test_the_journal_worker_only_looks_while_no_hash_of_this_boot_is_past_the_window(
    tmp_path: Path,
) -> None:
    wall, boot = WallClock(START), FakeBootClock()
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    wall.now += WINDOW + 600
    journal._conn.execute("PRAGMA query_only=ON")  # a write now fails
    assert journal.forget_codes() == 0
    journal._conn.execute("PRAGMA query_only=OFF")
    boot.advance(WINDOW + 1)
    assert journal.forget_codes() == 1
    journal.close()


def _refused_after_a_start(journal: Journal, wall: WallClock, boot: BootClock) -> list[str]:
    """Which of FIRST and NEXT a kiosk started now would refuse (as `Kiosk` seeds them)."""
    now = boot()
    codes = RecentCodes(key=journal.code_key)
    codes.seed(
        journal.recent_codes(wall() - WINDOW, None if now is None else now.boot_id), wall(), now
    )
    return [d for d in (FIRST, NEXT) if codes.seen_recently(PaymentCode.parse(d))]


@pytest.mark.parametrize("now_boot", ["another_boot", "no_boot_clock"])
def test_a_hash_of_another_boot_ages_by_the_wall_clock(tmp_path: Path, now_boot: str) -> None:
    wall, boot = WallClock(START), FakeBootClock(seconds=90_000.0)
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    wall.now += 100
    _sell(journal, 2, NEXT)
    journal.close()
    # A reboot 30 s ago; the wall clock says FIRST was sold WINDOW + 1 s ago and NEXT
    # WINDOW - 99 s ago. Another boot made both stamps, and this one is younger than the
    # window: its clock only says they are at least 30 s old, the wall clock tells the rest.
    boot.reboot("d2" * 16, seconds=30.0)
    wall.now += WINDOW - 99

    def none() -> None:
        return None

    clock: BootClock = boot if now_boot == "another_boot" else none
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=clock)
    assert _refused_after_a_start(journal, wall, clock) == [NEXT]
    assert journal.forget_codes() == 1
    assert _kept(journal) == {journal.code_digest(NEXT)}
    journal.close()


def test_a_boot_stamp_ahead_of_this_boots_clock_is_not_of_this_boot(tmp_path: Path) -> None:
    # The same boot id with a boot clock behind the stamp cannot be the boot that made it (a
    # boot id passed by hand and left set): the wall clock decides, so nothing is held for
    # as long as the old boot had run.
    wall, boot = WallClock(START), FakeBootClock(seconds=90_000.0)
    journal = Journal(tmp_path, wall_clock=wall, boot_clock=boot)
    _sell(journal, 1, FIRST)
    boot.seconds = 20.0
    wall.now += WINDOW + 1
    assert _refused_after_a_start(journal, wall, boot) == []
    assert journal.forget_codes() == 1
    journal.close()


# A hash journaled in an earlier boot after a reboot whose wall clock came back behind its
# stamp (a Pi has no RTC: fake-hwclock restores its last hourly save after a power cut, and
# with the network down no NTP corrects it): it was journaled before this boot began, so it is
# at least CLOCK_BOOTTIME seconds old whatever the wall clock says, and leaves (rule 6).


def _after_a_power_cut(tmp_path: Path) -> tuple[Journal, FakeBootClock]:
    """FIRST sold just before a power cut; the Pi boots again with its wall clock an hour
    behind, and runs ten minutes by its boot clock (and its wall clock) without NTP."""
    wall, boot = WallClock(START), FakeBootClock(seconds=50_000.0)
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
    assert journal.code_digest(FIRST) not in _kept(journal), (
        f"the hash of a code sold before this boot began, {boot.seconds:.0f} s ago at least by "
        f"the boot clock (rule 7's window: {WINDOW:.0f} s), is still in the journal because the "
        "wall clock came back an hour behind its stamp: with its key and last 4 digits it finds "
        "the whole code again, for as long as the wall clock stays behind (rule 6)"
    )
    journal.close()
