"""The daemon's own check of the merchant's key (no full check) against hand-built keys whose
one self-test signature comes out right: a key whose signatures are right only some of the
time, one anybody can sign for, one whose every signature costs seconds; and `kiosk check`
on a key the daemon refuses."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kiosk.alipay import signing
from kiosk.config import check_config
from kiosk.errors import KeyFileError
from kiosk.simulator import GatewaySimulator, MerchantAccount
from tests.conftest import MD5_KEY, PARTNER, named_key
from tests.daemon_rig import DaemonRig, service_python_env
from tests.test_attack13_keys import _site, pkcs1_pem
from tests.test_key_checks import PRIVATE_LINE

# Three primes: P of 1024 bits and Q, R of 512 bits with P - 1 and Q - 1 twice an odd number
# and R - 1 four times one. The key file names P and Q*R as its "primes" (Q*R is not one).
P = int(
    "E0022BEA255AF923F90BA9F168F0BDC7E12FD4382BA8852909C2B6D8314D0242CFDCF70DC14AAC802FE43FF504"
    "1894739EC626557968A19AC1B1943318C353DAAEBD8069CC0CFEFFD61A604E5658F4D38E31135630B9084EE82D"
    "EA7B8A81236EAF1ED362103F1A3EFCE5C2A308125A10B84C8D39B64F0315D3E6B39F66B03193",
    16,
)
Q = int(
    "E0E888172BCFE83E82F72FAA42D391AB8CA2F3D9AA865FC5AE19075723D61B066BB2138C052A876B6F1BDE231E"
    "D0E00C4303B88048E0B28A511B79EE893F572B",
    16,
)
R = int(
    "CF7A0B59875F90DC78F29DF166A372C2072E32B223F78A911388E89AA6E23EFB12B51DC9C41A4397367A5F5D1D"
    "E6A1ED7E160FDF32890F6D9B0C4AB09D9D7E05",
    16,
)


def composite_prime_numbers() -> tuple[int, int, int, int, int, int, int, int]:
    """n, e, d, p, q, dp, dq, qinv of a 2048-bit key whose second "prime" is Q*R and whose d
    inverts e only modulo lcm(P-1, Q-1, (R-1)/2): m^(e*d) is m for about half of all m (those
    whose order mod R divides (R-1)/2), so about half of its signatures are wrong."""
    e = 65537
    d = pow(e, -1, math.lcm(P - 1, Q - 1, (R - 1) // 2))
    qr = Q * R
    return P * qr, e, d, P, qr, d % (P - 1), d % (qr - 1), pow(qr, -1, P)


def composite_prime_pem() -> bytes:
    return pkcs1_pem(*composite_prime_numbers())


def composite_prime_public() -> rsa.RSAPublicKey:
    n, e, *_ = composite_prime_numbers()
    return rsa.RSAPublicNumbers(e, n).public_key()


# Tries of a load that a check by one signature passed half the time (all refused by chance
# 1 in 2**n): the load must refuse it every time.
ATTEMPTS = 16
DAEMON_ATTEMPTS = 2


@pytest.fixture(autouse=True)
def _no_cached_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "_last_private_key", None)


@pytest.fixture(scope="module")
def good() -> rsa.RSAPrivateNumbers:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()


def _signs_right(key: rsa.RSAPrivateKey, text: bytes) -> bool:
    raw = key.sign(text, padding.PKCS1v15(), hashes.SHA256())
    try:
        key.public_key().verify(raw, text, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def test_the_daemon_never_takes_a_key_whose_signatures_are_wrong_half_the_time() -> None:
    """What Alipay checks is each sale's signature against the public key the merchant
    uploaded: a key the daemon takes must sign every sale's text right, not only its own
    self-test's. `kiosk check` refuses this key (its "prime" is not one). OpenSSL blinds each
    signature with a random r, and r^(e*d) is r only half the time modulo R: whether one
    signature, the self-test's included, comes out right is a coin toss, so the load is tried
    until it is taken (each refusal is not cached)."""
    for _ in range(ATTEMPTS):
        signing._last_private_key = None
        try:
            key = signing.load_private_key(composite_prime_pem(), "private_key_file")
        except KeyFileError:
            continue
        wrong = [i for i in range(64) if not _signs_right(key, b"out_trade_no=VM-RIG-%d" % i)]
        assert wrong == [], f"{len(wrong)} of 64 sale texts signed wrong by a key kiosk run took"


def test_check_refuses_the_key_whose_signatures_are_wrong_half_the_time(tmp_path: Path) -> None:
    site = _site(tmp_path, composite_prime_pem())
    _, problems = check_config(site / "kiosk.toml")
    assert [p.line for p in problems if not p.warning] == [PRIVATE_LINE]


def test_kiosk_run_with_a_key_whose_signatures_are_wrong_half_the_time_is_out_of_service(
    tmp_path: Path,
) -> None:
    """The real daemon, run as the service runs it, against a simulator holding this key's
    public half (as Alipay would after the merchant uploaded it): it must not go into service
    to have about every second sale refused for its signature."""
    sim = GatewaySimulator(
        [MerchantAccount(PARTNER, md5_key=MD5_KEY, merchant_public_key=composite_prime_public())],
        alipay_private_key=named_key("alipay"),
    )
    sim.start()
    rig = DaemonRig(tmp_path, sim)
    try:
        key = tmp_path / "keys" / "merchant_private_key.pem"
        key.write_bytes(composite_prime_pem())
        key.chmod(0o600)
        for _ in range(DAEMON_ATTEMPTS):  # see ATTEMPTS
            rig.start(wait_ready=False, extra_env=service_python_env())
            first = rig.wait_log(
                lambda e: e.get("event") in ("kiosk.ready", "config.invalid"),
                30,
                "ready or invalid",
            )
            assert first.get("event") == "config.invalid", rig.raw_log[-10:]
            assert str(key) in str(first.get("problem", "")), first
            assert not any("Traceback" in line for line in rig.raw_log)
            rig.wait_log(lambda e: e.get("event") == "kiosk.out_of_service", 30, "out of service")
            rig.signal(signal.SIGTERM)
            assert rig.wait_exit() == 0
    finally:
        rig.close()
        sim.stop()


def square_modulus_pem() -> bytes:
    """n = p*p with p a real 1024-bit prime, every number consistent: it signs right, and
    anybody with the public key factors n with an integer square root and signs as the
    merchant (as with a public exponent of 1, which the daemon refuses)."""
    p = P
    n = p * p
    e = 65537
    d = pow(e, -1, p * (p - 1))
    return pkcs1_pem(n, e, d, p, p, d % (p - 1), d % (p - 1), 0)


def test_the_daemon_refuses_a_key_whose_modulus_is_a_square() -> None:
    n = P * P
    assert math.isqrt(n) == P  # what anybody holding the public key can do
    with pytest.raises(KeyFileError):
        signing.load_private_key(square_modulus_pem(), "private_key_file")


def huge_private_exponent_pem(n: rsa.RSAPrivateNumbers, extra_bits: int) -> bytes:
    """A right key with d raised by a multiple of lambda(n) of `extra_bits` bits (still a right
    d) and one CRT number damaged, so every signature falls back to m^d mod n. Measured on the
    build machine: with 2,000,000 extra bits (a 332 KB file) the daemon takes it and every
    signature, each sale's included, takes 2.7 s (several times that on a Pi); `kiosk check`
    refuses it."""
    pub = n.public_numbers
    big_d = n.d + math.lcm(n.p - 1, n.q - 1) * (1 << extra_bits)
    return pkcs1_pem(pub.n, pub.e, big_d, n.p, n.q, n.dmp1 ^ 2, n.dmq1, n.iqmp)


def test_the_daemon_refuses_a_private_exponent_far_longer_than_its_modulus(
    good: rsa.RSAPrivateNumbers,
) -> None:
    pem = huge_private_exponent_pem(good, 200_000)
    with pytest.raises(KeyFileError):
        signing.load_private_key(pem, "private_key_file")


def exponent_beyond_modulus_pem(n: rsa.RSAPrivateNumbers) -> bytes:
    """A right key (the full check takes it) whose public exponent is raised by a multiple of
    lambda(n) past n itself: d still inverts it."""
    pub = n.public_numbers
    lam = math.lcm(n.p - 1, n.q - 1)
    e = pub.e + lam * ((1 << 3000) // lam + 1)
    d = pow(e, -1, lam)
    return pkcs1_pem(pub.n, e, d, n.p, n.q, d % (n.p - 1), d % (n.q - 1), n.iqmp)


def test_a_reload_to_a_key_whose_signatures_are_wrong_half_the_time_keeps_the_old_config(
    tmp_path: Path, simulator: GatewaySimulator
) -> None:
    """SIGHUP after the key file was replaced by this key: the running config (its right key)
    is kept, as for any key the daemon refuses, never swapped in."""
    rig = DaemonRig(tmp_path, simulator)
    try:
        rig.start(extra_env=service_python_env())
        key = tmp_path / "keys" / "merchant_private_key.pem"
        key.write_bytes(composite_prime_pem())
        key.chmod(0o600)
        for _ in range(ATTEMPTS):  # see ATTEMPTS
            start = len(rig.logs)
            rig.signal(signal.SIGHUP)
            index = rig.wait_log_after(
                start,
                lambda e: e.get("event") in ("config.kept", "config.reloaded"),
                30,
                "config.kept or config.reloaded",
            )
            assert rig.logs[index].get("event") == "config.kept", rig.raw_log[-10:]
        assert not any("Traceback" in line for line in rig.raw_log)
        rig.signal(signal.SIGTERM)
        assert rig.wait_exit() == 0
    finally:
        rig.close()
