"""MAPI signatures: the published MD5 vectors, RSA/RSA2 against an independent verifier, key
loading, and key files that must stay private."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kiosk.alipay.signing import (
    Md5Signature,
    RsaSignature,
    SignType,
    load_private_key,
    load_public_key,
    presign_string,
    read_secret_file,
)
from kiosk.errors import KeyFileError
from tests.alipay_fixtures import rsa_key

VECTOR_KEY = b"10000000000000000000000000000000"
TEXT = "_input_charset=UTF-8&partner=2088101122334455&service=alipay.acquire.overseas.query"


def pem_lines(pem: bytes) -> list[str]:
    """The base64 body lines of a PEM: what must never show up in a message."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def private_pem(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def public_pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- pre-sign string and MD5 --------------------------------------------------------------------


def test_presign_string_sorts_skips_empty_and_leaves_out_sign() -> None:
    params = {"b": "2", "a": "1", "sign": "x", "sign_type": "MD5", "empty": "", "_c": "3"}
    assert presign_string(params) == "_c=3&a=1&b=2"


def test_presign_string_keeps_values_raw() -> None:
    assert presign_string({"trans_name": "Café & tea=1"}) == "trans_name=Café & tea=1"


def test_md5_query_vector() -> None:
    text = (
        "_input_charset=utf-8&partner=1000000000000000&partner_trans_id=2010121000000002"
        "&service=alipay.acquire.overseas.query"
    )
    assert Md5Signature(VECTOR_KEY).sign(text) == "2a7f598bbb13d02f7de819ae689f80ba"


def test_md5_refund_vector() -> None:
    text = (
        "_input_charset=utf-8&currency=USD&is_sync=Y&partner=1000000000000000"
        "&partner_refund_id=301012133000002&partner_trans_id=2010121000000002"
        "&refund_amount=0.01&service=alipay.acquire.overseas.spot.refund"
    )
    assert Md5Signature(VECTOR_KEY).sign(text) == "397685a0c6b2d71d0d1f374ddba331a0"


def test_md5_verify_rejects_a_changed_text() -> None:
    md5 = Md5Signature(VECTOR_KEY)
    assert md5.verify(TEXT, md5.sign(TEXT))
    assert not md5.verify(TEXT + "&x=1", md5.sign(TEXT))


# -- RSA and RSA2 against cryptography directly -------------------------------------------------

HASH_OF = {SignType.RSA: hashes.SHA1, SignType.RSA2: hashes.SHA256}
OTHER_HASH = {SignType.RSA: hashes.SHA256, SignType.RSA2: hashes.SHA1}


@pytest.mark.parametrize("sign_type", [SignType.RSA, SignType.RSA2])
def test_rsa_signature_uses_the_documented_hash(sign_type: SignType) -> None:
    key = rsa_key("merchant")
    raw = base64.b64decode(RsaSignature(sign_type, private_key=key).sign(TEXT))
    key.public_key().verify(raw, TEXT.encode(), padding.PKCS1v15(), HASH_OF[sign_type]())


@pytest.mark.parametrize("sign_type", [SignType.RSA, SignType.RSA2])
def test_rsa_signature_does_not_use_the_other_hash(sign_type: SignType) -> None:
    key = rsa_key("merchant")
    raw = base64.b64decode(RsaSignature(sign_type, private_key=key).sign(TEXT))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(raw, TEXT.encode(), padding.PKCS1v15(), OTHER_HASH[sign_type]())


@pytest.mark.parametrize("sign_type", [SignType.RSA, SignType.RSA2])
def test_rsa_verify_accepts_an_independent_signature(sign_type: SignType) -> None:
    key = rsa_key("alipay")
    raw = key.sign(TEXT.encode(), padding.PKCS1v15(), HASH_OF[sign_type]())
    verifier = RsaSignature(sign_type, public_key=key.public_key())
    assert verifier.verify(TEXT, base64.b64encode(raw).decode())
    assert not verifier.verify(TEXT + "&x=1", base64.b64encode(raw).decode())


def test_rsa_verify_refuses_a_signature_that_is_not_base64() -> None:
    verifier = RsaSignature(SignType.RSA2, public_key=rsa_key("alipay").public_key())
    assert not verifier.verify(TEXT, "not base64 at all!")


def test_rsa_verify_respects_the_encoding() -> None:
    key = rsa_key("alipay")
    text = "trans_name=自动售货机"
    raw = key.sign(text.encode("gbk"), padding.PKCS1v15(), hashes.SHA256())
    verifier = RsaSignature(SignType.RSA2, public_key=key.public_key())
    sign = base64.b64encode(raw).decode()
    assert verifier.verify(text, sign, "gbk")
    assert not verifier.verify(text, sign, "utf-8")


# -- key loading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "header"),
    [
        (serialization.PrivateFormat.TraditionalOpenSSL, b"-----BEGIN RSA PRIVATE KEY-----"),
        (serialization.PrivateFormat.PKCS8, b"-----BEGIN PRIVATE KEY-----"),
    ],
    ids=["pkcs1", "pkcs8"],
)
def test_private_key_loads_from_pkcs1_and_pkcs8(
    form: serialization.PrivateFormat, header: bytes
) -> None:
    key = rsa_key("merchant")
    pem = private_pem(key, form)
    assert pem.startswith(header)
    loaded = load_private_key(pem)
    assert loaded.private_numbers() == key.private_numbers()


def test_public_key_loads_from_pem() -> None:
    key = rsa_key("alipay").public_key()
    assert load_public_key(public_pem(key)).public_numbers() == key.public_numbers()


