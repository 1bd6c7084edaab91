"""`kiosk demo`: the real daemon with fake devices and the gateway simulator on loopback,
playing the scenarios a newcomer should see, then a table of what happened.

No config, no hardware, no network beyond 127.0.0.1. Timings are shortened (query every
0.3 s, give up after 3 s) so the whole script runs in seconds; the flow is the production one.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk.alipay.client import AlipayClient, GatewaySettings
from kiosk.alipay.signing import RsaSignature, SignType
from kiosk.config import (
    AlipaySection,
    Config,
    IndicatorsSection,
    KioskSection,
    MerchantSection,
    SaleSection,
    ScannerSection,
    VendSection,
)
from kiosk.daemon import Kiosk
from kiosk.journal import Journal
from kiosk.log import setup_logging
from kiosk.payment import Sale
from kiosk.ports import VendResult
from kiosk.simulator import Fault, FaultPlan, GatewaySimulator, MerchantAccount

PARTNER = "2088101122334455"
PRICE = Decimal("1.50")


def demo_config(state_dir: Path, gateway: str) -> Config:
    return Config(
        # The demo runs on any host; whether that host's clock is synchronised is not its
        # business (a kiosk in the field requires it).
        kiosk=KioskSection(terminal_id="DEMO-01", state_dir=state_dir, require_synced_clock=False),
        alipay=AlipaySection(
            gateway=gateway,
            partner=PARTNER,
            allow_http=True,
            currency="USD",
            pay_timeout_s=1.0,
            query_interval_s=0.3,
            query_deadline_s=3.0,
            probe_interval_s=1.0,
        ),
        merchant=MerchantSection(
            secondary_merchant_id="M-DEMO",
            store_id="S-DEMO",
            secondary_merchant_name="Demo Vending",
            store_name="Demo",
        ),
        sale=SaleSection(mode="fixed", price=PRICE, item="coffee"),
        scanner=ScannerSection(driver="fake"),
        indicators=IndicatorsSection(driver="fake"),
        vend=VendSection(driver="fake", timeout_s=2.0),
    )


@dataclass
class Row:
    scenario: str
    code: str
    kiosk_said: str
    journal: str
    alipay: str
    ok: bool


class DemoRig:
    """The simulator, the keys, the fake devices and one running daemon at a time."""

    def __init__(self, state_dir: Path) -> None:
        from drivers.indicator_fake import FakeIndicator
        from drivers.scanner_fake import FakeScanner
        from drivers.vend_fake import FakeVendOutput

        self.merchant_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alipay_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sim = GatewaySimulator(
            [MerchantAccount(PARTNER, merchant_public_key=self.merchant_key.public_key())],
            alipay_private_key=alipay_key,
        )
        self.sim.start()
        self.config = demo_config(state_dir, self.sim.url)
        self.signature = RsaSignature(
            SignType.RSA2, private_key=self.merchant_key, public_key=self.sim.alipay_public_key
        )
        self.scanner = FakeScanner()
        self.indicator = FakeIndicator()
        self.vend = FakeVendOutput()
        self._fakes = (FakeScanner, FakeIndicator, FakeVendOutput)
        self.kiosk: Kiosk | None = None
        self.thread: threading.Thread | None = None

    def client(self) -> AlipayClient:
        a = self.config.alipay
        return AlipayClient(
            GatewaySettings(
                gateway=a.gateway,
                partner=a.partner,
                seller_id=a.partner,
                signature=self.signature,
                pay_timeout_s=a.pay_timeout_s,
                read_timeout_s=a.pay_timeout_s,
                connect_timeout_s=1.0,
            )
        )

    def start_kiosk(self) -> None:
        scanner_cls, indicator_cls, vend_cls = self._fakes
        self.scanner, self.indicator = scanner_cls(), indicator_cls()
        vend = vend_cls()
        self.vend = vend
        self.journal = Journal(self.config.kiosk.state_dir)
        kiosk = Kiosk(
            self.config,
            scanner=self.scanner,
            indicator=self.indicator,
            vend=vend,
            journal=self.journal,
            client_factory=self.client,
        )
        self.kiosk = kiosk
        self.thread = threading.Thread(target=kiosk.run, name="kiosk", daemon=True)
        self.thread.start()
        if not kiosk.ready.wait(10):
            raise RuntimeError("the kiosk did not become ready")

    def stop_kiosk(self) -> None:
        assert self.kiosk is not None and self.thread is not None
        self.kiosk.stop()
        self.thread.join(30)
        self.journal.close()

    def sell(self, code: str, timeout: float = 20.0) -> Sale:
        """Scan a code and wait for the sale it starts to end."""
        kiosk = self.kiosk
        assert kiosk is not None
        before = kiosk.status.sales_total
        self.wait_until(lambda: kiosk.status.state.value in ("ready", "offline"), timeout)
        self.scanner.scan(code)
        self.wait_until(lambda: kiosk.status.sales_total > before, timeout)
        return kiosk.status.sales[-1]

    @staticmethod
    def wait_until(condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        done = threading.Event()
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the demo waited too long")
            done.wait(0.02)  # polling a status snapshot, not waiting for a thread to finish

    def trade(self, ref: str) -> str:
        trade = self.sim.ledger.trade(PARTNER, ref)
        if trade is None:
            return "no trade"
        if trade.holds_money:
            return f"charged {trade.amount}"
        if trade.charged:
            return "charged, returned"
        return "not charged"

    def close(self) -> None:
        self.sim.stop()


def _code(suffix: str, n: int) -> str:
    return f"28{n:012d}{suffix}"


def play(rig: DemoRig, out: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []

    def record(
        name: str, code: str, sale: Sale, journal_state: str, expect_state: str, expect_money: str
    ) -> None:
        said = f"{sale.result.value}" + (f" ({sale.reason})" if sale.reason else "")
        money = rig.trade(sale.ref)
        ok = journal_state == expect_state and money.startswith(expect_money)
        rows.append(Row(name, "…" + code[-4:], said, journal_state, money, ok))
        out(f"  {'ok ' if ok else 'BAD'} {name}: {said}; journal {journal_state}; Alipay: {money}")

    def final_state(ref: str) -> str:
        txn = rig.journal.get(ref)
        return txn.state.value if txn else "missing"

    # (what happens, name, last 4 digits, the vend's result, journal state, Alipay's ledger)
    simple = [
        ("paid: scan, Alipay says SUCCESS, the machine vends",
         "paid", "0001", VendResult.VENDED, "vended", "charged"),
        ("declined: the buyer's balance is too low",
         "declined", "2022", VendResult.VENDED, "declined", "no trade"),
        ("confirm on phone: UNKNOW, the buyer enters a password, queries find it paid",
         "buyer confirms on phone", "1001", VendResult.VENDED, "vended", "charged"),
        ("timeout: the answer comes too late, a query finds the charge",
         "timeout resolved by query", "3001", VendResult.VENDED, "vended", "charged"),
        ("vend failure: paid, the machine jams, the charge is reversed",
         "vend failure reversed", "0005", VendResult.FAILED, "cancelled", "charged, returned"),
    ]  # fmt: skip
    rig.start_kiosk()
    for n, (story, name, suffix, vend_result, expect_state, expect_money) in enumerate(simple):
        out(story)
        if vend_result is not VendResult.VENDED:
            rig.vend.script(vend_result)
        code = _code(suffix, n + 1)
        sale = rig.sell(code)
        record(name, code, sale, final_state(sale.ref), expect_state, expect_money)

    out("network lost: charged, then the line drops; the kiosk restarts while offline,")
    out("  and the journal returns the money once the network is back")
    code = _code("0006", 6)
    rig.sim.inject(FaultPlan(Fault.DROP_AFTER_CHARGE))
    known = {t.partner_trans_id for t in rig.sim.ledger.trades()}
    cut = threading.Thread(target=_cut_after_charge, args=(rig, known), daemon=True)
    cut.start()
    sale = rig.sell(code)
    cut.join(10)
    pending = rig.journal.get(sale.ref)
    out(
        f"  while offline: journal {pending.state.value if pending else 'missing'}, "
        f"Alipay: {rig.trade(sale.ref)}"
    )
    rig.stop_kiosk()
    rig.sim.go_online()
    rig.start_kiosk()
    rig.wait_until(lambda: (t := rig.journal.get(sale.ref)) is not None and t.final, 20)
    record(
        "network lost, recovered from the journal",
        code,
        sale,
        final_state(sale.ref),
        "cancelled",
        "charged, returned",
    )
    rig.stop_kiosk()
    return rows


def _cut_after_charge(rig: DemoRig, known: set[str]) -> None:
    """Take the gateway offline as soon as the dropped pay has charged the buyer."""
    deadline = time.monotonic() + 10
    pause = threading.Event()
    while time.monotonic() < deadline:
        if any(t.holds_money and t.partner_trans_id not in known for t in rig.sim.ledger.trades()):
            rig.sim.go_offline()
            return
        pause.wait(0.005)  # a demo's stopwatch: the kiosk's first query comes 0.3 s later


def print_table(rows: list[Row], out: Callable[[str], None]) -> None:
    header = Row("scenario", "code", "the kiosk said", "journal", "Alipay's ledger", True)
    cols = [
        (r.scenario, r.code, r.kiosk_said, r.journal, r.alipay, "ok" if r.ok else "FAIL")
        for r in [header, *rows]
    ]
    cols[0] = (*cols[0][:5], "check")
    widths = [max(len(c[i]) for c in cols) for i in range(6)]
    out("")
    for i, c in enumerate(cols):
        out("  ".join(cell.ljust(w) for cell, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            out("  ".join("-" * w for w in widths))


def run_demo(interactive: bool = False, log_format: str = "none") -> int:
    if log_format == "none":
        logging.disable(logging.CRITICAL)
    else:
        setup_logging(log_format)
    out = print
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiosk-demo-") as tmp:
        rig = DemoRig(Path(tmp) / "state")
        out(f"Alipay gateway simulator on {rig.sim.url}; journal in {tmp}/state")
        out("Fake scanner, lights and vending machine; the real daemon, flow and journal.\n")
        try:
            if interactive:
                return _interactive(rig, out)
            rows = play(rig, out)
        finally:
            rig.close()
        print_table(rows, out)
        held = rig.sim.ledger.charged_total()
        vended = sum((PRICE for r in rows if r.journal == "vended"), Decimal(0))
        money_ok = held == vended
        out(
            f"\nmoney held by Alipay: {held} USD; goods vended: {vended} USD "
            f"({'balanced' if money_ok else 'NOT BALANCED'})"
        )
        out(f"{len(rows)} scenarios in {time.monotonic() - started:.1f} s")
        return 0 if money_ok and all(r.ok for r in rows) else 1


def _interactive(rig: DemoRig, out: Callable[[str], None]) -> int:
    rig.start_kiosk()
    out("Type a payment code (16-24 digits starting 25-30) and Enter; an empty line quits.")
    out(
        "The last 4 digits choose what Alipay does: 0xxx pay, 1001 confirm on phone, "
        "2NNN decline with seed code NNN, 3001 slow, 3002 dropped (see docs/simulator.md)."
    )
    kiosk = rig.kiosk
    assert kiosk is not None
    status = kiosk.status
    try:
        for line in sys.stdin:
            code = line.strip()
            if not code:
                break
            before = status.sales_total
            rig.scanner.scan(code)
            try:
                started = partial(lambda n: status.sales_total > n, before)
                rig.wait_until(started, 2.0 if len(code) < 16 else 30.0)
            except TimeoutError:
                out("  (no sale started: see the rejection in the log)")
                continue
            sale = status.sales[-1]
            out(f"  {sale.result.value} {sale.reason} ref={sale.ref} Alipay: {rig.trade(sale.ref)}")
    finally:
        rig.stop_kiosk()
        rig.close()
    return 0


__all__ = ["DemoRig", "demo_config", "run_demo"]
