"""Atheris harness: any text through `PaymentCode.parse`; only PaymentCodeError may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from kiosk.errors import PaymentCodeError
    from kiosk.payment_code import PaymentCode


def test_one_input(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(64)
    try:
        code = PaymentCode.parse(text)
    except PaymentCodeError as exc:
        if len(text.strip()) > 4 and text.strip() in str(exc):
            raise AssertionError("a refusal repeats the whole scan") from None
        return
    if not (code.digits.isascii() and 16 <= len(code.digits) <= 24):
        raise AssertionError(f"accepted a code of {len(code.digits)} characters")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
