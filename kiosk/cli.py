"""The `kiosk` command line (SPEC section 2)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("kiosk: not built yet", file=sys.stderr)
    return 1
