"""Atheris harness: any byte stream from the vending controller through `LineFramer` (in
fuzzer-chosen chunks) and `parse_vmc_line`; only VendProtocolError may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from kiosk import vmc_protocol as vmc
    from kiosk.errors import VendProtocolError


def frame(chunks: list[bytes]) -> list[bytes | None]:
    framer = vmc.LineFramer()
    return [line for chunk in chunks for line in framer.feed(chunk)]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    currency = fdp.PickValueInList(["USD", "JPY", "KWD"])
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    lines = frame(chunks)
    if lines != frame([b"".join(chunks)]):
        raise AssertionError("chunk boundaries changed the lines")
    for line in lines:
        if line is None:
            continue
        if len(line) > vmc.MAX_LINE + 1:
            raise AssertionError("a line over the cap was passed on")
        try:
            message = vmc.parse_vmc_line(line, currency)
        except VendProtocolError as exc:
            vmc.err(exc.reason)  # every reason must be sendable
            continue
        if isinstance(message, vmc.Success | vmc.Failure):
            vmc.ack(message.ref)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
