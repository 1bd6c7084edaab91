"""Power cuts in the booted image, with the money checked afterwards (`make powercut`; a short
run inside `make image-test`).

The guest: a copy of the SD card image booted under qemu-system-aarch64 (TCG), running
`kiosk run` as in the field (kiosk.service, provisioned from the boot partition), its journal on
ext4 on the emulated card. Outside it, untouched by the cuts: the Alipay gateway simulator and
its ledger (in this process, HTTPS on the host's loopback, reached from the guest as 10.0.2.2),
the serial scanner and the vending controller (USB serial lines of the guest, unix sockets
here). See tests/powercut/machine.py for the devices and the card's write cache.

A run: boot, then for each cut one sale with a fault drawn as the fault campaign draws them
(tests/campaign_kinds.py: decline, confirm on phone, slow answer, ..., and the controller's
success, failure or silence), then one sale set up to reach the cut's point, and the power cut
(SIGKILL of qemu and of the card's cache together) when the host sees that point:

    scan      a random moment after the scanner line was written, within the time the last
              sale took from its scan to its pay at the gateway
    pay       the simulator received the pay (its answer held, or the buyer still to confirm)
    approved  the controller got APPROVED (it dispenses or not; or the cut follows its SUCCESS)
    cancel    the simulator received a cancel (a failed vend, or a pay never confirmed)
    refund    the simulator received a refund (a failed vend after the cancel window closed)

A cut is counted at the furthest point the host had seen when it fell. After each cut the image
boots again and the kiosk resumes from its journal; the controller reports a dispense the kiosk
never acknowledged, as a real one would. The last boot (`kiosk.powercut=finish`) has the faults
off: the guest's agent waits until the journal is worked off, sends `kiosk journal --json
--all`, and powers off cleanly.

Then the fault campaign's checker (tests/campaign_checks.py) holds the simulator's ledger and
answers, the controller's log and the guest's journal to every money rule of SPEC section 1, and
also: no whole payment code anywhere on the card image (raw bytes, both partitions, free space
included), no journal reported corrupt, the kiosk back to READY (and its lights to ready) after
every cut, the root filesystem clean (e2fsck) after the last clean power-off.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import shutil
import ssl
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kiosk.simulator import Fault, FaultPlan, GatewaySimulator, MerchantAccount
from tests.campaign_checks import Attribution, by_kind, codes_in_file, money_violations
from tests.campaign_kinds import BASIC, VMC_ANSWERS, Setup
from tests.conftest import PARTNER
from tests.powercut import guest
from tests.powercut.ext4 import Ext4Image
from tests.powercut.machine import HOST_FROM_GUEST, SCANNER_PORT, VMC_PORT, Machine

POINTS = ("scan", "pay", "approved", "cancel", "refund")
BOOT_READY_S = 900.0  # power on to a kiosk ready for scans (TCG on a loaded 2-core host)
SALE_S = 120.0  # a sale's end, or its cut point, after the scan
FINISH_S = guest.FINISH_WAIT_S + 600.0  # the last boot: ready, worked off, powered off
VEND_TIMEOUT_S = 8
# Under TCG a signed HTTPS request takes the guest a second or more: real timings, shortened
# only where the rig waits on them (the query deadline, the retries' ceiling).
ALIPAY_TIMINGS = {
    "pay_timeout_s": 8,
    "query_interval_s": 1,
    "query_deadline_s": 15,
    "probe_interval_s": 5,
    "retry_max_s": 5,
}
# What a guest's kernel says of a damaged disk or filesystem.
DISK_ERRORS = (
    "EXT4-fs error",
    "I/O error",
    "JBD2: Invalid checksum",
    "EXT4-fs warning",
    "fsck not present",  # the initramfs cannot check (and repair) the root after a cut
)
# A guest that will never run the kiosk, as its console says.
STUCK = ("You are in emergency mode", "Kernel panic", "Gave up waiting for root")
PAY_HELD_S = 40.0  # a pay's answer held this long: the cut falls while it is in flight
REVERSAL_HELD_S = 5.0  # a cancel's or refund's answer held, now and then
REVERSAL_WAIT_S = 60.0  # a cancel or refund the worker sends after the sale's end


# -- the simulator, its keys, the card ---------------------------------------------------------


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _tls(address: str) -> tuple[bytes, bytes, bytes]:
    """A test CA and a server certificate for `address` (an IP SAN): CA pem, cert, key."""
    now = datetime.now(UTC) - timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiosk power-cut rig CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        leaf.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def config_text(port: int) -> str:
    timings = "\n".join(f"{key} = {value}" for key, value in ALIPAY_TIMINGS.items())
    return f"""# Power-cut rig: the gateway simulator on the host, a serial scanner and a serial
