"""Atheris harness: any text as the config file through `check_config`; it must return
problems shaped `FILE:LINE: message` and never raise."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from kiosk.config import check_config

_FOLDER = Path(tempfile.mkdtemp(prefix="kiosk-fuzz-config-"))
_PATH = _FOLDER / "kiosk.toml"
_SHAPE = re.compile(re.escape(str(_PATH)) + r":\d+: .+", re.DOTALL)


def test_one_input(data: bytes) -> None:
    _PATH.write_bytes(data)
    _, problems = check_config(_PATH)
    for problem in problems:
        if problem.line < 0 or not _SHAPE.fullmatch(str(problem)):
            raise AssertionError(f"badly shaped problem: {problem!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