def test_public_key_loads_from_bare_base64() -> None:
    key = rsa_key("alipay").public_key()
    bare = "".join(pem_lines(public_pem(key))).encode()
    assert load_public_key(bare).public_numbers() == key.public_numbers()


def test_broken_private_key_error_quotes_no_key_material() -> None:
    pem = private_pem(rsa_key("merchant"), serialization.PrivateFormat.PKCS8)
    lines = pem.splitlines()
    broken = b"\n".join([*lines[:5], b"!!!!" + lines[5][4:], *lines[6:]])
    with pytest.raises(KeyFileError) as raised:
        load_private_key(broken, "private_key_file")
    texts = [str(raised.value), repr(raised.value)]
    if raised.value.__cause__ is not None:
        texts += [str(raised.value.__cause__), repr(raised.value.__cause__)]
    for text in texts:
        for line in pem_lines(pem):
            assert line[:16] not in text


def test_broken_public_key_error_quotes_no_key_material() -> None:
    bare = "".join(pem_lines(public_pem(rsa_key("alipay").public_key())))
    broken = ("#" + bare[1:]).encode()
    with pytest.raises(KeyFileError) as raised:
        load_public_key(broken)
    assert bare[1:17] not in str(raised.value)
    assert raised.value.__cause__ is None


def test_signers_do_not_show_their_keys() -> None:
    assert "1000" not in repr(Md5Signature(VECTOR_KEY))
    rsa_repr = repr(RsaSignature(SignType.RSA2, private_key=rsa_key("merchant")))
    assert "hidden" in rsa_repr
    assert str(rsa_key("merchant").private_numbers().p)[:12] not in rsa_repr


# -- key files ----------------------------------------------------------------------------------


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "md5.key"
    path.write_bytes(VECTOR_KEY)
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as raised:
        read_secret_file(path, "md5_key_file")
    assert "chmod 600" in str(raised.value)
    assert VECTOR_KEY.decode() not in str(raised.value)


def test_secret_file_readable_by_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "md5.key"
    path.write_bytes(VECTOR_KEY)
    path.chmod(0o640)
    with pytest.raises(KeyFileError):
        read_secret_file(path, "md5_key_file")


def test_secret_file_with_mode_600_is_read(tmp_path: Path) -> None:
    path = tmp_path / "md5.key"
    path.write_bytes(VECTOR_KEY)
    path.chmod(0o600)
    assert read_secret_file(path, "md5_key_file") == VECTOR_KEY


def test_missing_secret_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        read_secret_file(tmp_path / "absent.pem", "private_key_file")


def test_a_private_key_file_loaded_again_is_checked_once_and_a_changed_one_is_the_new_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kiosk run` loads the same key file three times as it starts; cryptography's check of
    the key (both primes tested) runs once. A file with other bytes (a reload after a new key
    was made) is loaded and checked, never answered from the last key."""
    from kiosk.alipay import signing

    first, second = rsa_key("merchant"), rsa_key("other merchant")
    first_pem = private_pem(first, serialization.PrivateFormat.PKCS8)
    second_pem = private_pem(second, serialization.PrivateFormat.TraditionalOpenSSL)
    checked: list[bytes] = []
    load = signing.serialization.load_pem_private_key

    def counting(data: bytes, password: bytes | None, **options: bool) -> object:
        checked.append(data)
        return load(data, password, **options)

    monkeypatch.setattr(signing.serialization, "load_pem_private_key", counting)
    monkeypatch.setattr(signing, "_last_private_key", None)
    numbers = [
        load_private_key(pem).private_numbers()
        for pem in (first_pem, first_pem, first_pem, second_pem, second_pem, first_pem)
    ]
    assert numbers == [first.private_numbers()] * 3 + [second.private_numbers()] * 2 + [
        first.private_numbers()
    ]
    assert checked == [first_pem, second_pem, first_pem]


def numbers_changed(key: rsa.RSAPrivateKey, *, private_exponent_too: bool) -> bytes:
    """The key's PEM with its first CRT exponent changed (and its private exponent with it):
    the structure of a good key, numbers that do not belong together."""
    n = key.private_numbers()
    d = n.d ^ 2 if private_exponent_too else n.d
    changed = rsa.RSAPrivateNumbers(n.p, n.q, d, n.dmp1 ^ 2, n.dmq1, n.iqmp, n.public_numbers)
    return private_pem(
        changed.private_key(unsafe_skip_rsa_key_validation=True),
        serialization.PrivateFormat.PKCS8,
    )


@pytest.mark.parametrize("private_exponent_too", [False, True], ids=["signs right", "signs wrong"])
def test_a_key_whose_numbers_do_not_belong_together_is_named_so_without_a_word_of_them(
    monkeypatch: pytest.MonkeyPatch, private_exponent_too: bool
) -> None:
    """Wrong CRT numbers alone still sign right (OpenSSL checks each CRT result); with the
    private exponent wrong too, the key signs wrong. The full check refuses both."""
    from kiosk.alipay import signing

    monkeypatch.setattr(signing, "_last_private_key", None)
    pem = numbers_changed(rsa_key("merchant"), private_exponent_too=private_exponent_too)
    with pytest.raises(KeyFileError) as raised:
        load_private_key(pem, "private_key_file")
    said = str(raised.value)
    assert said.startswith("private_key_file is an RSA key whose numbers do not belong together")
    assert raised.value.__cause__ is None
    for line in pem_lines(pem):
        assert line[:16] not in said
