"""Atheris harness: any byte stream, cut at fuzzer-chosen places, through the scanner's
`LineSplitter`; chunking must not change the lines and no line may pass the cap."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from drivers.scanner_serial import LineSplitter


def split(chunks: list[bytes], max_len: int) -> list[str]:
    splitter = LineSplitter(max_len=max_len)
    return [line for chunk in chunks for line in splitter.feed(chunk)]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_len = fdp.ConsumeIntInRange(1, 80)
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)))
    lines = split(chunks, max_len)
    if lines != split([b"".join(chunks)], max_len):
        raise AssertionError("chunk boundaries changed the lines")
    if any(len(line) > max_len or "\n" in line or "\r" in line for line in lines):
        raise AssertionError("a line over the cap, or holding a line end, was passed on")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
