"""`python -m tests.powercut`: the power-cut run (see tests/powercut/rig.py)."""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

from tests.powercut.rig import run

PROJECT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.powercut",
        description="Power cuts in the booted SD card image, with the money checked afterwards.",
    )
    parser.add_argument(
        "--image",
        type=Path,
        default=PROJECT / "image-build/out/kiosk-test.img",
        help="the image to copy and boot (default: the image test's)",
    )
    parser.add_argument(
        "--out", type=Path, default=PROJECT / "image-build/out/powercut", help="work folder"
    )
    parser.add_argument("--cuts", type=int, default=20, help="power cuts (default 20)")
    parser.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get("KIOSK_POWERCUT_SEED", random.randrange(1 << 30))),
        help="replay a run (also KIOSK_POWERCUT_SEED)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="write this checkout's kiosk layer over the copy first (python -m "
        "tests.powercut.ext4 refresh), for an image built from older code",
    )
    args = parser.parse_args(argv)
    # SIGTERM ends the run like ^C: the guest is cut and the simulator stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.image.is_file():
        print(f"powercut: no image at {args.image} (make image-test builds one)", file=sys.stderr)
        return 2
    if args.cuts < 1:
        parser.error("--cuts must be 1 or more")
    return run(args.image.resolve(), args.out.resolve(), args.cuts, args.seed, args.refresh)


if __name__ == "__main__":
    raise SystemExit(main())
