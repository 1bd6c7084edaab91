"""Atheris harness: any body through `parse_answer` and `verify_answer` (MD5 and RSA2).
Only AnswerUnreadable may come out of parsing; verifying never raises; a forged answer from
the seed corpus must not verify. Seeds: `fuzz/corpus/gateway_answer/` (valid signed answers)."""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["kiosk", "drivers"]):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from kiosk.alipay.signing import Md5Signature, RsaSignature, SignType, presign_string
    from kiosk.alipay.xml import AnswerUnreadable, parse_answer, verify_answer

# The seed corpus is signed with this MD5 key; see make_corpus() below.
MD5_KEY = b"0123456789abcdef0123456789abcdef"
MD5 = Md5Signature(MD5_KEY)
_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA2 = RsaSignature(SignType.RSA2, private_key=_RSA_KEY, public_key=_RSA_KEY.public_key())


def test_one_input(data: bytes) -> None:
    try:
        answer = parse_answer(data)
    except AnswerUnreadable:
        return
    for signature in (MD5, RSA2):
        if verify_answer(answer, signature) and signature is MD5:
            # Only the exact signed text can verify: re-signing it must give the same sign.
            text = presign_string(answer.fields)
            signs = {MD5.sign(text, "utf-8")}
            with contextlib.suppress(UnicodeError, LookupError):
                signs.add(MD5.sign(text, answer.encoding))
            if answer.sign is None or answer.sign.strip().lower() not in signs:
                raise AssertionError("an answer verified without its own signature")


def make_corpus(folder: str) -> None:
    """Write a few validly signed answers (GBK and UTF-8) as seeds."""
    from pathlib import Path

    from kiosk.alipay.xml import render_answer

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    fields = {
        "result_code": "SUCCESS",
        "partner_trans_id": "VM0042-20240101120000-0001",
        "alipay_trans_id": "2024010121001004440000000001",
        "alipay_buyer_login_id": "张**",
        "currency": "USD",
        "trans_amount": "1.50",
    }
    for encoding in ("GBK", "UTF-8"):
        (out / f"success-{encoding}.xml").write_bytes(render_answer(fields, MD5, encoding=encoding))
    failed = {**fields, "result_code": "FAILED", "error": "EXPIRED_BARCODE"}
    (out / "failed-GBK.xml").write_bytes(render_answer(failed, MD5))
    (out / "rejected.xml").write_bytes(render_answer(None, None, error="ILLEGAL_SIGN"))


def main() -> None:
    if sys.argv[1:2] == ["--make-corpus"]:
        make_corpus(sys.argv[2] if len(sys.argv) > 2 else "fuzz/corpus/gateway_answer")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
