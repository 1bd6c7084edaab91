"""`kiosk simulator --listen HOST:PORT`: the gateway simulator as a long-running process for
rigs, technicians and the image's boot test. It knows the merchant from the kiosk's own
config (partner, key files) or from flags, and signs answers with its own key."""

from __future__ import annotations

import argparse
import signal
import threading
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.errors import ConfigError
from kiosk.log import event, setup_logging
from kiosk.simulator.gateway import GatewaySimulator, MerchantAccount, log


def _merchant_from_config(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        alipay = tomllib.loads(path.read_text(encoding="utf-8")).get("alipay", {})
    except OSError as exc:  # a --config that is not there is a mistake, not "no config"
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    found: dict[str, str] = {}
    for key in ("partner", "private_key_file", "md5_key_file"):
        if key in alipay:
            value = str(alipay[key])
            if key.endswith("_file") and not Path(value).is_absolute():
                value = str(path.parent / value)
            found[key] = value
    return found


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path.absolute()}: {exc.strerror or exc}") from None


def _rsa_kind(key: object) -> str:
    """What a key that is not RSA is, for the message."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519

    for kind, classes in (
        ("an EC key", (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)),
        ("an Ed25519 key", (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)),
        ("an Ed448 key", (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)),
        ("a DSA key", (dsa.DSAPrivateKey, dsa.DSAPublicKey)),
    ):
        if isinstance(key, classes):
            return kind
    return "not an RSA key"


def _merchant_public_key(flag: str, path: Path) -> rsa.RSAPublicKey:
    """The merchant's RSA key from a PEM file, public or private. Anything else (an EC key,
    garbage, a password-protected key) is the user's mistake, said in one line."""
    pem = _read(flag, path)
    where = f"{flag} {path.absolute()}"
    try:
        if b"PRIVATE KEY" in pem:
            private = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise ConfigError(f"{where}: {_rsa_kind(private)}; Alipay signs with RSA keys")
            return private.public_key()
        public = serialization.load_pem_public_key(pem)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: not a PEM RSA key") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise ConfigError(f"{where}: {_rsa_kind(public)}; Alipay signs with RSA keys")
    return public


def _alipay_private_key(path: Path) -> rsa.RSAPrivateKey:
    flag = "--alipay-private-key"
    where = f"{flag} {path.absolute()}"
    try:
        loaded = serialization.load_pem_private_key(_read(flag, path), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: not a PEM RSA private key") from None
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ConfigError(f"{where}: {_rsa_kind(loaded)}; Alipay signs with RSA keys")
    return loaded


def _write(flag: str, path: Path, data: bytes, mode: int | None = None) -> None:
    try:
        path.write_bytes(data)
        if mode is not None:
            path.chmod(mode)
    except OSError as exc:
        raise ConfigError(f"{flag} {path.absolute()}: {exc.strerror or exc}") from None


def build_simulator(args: argparse.Namespace) -> GatewaySimulator:
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen wants HOST:PORT, not {args.listen!r}")
    from_config = _merchant_from_config(Path(args.config).absolute() if args.config else None)
    partner = args.partner or from_config.get("partner")
    if not partner:
        raise ConfigError("the simulator needs a partner: --partner or --config")
    key_flag = "--merchant-key" if args.merchant_key else "private_key_file"
    merchant_key = args.merchant_key or from_config.get("private_key_file")
    md5_flag = "--md5-key" if args.md5_key else "md5_key_file"
    md5_file = args.md5_key or from_config.get("md5_key_file")
    account = MerchantAccount(
        partner,
        md5_key=_read(md5_flag, Path(md5_file)).strip() if md5_file else None,
        merchant_public_key=(
            _merchant_public_key(key_flag, Path(merchant_key)) if merchant_key else None
        ),
    )
    if args.alipay_private_key and Path(args.alipay_private_key).exists():
        alipay_key = _alipay_private_key(Path(args.alipay_private_key))
    else:
        alipay_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if args.alipay_private_key:  # keep it, so a restarted simulator signs the same way
            _write(
                "--alipay-private-key",
                Path(args.alipay_private_key),
                alipay_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
    if args.write_alipay_public_key:
        _write(
            "--write-alipay-public-key",
            Path(args.write_alipay_public_key),
            alipay_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    return GatewaySimulator([account], alipay_key, host=host.strip("[]"), port=int(port))


def run_simulator(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    sim = build_simulator(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    try:
        sim.start()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    event(log, "simulator.listening", url=sim.url, partner=next(iter(sim._accounts)))
    try:
        stop.wait()
    finally:
        sim.stop()
    return 0