# vending controller on USB serial lines. The guest's clock comes from the virt machine's RTC (the
# host's time at each power-on) and no time server is reachable from the rig's network, so
# nothing could ever mark it synchronised: this rig does not require it.
[kiosk]
terminal_id = "POWERCUT"
state_dir = "/var/lib/kiosk"
require_synced_clock = false

[alipay]
gateway = "https://{HOST_FROM_GUEST}:{port}/gateway.do"
partner = "{PARTNER}"
sign_type = "RSA2"
private_key_file = "merchant_private_key.pem"
alipay_public_key_file = "alipay_public_key.pem"
ca_bundle = "ca_bundle.pem"
currency = "USD"
{timings}

[merchant]
secondary_merchant_id = "M-POWERCUT"
secondary_merchant_name = "Power-cut rig"
secondary_merchant_industry = "5814"
store_id = "S-POWERCUT"
store_name = "Power-cut rig"

[sale]
mode = "fixed"
price = "1.50"
item = "coffee"

[scanner]
driver = "serial"
port = "{SCANNER_PORT}"

[indicators]
driver = "fake"
declined_hold_s = 0.5

[vend]
driver = "serial"
port = "{VMC_PORT}"
timeout_s = {VEND_TIMEOUT_S}
"""


# -- the guest's log ---------------------------------------------------------------------------

_LINE = re.compile(r"(\w+) ([\w.]+): (.*)", re.S)
_FIELD = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_kiosk_line(message: str) -> dict[str, Any]:
    """The kiosk's text log line (`info kiosk.daemon: event=x key=value ...`) as a dict."""
    match = _LINE.match(message)
    if match is None:
        return {"event": "message", "message": message}
    level, logger, text = match.groups()
    first = text.split("\n", 1)[0]
    fields: dict[str, Any] = {"level": level, "logger": logger}
    if not first.startswith("event="):
        fields.update(event="message", message=text)
        return fields
    for key, value in _FIELD.findall(first):
        if value.startswith('"'):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        fields[key] = value
    return fields


