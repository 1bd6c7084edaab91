"""Atheris harness: any key event stream through `ScanDecoder`, any line through
`PaymentCode.parse`. Crashes on an undocumented exception or a line past the cap."""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from drivers.keymap import LAYOUTS, ScanDecoder
    from kiosk.errors import PaymentCodeError
    from kiosk.payment_code import PaymentCode

_LAYOUTS = sorted(LAYOUTS)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_len = fdp.ConsumeIntInRange(1, 80)
    decoder = ScanDecoder(layout=fdp.PickValueInList(_LAYOUTS), max_len=max_len)
    now = 1000.0
    while fdp.remaining_bytes() >= 4:
        type_ = fdp.PickValueInList([1, 1, 1, 0, 4, fdp.ConsumeInt(2)])  # mostly EV_KEY
        code = fdp.ConsumeIntInRange(0, 0x2FF)
        value = fdp.PickValueInList([0, 1, 1, 2])
        now += fdp.ConsumeProbability()
        line = decoder.feed(type_, code, value, now)
        if line is not None:
            if not line or len(line) > max_len:
                raise AssertionError(f"decoder returned {len(line)} characters, cap {max_len}")
            with contextlib.suppress(PaymentCodeError):
                PaymentCode.parse(line)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
