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
    if path is None or not path.exists():
        return {}
    try:
        alipay = tomllib.loads(path.read_text(encoding="utf-8")).get("alipay", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    found: dict[str, str] = {}
    for key in ("partner", "private_key_file", "md5_key_file"):
        if key in alipay:
            value = str(alipay[key])
            if key.endswith("_file") and not Path(value).is_absolute():
                value = str(path.parent / value)
            found[key] = value
    return found


def _merchant_public_key(path: Path) -> rsa.RSAPublicKey:
    pem = path.read_bytes()
    if b"PRIVATE KEY" in pem:
        private = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        return private.public_key()
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, rsa.RSAPublicKey)
    return public


def build_simulator(args: argparse.Namespace) -> GatewaySimulator:
    from_config = _merchant_from_config(Path(args.config) if args.config else None)
    partner = args.partner or from_config.get("partner")
    if not partner:
        raise ConfigError("the simulator needs a partner: --partner or --config")
    merchant_key = args.merchant_key or from_config.get("private_key_file")
    md5_file = args.md5_key or from_config.get("md5_key_file")
    account = MerchantAccount(
        partner,
        md5_key=Path(md5_file).read_bytes().strip() if md5_file else None,
        merchant_public_key=_merchant_public_key(Path(merchant_key)) if merchant_key else None,
    )
    if args.alipay_private_key and Path(args.alipay_private_key).exists():
        loaded = serialization.load_pem_private_key(
            Path(args.alipay_private_key).read_bytes(), password=None
        )
        assert isinstance(loaded, rsa.RSAPrivateKey)
        alipay_key = loaded
    else:
        alipay_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if args.alipay_private_key:  # keep it, so a restarted simulator signs the same way
            path = Path(args.alipay_private_key)
            path.write_bytes(
                alipay_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
    if args.write_alipay_public_key:
        Path(args.write_alipay_public_key).write_bytes(
            alipay_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen wants HOST:PORT, not {args.listen!r}")
    return GatewaySimulator([account], alipay_key, host=host.strip("[]"), port=int(port))


def run_simulator(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    sim = build_simulator(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    sim.start()
    event(log, "simulator.listening", url=sim.url, partner=next(iter(sim._accounts)))
    try:
        stop.wait()
    finally:
        sim.stop()
    return 0
