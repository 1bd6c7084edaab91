"""Attack 2: hostile config values that `kiosk check` passes and the MDB driver dies on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from drivers.mdb_board import MdbBoard
from drivers.vend_mdb import MdbVendOutput
from kiosk.config import check_config
from tests.test_config import GOOD, keys, site, write_config  # noqa: F401
from tests.test_mdb_sale import FAST

MDB_VEND = """
[vend]
driver = "mdb"
port = "{port}"
baud = {baud}
"""


@pytest.mark.parametrize("baud", [2**31, 99999999999999999999])
def test_a_baud_the_checker_accepts_does_not_kill_the_mdb_reader(
    site: Path,
    baud: int,
) -> None:
    with MdbBoard.on_pty() as board:
        board.start()
        text = GOOD.replace('mode = "fixed"\nprice = "1.50"\nitem = "coffee"', 'mode = "vmc"')
        text = text.split("[vend]")[0] + MDB_VEND.format(port=board.device, baud=baud)
        config, problems = check_config(write_config(site, text), check_key_modes=False)
        errors = [p for p in problems if not p.warning]
        if errors:
            return  # refused up front: that is fine
        assert config is not None and config.vend.baud == baud
        died: list[BaseException] = []
        hook = threading.excepthook
        threading.excepthook = lambda args: died.append(args.exc_value)  # type: ignore[assignment]
        try:
            mdb = MdbVendOutput(board.device, "USD", baud=config.vend.baud, timings=FAST)

            class Listener:
                def __getattr__(self, name: str):  # every callback: ignore
                    return lambda *a, **k: None

            mdb.start(Listener())  # type: ignore[arg-type]
            time.sleep(1.0)
            running = mdb.running()
            mdb.close()
        finally:
            threading.excepthook = hook
        # The checker said OK; the driver must then at least stay up (out of service with a
        # reason), not lose its reader thread to an uncaught exception.
        assert running and not died, died


def test_a_long_dotted_key_does_not_hang_the_checker(site: Path) -> None:
    """A 60 KB config with one 30000-part dotted key: tomllib is quadratic in the parts, and
    `kiosk check` (and `kiosk run`, and a SIGHUP reload on the event loop) stall for tens of
    seconds (100000 parts, 200 KB: over a minute)."""
    text = GOOD + "\n[x]\n" + ".".join(["k"] * 30000) + " = 1\n"
    path = write_config(site, text)
    config, problems = check_config(path, check_key_modes=False)
    assert config is None
    assert [p.message for p in problems] == [
        "a dotted key of 30000 parts; the kiosk's keys have at most 2"
    ]
    assert problems[0].line == text.count("\n")