class AgentLog:
    """The agent's file of one boot, read as it grows: the kiosk's events, systemd's lines
    about the kiosk's units, the agent's own lines and (last boot) the journal's export."""

    def __init__(self, path: Path, boot: int) -> None:
        self.path = path
        self.boot = boot
        self._offset = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []  # the kiosk's
        self.systemd: list[str] = []
        self.agent: list[str] = []
        self._journal_lines: list[str] | None = None
        self.journal_b64: str | None = None

    def poll(self) -> int:
        """Read what is new; the number of new kiosk events."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        before = len(self.events)
        for raw in lines:
            self._line(raw.decode(errors="replace").rstrip("\r"))
        return len(self.events) - before

    def _line(self, line: str) -> None:
        if self._journal_lines is not None:
            if line == "AGENT journal-end":
                self.journal_b64 = "".join(self._journal_lines)
                self._journal_lines = None
            else:
                self._journal_lines.append(line.strip())
            return
        if line.startswith("AGENT "):
            self.agent.append(line[6:])
            if line == "AGENT journal-begin":
                self._journal_lines = []
            return
        if not line.startswith("{"):
            return
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives non-UTF-8 messages as bytes
            message = bytes(message).decode(errors="replace")
        if not isinstance(message, str):
            return
        if entry.get("SYSLOG_IDENTIFIER") == "kiosk":
            event = parse_kiosk_line(message)
            event["_rx"] = time.monotonic()
            self.events.append(event)
        else:
            self.systemd.append(message)

    def journal(self) -> list[dict[str, Any]] | None:
        if self.journal_b64 is None:
            return None
        text = base64.b64decode(self.journal_b64).decode()
        rows = json.loads(text) if text.strip() else []
        assert isinstance(rows, list)
        return rows


# -- the run -------------------------------------------------------------------------------


@dataclass
class Sale:
    code: str
    label: str
    answer: str
    setup: Setup
    cut_point: str | None = None
    variant: str = ""
    ref: str | None = None
    scanned_at: float = 0.0
    reached: str = "scan"  # the furthest point the host saw
    approved: bool = False
    dispense: bool | None = None  # approved cut: the controller dispenses meanwhile
    cut_at: float | None = None  # monotonic: when to cut (once armed)
    done: bool = False


@dataclass
class Run:
    out: Path
    image: Path
    cuts: int
    seed: int
    rng: random.Random
    sim: GatewaySimulator
    machine: Machine
    who: Attribution = field(default_factory=Attribution)
    codes: set[str] = field(default_factory=set)
    vended: set[str] = field(default_factory=set)
    unacked: set[str] = field(default_factory=set)
    logs: list[AgentLog] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    cut_points: Counter[str] = field(default_factory=Counter)
    cut_variants: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    boot_seconds: list[float] = field(default_factory=list)
    sales: int = 0
    clean_off: bool = False  # the last boot powered itself off
    replays: int = 0  # ext4 journal replays the guest's kernel reported
    scan_to_pay_s: float = 1.5  # the last sale's, scan written to its pay at the gateway
    missed: int = 0  # cuts whose point was not reached in time (cut anyway)

    @property
    def log(self) -> AgentLog:
        return self.logs[-1]

    def say(self, text: str) -> None:
        print(f"powercut: {text}", flush=True)

    def find(self, text: str) -> None:
        self.findings.append(text)
        self.say(f"FINDING {text}")

    # -- boots ---------------------------------------------------------------------------

    def boot(self, mode: str) -> None:
        self.machine.boot(mode)
        n = self.machine.boot_number
        self.logs.append(AgentLog(self.machine.agent_log or Path(), n))
        self.say(f"boot {n} ({mode})")
        started = time.monotonic()
        self.wait_ready(started)
        took = time.monotonic() - started
        self.boot_seconds.append(took)
        self.say(f"boot {n}: kiosk ready after {took:.0f} s")
        # The controller says what it dispensed while the kiosk was off, as soon as the link
        # is up (the kiosk reverses a vend not reported within vend.timeout_s of its start).
        for ref in sorted(self.unacked):
            self.machine.vmc.write_line(f"SUCCESS {ref}")

    def wait_ready(self, started: float) -> None:
        """The kiosk's READY=1 (systemd's "Started"), its scanner and vend link open, its
        lights at ready; never a corrupt journal."""
        need = {"kiosk.ready", "scanner.opened", "vend.link_up"}
        seen: set[str] = set()
        lights = ""
        started_unit = False
        deadline = started + BOOT_READY_S
        index = 0
        while time.monotonic() < deadline:
            self.pump(0.2)
            for event in self.log.events[index:]:
                name = str(event.get("event"))
                if name in need:
                    seen.add(name)
                if name == "indicator":
                    lights = str(event.get("state"))
                if name in ("config.invalid", "journal.invalid"):
                    raise RunError(f"boot {self.log.boot}: {name} {event.get('problem')}")
            index = len(self.log.events)
            started_unit = started_unit or any(
                "Started kiosk.service" in line for line in self.log.systemd
            )
            if seen == need and started_unit and lights == "ready":
                return
            if not self.machine.on:
                break
            stuck = self.machine.console_shows(STUCK)
            if stuck:
                raise RunError(f"boot {self.log.boot}: the console shows {stuck!r}")
        raise RunError(
            f"boot {self.log.boot}: the kiosk was not ready in {BOOT_READY_S:.0f} s "
            f"(seen {sorted(seen)}, lights {lights or 'none'}, READY=1 {started_unit}, "
            f"machine {'on' if self.machine.on else 'off'})"
        )

    def pump(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for a controller line; read the agent's file. The lines."""
        lines = []
        line = self.machine.vmc.read_line(timeout) if self.machine.on else None
        while line is not None:
            lines.append(line)
            line = self.machine.vmc.read_line(0)
        if not self.machine.on and timeout > 0 and not lines:
            time.sleep(min(timeout, 0.2))
        self.log.poll()
        for line in lines:
            if line.startswith("ACK "):
                self.unacked.discard(line[4:].strip())
        return lines

    def cut(self, sale: Sale) -> None:
        self.machine.cut()
        point = sale.reached
        self.cut_points[point] += 1
        self.cut_variants[f"{point}: {sale.variant or '-'}"] += 1
        if sale.cut_point is not None and sale.cut_point != point:
            self.say(f"cut meant for {sale.cut_point} fell at {point}")
        self.say(
            f"CUT #{sum(self.cut_points.values())} at {point} ({sale.variant}) "
            f"{sale.label}, ref {sale.ref}"
        )

    # -- sales ---------------------------------------------------------------------------

    def new_code(self, i: int, kind: str, setup: Setup) -> tuple[str, str]:
        code = f"28{self.seed % 1000:03d}{i:09d}{setup.suffix}"
        label = f"#{i} {kind}" + (f"[{setup.detail}]" if setup.detail else "")
        self.codes.add(code)
        self.who.add_code(code, label)
        return code, label

    def drawn_sale(self) -> None:
        """A sale with a fault drawn as the fault campaign draws them."""
        kind = self.rng.choice(sorted(BASIC))
        setup = BASIC[kind](self.rng)
        self.play(kind, setup, setup.answer or self.rng.choice(VMC_ANSWERS), None)

    def cut_sale(self, point: str) -> None:
        """A sale set up to reach `point`, cut there."""
        rng = self.rng
        answer = rng.choice(VMC_ANSWERS)
        variant = ""
        if point == "scan":
            kind = rng.choice(sorted(BASIC))
            setup = BASIC[kind](rng)
            # Before the pay reaches the gateway, mostly: within the scan-to-pay time seen.
            variant = f"after {rng.uniform(0.05, 1.0) * self.scan_to_pay_s:.2f} s"
        elif point == "pay":
            kind = "pay_held"
            plan = rng.choice(
                (
                    FaultPlan(Fault.SLOW_AFTER_CHARGE, delay_s=PAY_HELD_S),
                    FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=rng.uniform(2, 10)),
                    FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None),
                    FaultPlan(Fault.DROP_AFTER_CHARGE),
                )
            )
            setup = Setup("0001", for_code=(plan,), detail=str(plan.fault))
            variant = f"{plan.fault}"
        elif point == "approved":
            kind = "approved"
            setup = Setup("0001")
            variant = rng.choice(("dispensed, not reported", "not dispensed", "after SUCCESS"))
            answer = "success" if variant == "after SUCCESS" else answer
        elif point == "cancel":
            kind = "cancel"
            plans: list[FaultPlan] = []
            if rng.random() < 0.5:
                variant = "vend failed"
                answer = rng.choice(("failure", "silence"))
            else:
                variant = "never confirmed"
                plans.append(FaultPlan(Fault.WAIT_BUYER_PAY, delay_s=None))
            if rng.random() < 0.5:
                plans.append(FaultPlan(Fault.SLOW_AFTER_CHARGE, "cancel", delay_s=REVERSAL_HELD_S))
                variant += ", answer held"
            setup = Setup("0001", for_code=tuple(plans), detail=variant)
        else:
            kind = "refund"
            answer = rng.choice(("failure", "silence"))
            plans = [FaultPlan(Fault.CANCEL_WINDOW_CLOSED, times=0)]
            variant = f"vend {answer}"
            if rng.random() < 0.5:
                plans.append(FaultPlan(Fault.SLOW_AFTER_CHARGE, "refund", delay_s=REVERSAL_HELD_S))
                variant += ", answer held"
            setup = Setup("0001", for_code=tuple(plans), detail=variant)
        self.play(kind, setup, answer, point, variant)

    def play(
        self, kind: str, setup: Setup, answer: str, point: str | None, variant: str = ""
    ) -> None:
        i = self.sales
        self.sales += 1
        self.kinds[kind] += 1
        code, label = self.new_code(i, kind, setup)
        sale = Sale(code, label, answer, setup, point, variant)
        sim = self.sim
        for plan in setup.general:
            sim.inject(plan)
        for plan in setup.for_code:
            sim.inject_for_code(code, plan)
        if setup.offline:
            sim.go_offline()
        seen_from = len(sim.requests_seen)
        index = len(self.log.events)
        if not self.machine.scanner.write_line(code):
            raise RunError(f"{label}: the scanner line is down")
        sale.scanned_at = time.monotonic()
        if point == "scan":
            sale.cut_at = sale.scanned_at + float(variant.split()[1])
        self.say(
            f"sale {label} answer={answer}" + (f" cut at {point} ({variant})" if point else "")
        )
        deadline = sale.scanned_at + SALE_S
        ended = False
        done_at = 0.0
        while time.monotonic() < deadline:
            lines = self.pump(0.05)
            self._requests(sale, seen_from)
            for line in lines:
                self._controller(sale, line)
                if sale.cut_at is not None:
                    break
            events = self.log.events[index:]
            for event in events:
                name = event.get("event")
                if name == "payment.start" and event.get("ref"):
                    sale.ref = sale.ref or str(event["ref"])
                    self.who.by_ref.setdefault(str(event["ref"]), label)
                if name in ("payment.result", "scan.rejected", "scan.ignored") or (
                    event.get("message") == "sale failed"
                ):
                    ended = True
                if ended and name == "indicator" and event.get("state") in ("ready", "offline"):
                    sale.done = True
            index += len(events)
            if sale.cut_at is not None and time.monotonic() >= sale.cut_at:
                break
            if point is None and sale.done:
                break
            if point is not None and sale.done and sale.cut_at is None:
                # A cancel or refund may follow the sale's end (the worker's): wait for it a
                # while. Else the sale ended before its point: cut now, counted where it is.
                done_at = done_at or time.monotonic()
                if point in ("cancel", "refund") and time.monotonic() < done_at + REVERSAL_WAIT_S:
                    continue
                self.missed += 1
                sale.variant += " (ended before its point)"
                break
        else:
            if point is None:
                self.find(f"{label}: the sale did not end in {SALE_S:.0f} s")
        if setup.offline:
            sim.go_online()
        sim.clear_faults()
        if point is not None:
            self.cut(sale)

    def _requests(self, sale: Sale, seen_from: int) -> None:
        """Follow the simulator's view of this sale: its pay, cancels and refunds."""
        seen = self.sim.requests_seen[seen_from:]
        for request in seen:
            ref = request.params.get("partner_trans_id") or request.params.get("out_trade_no")
            if request.service == "pay" and sale.ref is None and ref:
                sale.ref = ref
                self.scan_to_pay_s = max(0.3, request.time - sale.scanned_at)
                self.who.by_ref.setdefault(ref, sale.label)
            if ref is None or ref != sale.ref:
                continue
            point = {"pay": "pay", "cancel": "cancel", "refund": "refund"}.get(request.service)
            if point is None:
                continue
            if POINTS.index(point) > POINTS.index(sale.reached):
                sale.reached = point
            if sale.cut_point == point and sale.cut_at is None:
                sale.cut_at = time.monotonic() + self.rng.uniform(0, 1.0)

    def _controller(self, sale: Sale, line: str) -> None:
        """The vending controller: dispense (or not) on APPROVED, as drawn."""
        if not line.startswith("APPROVED "):
            return
        ref = line.split(" ")[1]
        sale.approved = True
        if POINTS.index(sale.reached) < POINTS.index("approved"):
            sale.reached = "approved"
        if sale.cut_point == "approved" and sale.variant != "after SUCCESS":
            if sale.variant == "dispensed, not reported":
                self.vended.add(ref)  # dispensed while the kiosk lost power: told at restart
                self.unacked.add(ref)
            sale.cut_at = time.monotonic()
            return
        if sale.answer == "success":
            self.machine.vmc.write_line(f"SUCCESS {ref}")
            self.vended.add(ref)
            self.unacked.add(ref)
            if sale.cut_point == "approved":
                sale.cut_at = time.monotonic() + self.rng.uniform(0, 0.5)
        elif sale.answer == "failure":
            self.machine.vmc.write_line(f"FAILURE {ref}")

    # -- the end -------------------------------------------------------------------------

    def finish(self) -> list[dict[str, Any]]:
        """The last boot: no faults; the journal worked off; its export; a clean power-off."""
        self.sim.clear_faults()
        self.boot("finish")
        deadline = time.monotonic() + FINISH_S
        while time.monotonic() < deadline and self.log.journal_b64 is None:
            self.pump(0.5)
        self.clean_off = self.machine.wait_off(300)
        if not self.clean_off:
            self.find("the last boot did not power off by itself")
        self.log.poll()
        rows = self.log.journal()
        if rows is None:
            raise RunError(f"no journal export from the last boot (agent: {self.log.agent[-3:]})")
        if any(line.startswith("timeout") for line in self.log.agent):
            self.find(f"journal not worked off in {guest.FINISH_WAIT_S} s: {self.log.agent[-2:]}")
        return rows

    def boot_checks(self) -> None:
        """Every boot: the kiosk's journal never reported corrupt or unwritable; no sale's
        thread failed; the kiosk never exited on its own."""
        for log in self.logs:
            for event in log.events:
                name = str(event.get("event"))
                reason = str(event.get("reason", ""))
                if name in ("journal.invalid", "journal.error", "journal.still_failing") or (
                    name == "kiosk.out_of_service" and reason.startswith("journal")
                ):
                    self.find(f"boot {log.boot}: {name} {event.get('problem') or reason}")
                if event.get("message") == "sale failed":
                    self.find(f"boot {log.boot}: a sale's thread failed")
            for line in log.systemd:
                if "kiosk.service: Main process exited" in line or "Failed with result" in line:
                    self.find(f"boot {log.boot}: {line}")
            console = self.out / f"console-boot{log.boot}.log"
            text = console.read_bytes().decode(errors="replace") if console.exists() else ""
            for bad in DISK_ERRORS:
                if bad in text:
                    self.find(f"boot {log.boot}: the console shows {bad!r}")
            self.replays += text.count("recovery complete")
            caches = [a for a in log.agent if a.startswith("boot ")]
            if caches and "write_cache=write_back" not in caches[0]:
                self.find(f"boot {log.boot}: the card's write cache is not volatile: {caches[0]}")

    def image_checks(self) -> None:
        found = codes_in_file(self.image, self.codes)
        if found:
            self.find(f"{len(found)} whole payment codes on the card image")
        if not self.clean_off:
            return  # a cut filesystem needs its journal replayed: nothing to judge
        with Ext4Image(self.image) as fs:
            spec = f"{fs.image}?offset={fs.offset}"
        fsck = subprocess.run(["e2fsck", "-fn", spec], capture_output=True, text=True)
        if fsck.returncode != 0:
            self.find(f"e2fsck after the last clean power-off: {fsck.stdout.strip()[-300:]}")


