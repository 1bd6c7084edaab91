"""Benchmark: `drivers/keymap.py` ScanDecoder throughput, in payment codes per second, fed the
events a keyboard-wedge scanner sends for an 18-digit code and Enter (per key: EV_MSC scan
code, EV_KEY, EV_SYN, for the press and again for the release)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchlib import bench_main, count_option, unique_code
from evdev import ecodes as e

from drivers.keymap import KEY_DOWN, KEY_UP, ScanDecoder, keystrokes

Event = tuple[int, int, int]


def events_for(text: str, layout: str = "us") -> list[Event]:
    """The raw (type, code, value) events of typing `text` and Enter."""
    out: list[Event] = []

    def key(code: int, value: int) -> None:
        out.extend(
            [
                (e.EV_MSC, e.MSC_SCAN, 0x70000 + code),
                (e.EV_KEY, code, value),
                (e.EV_SYN, e.SYN_REPORT, 0),
            ]
        )

    for code, shifted in [*keystrokes(text, layout), (e.KEY_ENTER, False)]:
        if shifted:
            key(e.KEY_LEFTSHIFT, KEY_DOWN)
        key(code, KEY_DOWN)
        key(code, KEY_UP)
        if shifted:
            key(e.KEY_LEFTSHIFT, KEY_UP)
    return out


def run(codes: int, rounds: int) -> dict[str, Any]:
    texts = [unique_code(i) for i in range(1, 101)]  # 18 digits each
    streams = [events_for(text) for text in texts]
    per_code = len(streams[0])
    rates: list[float] = []
    for _ in range(rounds):
        decoder = ScanDecoder("us")
        now = 0.0
        decoded = 0
        started = time.perf_counter()
        for i in range(codes):
            for type_, code, value in streams[i % len(streams)]:
                now += 0.0005  # a scanner types about 2,000 events a second
                if decoder.feed(type_, code, value, now) is not None:
                    decoded += 1
        elapsed = time.perf_counter() - started
        if decoded != codes:
            raise RuntimeError(f"decoded {decoded} of {codes} codes")
        rates.append(codes / elapsed)
    best, median = max(rates), statistics.median(rates)
    print(
        f"ScanDecoder (layout us), 18-digit codes + Enter, {per_code} events per code, "
        f"{codes:,} codes x {rounds} rounds"
    )
    print(
        f"  median {median:,.0f} codes/s ({median * per_code / 1e6:.2f} M events/s, "
        f"{1e6 / median:.1f} µs per code); best round {best:,.0f} codes/s"
    )
    return {"codes_per_s": median, "best_codes_per_s": best, "events_per_code": per_code}


def options(parser: argparse.ArgumentParser) -> None:
    count_option(20_000, "codes per round")(parser)
    parser.add_argument("--rounds", type=int, default=3)


def main(argv: list[str] | None = None) -> int:
    return bench_main("decoder", __doc__, lambda args: run(args.n, args.rounds), argv, options)


if __name__ == "__main__":
    sys.exit(main())
