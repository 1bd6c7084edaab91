"""`kiosk demo`: the real daemon with fake devices and the gateway simulator on loopback,
playing the scenarios a newcomer should see, then a table of what happened.

No config, no hardware, no network beyond 127.0.0.1. Timings are shortened (query every
0.3 s, give up after 3 s) so the whole script runs in seconds; the flow is the production one.
"""

from __future__ import annotations

import logging
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
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
from kiosk.daemon import Kiosk, KioskStatus
from kiosk.journal import Journal
from kiosk.log import setup_logging
from kiosk.payment import Sale
from kiosk.ports import VendOutput, VendResult
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

    def start_kiosk(self, config: Config | None = None, vend: VendOutput | None = None) -> None:
        """Start the daemon on the fake devices, or on CONFIG with the vend output VEND."""
        scanner_cls, indicator_cls, vend_cls = self._fakes
        self.scanner, self.indicator = scanner_cls(), indicator_cls()
        if vend is None:
            self.vend = vend = vend_cls()
        self.journal = Journal(self.config.kiosk.state_dir)
        kiosk = Kiosk(
            config or self.config,
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


def play(rig: DemoRig) -> list[Row]:
    """Play every scenario; one row each, printed once at the end in the table."""
    rows: list[Row] = []

    def record(
        name: str, code: str, sale: Sale, journal_state: str, expect_state: str, expect_money: str
    ) -> None:
        said = f"{sale.result.value}" + (f" ({sale.reason})" if sale.reason else "")
        money = rig.trade(sale.ref)
        ok = journal_state == expect_state and money.startswith(expect_money)
        rows.append(Row(name, "…" + code[-4:], said, journal_state, money, ok))

    def final_state(ref: str) -> str:
        txn = rig.journal.get(ref)
        return txn.state.value if txn else "missing"

    # (name, last 4 digits, the vend's result, journal state, Alipay's ledger)
    simple = [
        ("paid", "0001", VendResult.VENDED, "vended", "charged"),  # SUCCESS, the machine vends
        ("declined", "2022", VendResult.VENDED, "declined", "no trade"),  # balance too low
        # UNKNOW: the buyer enters a password on the phone, queries find it paid
        ("buyer confirms on phone", "1001", VendResult.VENDED, "vended", "charged"),
        # the answer comes too late, a query finds the charge
        ("timeout resolved by query", "3001", VendResult.VENDED, "vended", "charged"),
        # paid, the machine jams, the charge is reversed
        ("vend failure reversed", "0005", VendResult.FAILED, "cancelled", "charged, returned"),
    ]
    rig.start_kiosk()
    for n, (name, suffix, vend_result, expect_state, expect_money) in enumerate(simple):
        if vend_result is not VendResult.VENDED:
            rig.vend.script(vend_result)
        code = _code(suffix, n + 1)
        sale = rig.sell(code)
        record(name, code, sale, final_state(sale.ref), expect_state, expect_money)

    # Charged, then the line drops; the kiosk restarts while offline, and the journal returns
    # the money once the network is back.
    code = _code("0006", 6)
    rig.sim.inject(FaultPlan(Fault.DROP_AFTER_CHARGE))
    known = {t.partner_trans_id for t in rig.sim.ledger.trades()}
    cut = threading.Thread(target=_cut_after_charge, args=(rig, known), daemon=True)
    cut.start()
    sale = rig.sell(code)
    cut.join(10)
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
    approvals = _play_mdb(rig, record, final_state)
    if approvals != [f"C,VEND,{PRICE}"]:  # the paid sale approved, the cancelled one never
        rows[-1].ok = rows[-2].ok = False
    return rows


class _Events(logging.Handler):
    """Counts the daemon's events by name, so the demo can wait for one (a selection taken)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name = str((getattr(record, "kiosk_fields", None) or {}).get("event"))
        self.seen[name] = self.seen.get(name, 0) + 1


def _play_mdb(
    rig: DemoRig, record: Callable[..., None], final_state: Callable[[str], str]
) -> list[str]:
    """The kiosk as an MDB cashless device (`vend.driver = "mdb"`, docs/mdb.md) on the board
    emulator's pty: the machine selects, the customer scans, the kiosk approves. Returns the
    approvals the board saw (`C,VEND,...`)."""
    from drivers import build_vend_output
    from drivers.mdb_board import MdbBoard

    board = MdbBoard.on_pty().start()
    events = _Events()
    logging.getLogger("kiosk").addHandler(events)
    try:
        assert board.device is not None
        config = replace(
            rig.config,
            sale=SaleSection(mode="vmc", scan_timeout_s=10.0),
            vend=VendSection(driver="mdb", port=board.device, baud=115200, timeout_s=2.0),
        )
        rig.start_kiosk(config, build_vend_output(config))
        kiosk = rig.kiosk
        assert kiosk is not None
        if not board.wait_reader(True, 10):
            raise RuntimeError("the machine did not enable the kiosk's reader")

        def select_and_scan(code: str) -> int:
            before, taken = kiosk.status.sales_total, events.seen.get("vend.selection", 0)
            if not board.select(str(PRICE), "12"):
                raise RuntimeError(f"the reader is not enabled: {board.status()}")
            rig.wait_until(lambda: events.seen.get("vend.selection", 0) > taken, 10)
            rig.scanner.scan(code)
            return before

        # The machine asks 1.50 for item 12, the customer scans, C,VEND,1.50 approves,
        # the machine reports c,VEND,SUCCESS.
        code = _code("0007", 7)
        before = select_and_scan(code)
        if board.wait_approved(10) is not None:
            board.success()
        rig.wait_until(lambda: kiosk.status.sales_total > before, 20)
        sale = kiosk.status.sales[-1]
        record(
            "MDB: selected, paid, C,VEND, SUCCESS",
            code,
            sale,
            final_state(sale.ref),
            "vended",
            "charged",
        )

        # The pay is charged but its answer is late; the customer cancels on the machine
        # meanwhile (the request is dropped): nothing is approved, the charge is reversed.
        code = _code("3001", 8)
        known = {t.partner_trans_id for t in rig.sim.ledger.trades()}
        before = select_and_scan(code)
        rig.wait_until(
            lambda: any(
                t.holds_money and t.partner_trans_id not in known for t in rig.sim.ledger.trades()
            ),
            10,
        )
        board.drop()
        rig.wait_until(lambda: kiosk.status.sales_total > before, 20)
        sale = kiosk.status.sales[-1]
        rig.wait_until(lambda: (t := rig.journal.get(sale.ref)) is not None and t.final, 20)
        record(
            "MDB: cancelled while paying, reversed",
            code,
            sale,
            final_state(sale.ref),
            "cancelled",
            "charged, returned",
        )
        rig.stop_kiosk()
        return [line for line in board.host_lines() if line.startswith("C,VEND")]
    finally:
        logging.getLogger("kiosk").removeHandler(events)
        board.close()


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


INTRO = (
    "kiosk demo: the real daemon, payment flow and journal, with a fake scanner, lights and "
    "vending machine and an Alipay gateway simulator on 127.0.0.1"
)


def run_demo(
    interactive: bool = False,
    log_format: str = "none",
    keep: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    if log_format == "none":
        # Quiet, but the daemon's events still reach the interactive demo's listener.
        logging.getLogger().handlers[:] = [logging.NullHandler()]
    else:
        setup_logging(log_format)
    logging.getLogger("kiosk").setLevel(logging.INFO)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kiosk-demo-")).absolute()
    try:
        rig = DemoRig(tmp / "state")
        out(INTRO)
        if keep:
            out(
                f"journal kept in {tmp / 'state'} (see it with: kiosk journal --state-dir "
                f"{tmp / 'state'} --all)"
            )
        if interactive:
            return _interactive(rig, out)
        try:
            rows = play(rig)
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
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


_SCAN_VERDICTS = {"scan.rejected": "rejected", "scan.ignored": "ignored", "scan.refused": "refused"}


class _ScanVerdicts(logging.Handler):
    """Hears the daemon say why a scan started no sale (rejected, ignored, refused), so the
    interactive demo can tell the person at once instead of after a silent wait."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.verdicts: queue.SimpleQueue[str] = queue.SimpleQueue()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "kiosk_fields", None) or {}
        verdict = _SCAN_VERDICTS.get(str(fields.get("event")))
        if verdict is not None:
            self.verdicts.put(f"{verdict}: {fields.get('reason', '')}")


def _interactive(rig: DemoRig, out: Callable[[str], None]) -> int:
    verdicts = _ScanVerdicts()
    kiosk_log = logging.getLogger("kiosk")
    kiosk_log.addHandler(verdicts)
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
            while not verdicts.verdicts.empty():  # a verdict is about this scan only
                verdicts.verdicts.get_nowait()
            before = status.sales_total
            rig.scanner.scan(code)
            verdict = _sale_or_verdict(status, before, verdicts.verdicts, timeout=60.0)
            if verdict is not None:
                out(f"  {verdict}")
                continue
            sale = status.sales[-1]
            out(f"  {sale.result.value} {sale.reason} ref={sale.ref} Alipay: {rig.trade(sale.ref)}")
    finally:
        kiosk_log.removeHandler(verdicts)
        rig.stop_kiosk()
        rig.close()
    return 0


def _sale_or_verdict(
    status: KioskStatus, before: int, verdicts: queue.SimpleQueue[str], timeout: float
) -> str | None:
    """Wait until the scan's sale has ended (None) or the daemon said why it started none."""
    deadline = time.monotonic() + timeout
    while status.sales_total <= before:
        try:
            return verdicts.get(timeout=0.02)
        except queue.Empty:
            pass
        if time.monotonic() > deadline:
            return "no answer from the kiosk (see the log)"
    return None


__all__ = ["DemoRig", "demo_config", "run_demo"]
