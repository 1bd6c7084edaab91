"""The client's TLS to the gateway: public key pins checked on each new connection before any
request byte leaves, and nothing taken from the environment (proxies, netrc, CA bundles).

The gateway simulator serves TLS on loopback with a certificate from a test CA made here; the
client trusts that CA through `ca_bundle` (GatewaySettings.verify_tls), as a kiosk would.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drivers.vend_fake import FakeVendOutput
from kiosk.alipay.client import AlipayClient, GatewaySettings, Outcome, PayOrder
from kiosk.alipay.pinning import spki_pin
from kiosk.alipay.signing import Md5Signature, SignType
from kiosk.errors import GatewayUnreachable
from kiosk.journal import Journal
from kiosk.payment import FlowSettings, PaymentFlow, SaleResult
from kiosk.payment_code import PaymentCode
from kiosk.selftest import check_gateway
from kiosk.simulator import GatewaySimulator, MerchantAccount
from tests.alipay_fixtures import CraftedGateway, RefusingPort, Reply, tls_certificate
from tests.conftest import MD5_KEY, PARTNER, named_key, payment_code, signature_for

BUYER_CODE = payment_code("0001")


@dataclass(frozen=True)
class Pki:
    """A test CA, the gateway's certificate from it, and a stranger's key."""

    ca: Path  # the CA certificate (PEM): what the client trusts
    leaf: Path  # the gateway's certificate (PEM)
    key: Path  # the gateway's private key (PEM)
    ca_pin: str
    leaf_pin: str
    stranger: Path  # a self-signed certificate of another key (PEM)
    stranger_pin: str


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _der_pin(cert: x509.Certificate) -> str:
    return spki_pin(cert.public_bytes(serialization.Encoding.DER))


def make_pki(directory: Path, leaf_key_name: str = "tls-leaf") -> Pki:
    ca_key, leaf_key = named_key("tls-ca"), named_key(leaf_key_name)
    stranger_key = named_key("tls-stranger")
    ca = tls_certificate("Kiosk test CA", ca_key, "Kiosk test CA", ca_key, ca=True)
    leaf = tls_certificate("127.0.0.1", leaf_key, "Kiosk test CA", ca_key, ca=False)
    stranger = tls_certificate("Stranger", stranger_key, "Stranger", stranger_key, ca=True)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pem" for name in ("ca", "leaf", "key", "stranger")}
    paths["ca"].write_bytes(_pem(ca))
    paths["leaf"].write_bytes(_pem(leaf))
    paths["stranger"].write_bytes(_pem(stranger))
    paths["key"].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(
        ca=paths["ca"],
        leaf=paths["leaf"],
        key=paths["key"],
        ca_pin=_der_pin(ca),
        leaf_pin=_der_pin(leaf),
        stranger=paths["stranger"],
        stranger_pin=_der_pin(stranger),
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def server_context(certificate_chain: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate_chain, key)
    return context


@pytest.fixture
def tls_context(pki: Pki) -> ssl.SSLContext:
    return server_context(pki.leaf, pki.key)


@pytest.fixture
def tls_simulator(tls_context: ssl.SSLContext) -> Iterator[GatewaySimulator]:
    account = MerchantAccount(
        PARTNER, md5_key=MD5_KEY, merchant_public_key=named_key("merchant").public_key()
    )
    sim = GatewaySimulator([account], named_key("alipay"), ssl_context=tls_context)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def client_for(
    sim: GatewaySimulator, pki: Pki | None, *pins: str, **changes: object
) -> AlipayClient:
    settings: dict[str, object] = dict(
        gateway=sim.url,
        partner=PARTNER,
        seller_id=PARTNER,
        signature=signature_for(SignType.RSA2, sim),
        verify_tls=str(pki.ca) if pki is not None else True,
        pin_sha256=pins,
        connect_timeout_s=2.0,
        pay_timeout_s=5.0,
        read_timeout_s=5.0,
    )
    settings.update(changes)
    return AlipayClient(GatewaySettings(**settings))  # type: ignore[arg-type]


def order(ref: str = "VM-TLS-0001") -> PayOrder:
    return PayOrder(
        partner_trans_id=ref,
        amount=Decimal("1.50"),
        currency="USD",
        buyer_identity_code=BUYER_CODE,
        trans_name="Vending purchase",
        trans_create_time="20240101120000",
        extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1", "terminal_id": "VM-TLS"},
    )


# -- pins --------------------------------------------------------------------------------------


def test_the_simulator_serves_tls_with_the_test_ca(
    tls_simulator: GatewaySimulator, pki: Pki
) -> None:
    assert tls_simulator.url.startswith("https://127.0.0.1:")
    with client_for(tls_simulator, pki) as client:
        assert client.pay(order()).outcome is Outcome.SUCCESS


def test_a_pin_on_the_gateway_key_passes(tls_simulator: GatewaySimulator, pki: Pki) -> None:
    with client_for(tls_simulator, pki, pki.stranger_pin, pki.leaf_pin) as client:
        result = client.pay(order())
    assert result.outcome is Outcome.SUCCESS
    assert [t.partner_trans_id for t in tls_simulator.ledger.trades()] == ["VM-TLS-0001"]


def test_a_pin_on_the_issuing_ca_passes(tls_simulator: GatewaySimulator, pki: Pki) -> None:
    # HPKP semantics: any key of the verified chain, so a CA pin survives leaf renewals.
    with client_for(tls_simulator, pki, pki.ca_pin) as client:
        assert client.pay(order()).outcome is Outcome.SUCCESS


def test_a_pin_mismatch_is_never_sent_and_logged_with_both_sides(
    tls_simulator: GatewaySimulator, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kiosk.alipay")
    with (
        client_for(tls_simulator, pki, pki.stranger_pin) as client,
        pytest.raises(GatewayUnreachable, match="pin mismatch"),
    ):
        client.pay(order())
    assert tls_simulator.requests_seen == []  # not one byte of a request arrived
    assert tls_simulator.ledger.trades() == []
    [mismatch] = [r for r in caplog.records if r.getMessage() == "alipay.pin_mismatch"]
    fields = mismatch.kiosk_fields  # type: ignore[attr-defined]
    assert mismatch.levelno == logging.ERROR
    assert fields["gateway"] == f"127.0.0.1:{tls_simulator.port}"
    assert fields["expected"] == pki.stranger_pin
    assert fields["seen"] == f"{pki.leaf_pin},{pki.ca_pin}"  # the verified chain, leaf first


def test_a_pinned_certificate_the_server_only_sends_along_does_not_count(
    pki: Pki, tmp_path: Path
) -> None:
    # The server sends the stranger's certificate after its own; it is no part of the chain
    # the client verified (leaf -> test CA), so its pin must not open the door.
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.leaf.read_bytes() + pki.stranger.read_bytes())
    account = MerchantAccount(PARTNER, merchant_public_key=named_key("merchant").public_key())
    context = server_context(chain, pki.key)
    with (
        GatewaySimulator([account], named_key("alipay"), ssl_context=context) as sim,
        client_for(sim, pki, pki.stranger_pin) as client,
    ):
        with pytest.raises(GatewayUnreachable, match="pin mismatch"):
            client.pay(order())
        assert sim.requests_seen == []


def test_a_pin_mismatch_on_the_primary_leaves_the_pay_to_the_backup(
    tls_simulator: GatewaySimulator, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", leaf_key_name="tls-other-leaf")  # same CA, new key
    account = MerchantAccount(PARTNER, merchant_public_key=named_key("merchant").public_key())
    context = server_context(other.leaf, other.key)
    with GatewaySimulator([account], named_key("alipay"), ssl_context=context) as backup:
        # Pinned to the backup's key only: the primary is refused unsent, the backup pays.
        client = client_for(tls_simulator, pki, other.leaf_pin, backup_gateway=backup.url)
        with client:
            assert client.pay(order()).outcome is Outcome.SUCCESS
        assert tls_simulator.requests_seen == []
        assert len(backup.requests_seen) == 1


def test_every_new_connection_is_checked(
    tls_simulator: GatewaySimulator,
    tls_context: ssl.SSLContext,
    pki: Pki,
    tmp_path: Path,
) -> None:
    with client_for(tls_simulator, pki, pki.leaf_pin) as client:
        assert client.pay(order("VM-TLS-0001")).outcome is Outcome.SUCCESS
        # The gateway's key changes; its connections are cut, so the next call connects anew.
        other = make_pki(tmp_path / "other", leaf_key_name="tls-other-leaf")
        tls_context.load_cert_chain(other.leaf, other.key)
        tls_simulator.go_offline()
        tls_simulator.go_online()
        with pytest.raises(GatewayUnreachable, match="pin mismatch"):
            client.query("VM-TLS-0001")
    assert [seen.service for seen in tls_simulator.requests_seen] == ["pay"]


def test_pins_never_travel_over_plain_http(simulator: GatewaySimulator, pki: Pki) -> None:
    with (
        client_for(simulator, None, pki.leaf_pin) as client,
        pytest.raises(GatewayUnreachable, match="https"),
    ):
        client.pay(order())
    assert simulator.requests_seen == []


def test_a_pin_mismatch_declines_the_sale_offline_with_nothing_charged(
    tls_simulator: GatewaySimulator, pki: Pki, tmp_path: Path
) -> None:
    settings = FlowSettings(
        terminal_id="VM-TLS",
        currency="USD",
        trans_name="Vending purchase",
        extend_info={"secondary_merchant_id": "M-1", "store_id": "S-1", "terminal_id": "VM-TLS"},
    )
    vend = FakeVendOutput()
    with (
        Journal(tmp_path / "state") as journal,
        client_for(tls_simulator, pki, pki.stranger_pin) as client,
    ):
        flow = PaymentFlow(client, journal, vend, settings)
        sale = flow.sell(PaymentCode.parse(BUYER_CODE), Decimal("1.50"), "coffee")
        assert (sale.result, sale.reason) == (SaleResult.DECLINED, "OFFLINE")
        assert journal.get(sale.ref).final  # the pay provably never left: nothing to resolve
    assert vend.approvals == []
    assert tls_simulator.requests_seen == []


# -- nothing from the environment --------------------------------------------------------------


def test_proxy_variables_are_ignored(
    tls_simulator: GatewaySimulator, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = RefusingPort()  # a proxy honoured here would fail the call
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, dead.url.removesuffix("/gateway.do"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with client_for(tls_simulator, pki) as client:
            assert client.pay(order()).outcome is Outcome.SUCCESS
    finally:
        dead.close()


def test_netrc_credentials_are_never_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login kiosk password leaked-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    gateway = CraftedGateway(lambda got: Reply(status=500)).start()
    try:
        settings = GatewaySettings(
            gateway=gateway.url,
            partner=PARTNER,
            seller_id=PARTNER,
            signature=Md5Signature(MD5_KEY),
            connect_timeout_s=2.0,
            read_timeout_s=2.0,
        )
        with AlipayClient(settings) as client:
            client.query("VM-TLS-0001")
        headers = {name.lower() for name in gateway.last().headers}
        assert "authorization" not in headers
    finally:
        gateway.stop()


def test_a_ca_bundle_from_the_environment_is_not_trusted(
    tls_simulator: GatewaySimulator, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca))
    # The config names no bundle: the system's trust store, which knows no test CA.
    with client_for(tls_simulator, None) as client, pytest.raises(GatewayUnreachable):
        client.pay(order())
    assert tls_simulator.requests_seen == []


def test_selftest_checks_the_pins_and_shows_the_chain_on_a_mismatch(
    tls_simulator: GatewaySimulator, pki: Pki
) -> None:
    steps: list[tuple[str, bool, str]] = []

    def step(name: str, ok: bool, detail: str = "", mark: str | None = None) -> None:
        steps.append((name, ok, detail))

    check_gateway(tls_simulator.url, str(pki.ca), step, (pki.ca_pin,))
    check_gateway(tls_simulator.url, str(pki.ca), step, (pki.stranger_pin,))
    tls = [(ok, detail) for name, ok, detail in steps if name.startswith("gateway TLS")]
    assert tls[0] == (True, f"{tls[0][1].split(',')[0]}, certificate verified, pinned key found")
    assert tls[1] == (
        False,
        f"no pinned key; the chain has {pki.leaf_pin}, {pki.ca_pin} (leaf first)",
    )


def test_the_system_trust_store_is_openssls_own_file_not_the_environments(
    tls_simulator: GatewaySimulator, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A system whose store holds the test CA; the environment names another bundle.
    system = ssl.DefaultVerifyPaths(
        cafile=None,
        capath=None,
        openssl_cafile_env="SSL_CERT_FILE",
        openssl_cafile=str(pki.ca),
        openssl_capath_env="SSL_CERT_DIR",
        openssl_capath=None,
    )
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: system)
    elsewhere = make_pki(tmp_path / "elsewhere")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, str(elsewhere.stranger))
    with client_for(tls_simulator, None) as client:  # ca_bundle = "": the system's store
        assert client.pay(order()).outcome is Outcome.SUCCESS