class RunError(RuntimeError):
    pass


def schedule(rng: random.Random, cuts: int) -> list[str]:
    """Which point each cut aims at: every point as evenly as the count allows, in random
    order; a count under 5 takes distinct points."""
    points: list[str] = []
    while len(points) < cuts:
        points += rng.sample(POINTS, len(POINTS))
    chosen = points[:cuts]
    rng.shuffle(chosen)
    return chosen


def run(pristine: Path, out: Path, cuts: int, seed: int, refresh: bool) -> int:
    started = time.monotonic()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*-boot*.log"):
        old.unlink()
    image = out / "powercut.img"
    print(f"powercut: seed {seed} (replay: --seed {seed}), {cuts} cuts, image {pristine}")
    subprocess.run(["cp", "--sparse=always", str(pristine), str(image)], check=True)
    if refresh:
        from tests.powercut.ext4 import refresh_kiosk

        refresh_kiosk(image)
    guest.install_agent(image)
    kernel, initrd = guest.boot_files(image, out)

    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca, cert, key = _tls(HOST_FROM_GUEST)
    (out / "tls-cert.pem").write_bytes(cert + ca)
    (out / "tls-key.pem").write_bytes(key)
    (out / "tls-key.pem").chmod(0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(out / "tls-cert.pem", out / "tls-key.pem")
    sim = GatewaySimulator(
        [MerchantAccount(PARTNER, merchant_public_key=merchant.public_key())],
        alipay_private_key=alipay,
        host="127.0.0.1",
        ssl_context=context,
    )
    sim.start()
    guest.provision_card(
        image,
        {
            "kiosk.toml": config_text(sim.port).encode(),
            "merchant_private_key.pem": _pem_private(merchant),
            "alipay_public_key.pem": alipay.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "ca_bundle.pem": ca,
        },
    )
    shutil.rmtree(out / "card", ignore_errors=True)  # the staged copies of the card's files
    machine = Machine(out, image, kernel, initrd)
    r = Run(out, image, cuts, seed, rng, sim, machine)
    rows: list[dict[str, Any]] = []
    try:
        for point in schedule(rng, cuts):
            r.boot("cut")
            r.drawn_sale()
            r.cut_sale(point)
        rows = r.finish()
    except RunError as exc:
        r.find(str(exc))
    finally:
        machine.close()
        sim.stop()
    r.boot_checks()
    r.image_checks()
    violations = list(r.findings)
    if rows:
        violations += money_violations(sim, rows, r.vended, r.who)
    elapsed = time.monotonic() - started
    outcomes = Counter(str(row["state"]) for row in rows)
    print("powercut: cuts per point:", {p: r.cut_points[p] for p in POINTS})
    print("powercut: cut variants:", dict(sorted(r.cut_variants.items())))
    print("powercut: sales per outcome:", dict(sorted(outcomes.items())))
    print("powercut: sales per kind:", dict(sorted(r.kinds.items())))
    print(
        f"powercut: {sum(r.cut_points.values())} cuts ({r.missed} ended before their point), "
        f"{r.sales} sales, {len(r.boot_seconds)} boots (power-on to ready: "
        f"{', '.join(f'{s:.0f}' for s in r.boot_seconds)} s), controller dispensed "
        f"{len(r.vended)}, ext4 journal replays {r.replays}, violations {len(violations)}, "
        f"{elapsed:.0f} s"
    )
    if violations:
        print("powercut: violations by kind:", dict(sorted(by_kind(violations).items())))
        for line in violations:
            print("   ", line[:300])
        print(f"powercut: FAILED (consoles and agent logs in {out})")
        return 1
    print("powercut: passed")
    return 0
