"""The fault campaign's end checks: SPEC section 1's money rules, read off the simulator's
ledger and answers, the vending controller's log and `kiosk journal --json`; and rule 6 read
off every file under the state directory and the daemon's log.

Every violation names the transaction and fault kind it belongs to, so a failing campaign says
which fault found the hole.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiosk.log import mask_code
from kiosk.simulator import GatewaySimulator
from kiosk.simulator.services import code_hash
from tests.conftest import PARTNER


@dataclass
class Attribution:
    """Which transaction (index, fault kind, variant) each code and each ref belongs to."""

    by_code_hash: dict[str, str] = field(default_factory=dict)
    by_ref: dict[str, str] = field(default_factory=dict)

    def add_code(self, code: str, label: str) -> None:
        self.by_code_hash[code_hash(code)] = label

    def of(self, ref: str, sim: GatewaySimulator | None = None) -> str:
        if ref in self.by_ref:
            return self.by_ref[ref]
        if sim is not None:
            trade = sim.ledger.trade(PARTNER, ref)
            if trade is not None and trade.buyer_code_hash in self.by_code_hash:
                return self.by_code_hash[trade.buyer_code_hash]
        return "?"


def codes_in_bytes(data: bytes, codes: set[str]) -> set[str]:
    """The whole codes of `codes` that occur in `data` (as ASCII digits)."""
    if not codes:
        return set()
    lengths = sorted({len(code) for code in codes})
    found: set[str] = set()
    for run in re.finditer(rb"\d{%d,}" % lengths[0], data):
        digits = run.group().decode("ascii")
        for n in lengths:
            for start in range(len(digits) - n + 1):
                if digits[start : start + n] in codes:
                    found.add(digits[start : start + n])
    return found


def codes_in_file(path: Path, codes: set[str], chunk: int = 8 << 20) -> set[str]:
    """The whole codes of `codes` anywhere in the file at `path` (a whole disk image: read in
    chunks that overlap by a code's length, its holes skipped)."""
    if not codes:
        return set()
    overlap = max(len(code) for code in codes)
    ordered = sorted(codes)
    common = next(
        (
            i
            for i, pair in enumerate(zip(ordered[0], ordered[-1], strict=False))
            if len(set(pair)) > 1
        ),
        min(len(ordered[0]), len(ordered[-1])),
    )
    prefix = ordered[0][:common].encode("ascii")
    lengths = sorted({len(code) for code in codes})

    def scan(data: bytes) -> set[str]:
        if len(prefix) < 4:
            return codes_in_bytes(data, codes)
        # The codes' common prefix is found at memchr speed; only there are codes compared.
        hits: set[str] = set()
        at = data.find(prefix)
        while at >= 0:
            for n in lengths:
                candidate = data[at : at + n].decode("ascii", "replace")
                if candidate in codes:
                    hits.add(candidate)
            at = data.find(prefix, at + 1)
        return hits

    found: set[str] = set()
    with open(path, "rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # no data after offset (ENXIO), or no SEEK_DATA here
                if offset:
                    break
            data = os.pread(fd, chunk + overlap, offset)
            if not data:
                break
            found |= scan(data)
            offset += chunk
    return found


def codes_on_disk(state_dir: Path, codes: set[str]) -> list[tuple[str, str]]:
    """(file name, code) for each whole payment code found in a file under `state_dir`
    (the journal, its WAL and SHM, anything else)."""
    hits: list[tuple[str, str]] = []
    for path in sorted(state_dir.rglob("*")):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed meanwhile
        hits += [(path.name, code) for code in sorted(codes_in_bytes(data, codes))]
    return hits


def codes_in_log(lines: Iterable[str], codes: set[str]) -> list[str]:
    found = codes_in_bytes("\n".join(lines).encode("utf-8", "replace"), codes)
    return sorted(mask_code(code) or "" for code in found)


def money_violations(
    sim: GatewaySimulator,
    rows: list[dict[str, Any]],
    vended: set[str],
    who: Attribution,
) -> list[str]:
    """SPEC section 1, once the journal is worked off. Each line: `label: what (ref)`."""
    out: list[str] = []

    def say(ref: str, what: str) -> None:
        out.append(f"{who.of(ref, sim)}: {what} ({ref})")

    trades = sim.ledger.trades()
    ledger = {t.partner_trans_id: t for t in trades}
    answers = sim.answers_sent
    journal = {row["ref"]: row for row in rows}
    holding = {t.partner_trans_id for t in trades if t.holds_money}

    # A person is needed only where Alipay really refused to give money back: a signed refund
    # refusal for this trade, and the trade still holds money.
    refused = {
        a.trade
        for a in answers
        if a.service == "refund"
        and a.signed
        and a.about == a.trade
        and a.fields.get("result_code") == "FAILED"
    }
    attention_ok = {
        ref
        for ref, row in journal.items()
        if row["state"] == "attention" and ref in holding and ref in refused
    }
    for ref, row in journal.items():
        if row["state"] == "attention" and ref not in attention_ok:
            why = "no signed refund refusal" if ref not in refused else "the trade holds no money"
            trade = ledger.get(ref)
            shown = (
                "no trade" if trade is None else f"trade {trade.status}, held={trade.holds_money}"
            )
            say(ref, f"attention without a real reason ({why}; ledger: {shown})")
        elif not row["final"] and row["state"] != "attention":
            say(ref, f"unfinished in state {row['state']} (code {row['code']})")

    # Rule 1: no goods without money. Rule 2: no money without goods.
    for ref in sorted(vended - holding):
        trade = ledger.get(ref)
        shown = "no trade" if trade is None else f"trade {trade.status}, charged={trade.charged}"
        say(ref, f"vended without money ({shown})")
    for ref in sorted(holding - vended - attention_ok):
        state = journal[ref]["state"] if ref in journal else "not in the journal"
        say(ref, f"money without a vend (journal: {state})")
    journal_vended = {ref for ref, row in journal.items() if row["state"] == "vended"}
    for ref in sorted(journal_vended - vended):
        say(ref, "journal says vended, the controller never dispensed")
    for ref in sorted(vended - journal_vended):
        state = journal[ref]["state"] if ref in journal else "not in the journal"
        say(ref, f"the controller dispensed, journal says {state}")

    # Rule 3: one scan, at most one charge.
    charged = Counter(t.buyer_code_hash for t in trades if t.charged)
    for trade in trades:
        if trade.charged and charged[trade.buyer_code_hash] > 1:
            say(trade.partner_trans_id, "a code charged more than once")
    for trade in trades:
        if trade.partner != PARTNER:
            say(trade.partner_trans_id, f"a trade for another partner {trade.partner}")

    # Rule 5: outcomes are never guessed. A sale ends `declined` only on a signed refusal
    # about it (a pay FAILED, or a query TRADE_CLOSED), or as OFFLINE when its pay never
    # reached the gateway; `refunded` only where money was taken.
    pays = {s.params.get("partner_trans_id") for s in sim.requests_seen if s.service == "pay"}
    proof: dict[str, list[str]] = {}
    for a in answers:
        if a.trade is None or not a.signed or a.about != a.trade:
            continue
        refusal = (
            a.service == "pay"
            and a.fields.get("result_code") == "FAILED"
            and a.fields.get("error") != "SYSTEM_ERROR"
        ) or (a.service == "query" and a.fields.get("alipay_trans_status") == "TRADE_CLOSED")
        if refusal:
            proof.setdefault(a.trade, []).append(a.service)
    for ref, row in journal.items():
        if row["state"] == "declined":
            if row["code"] == "OFFLINE":
                if ref in pays:
                    say(ref, "declined OFFLINE, but its pay reached the gateway")
            elif ref not in proof:
                say(ref, f"declined ({row['code']!r:.40}) without a signed refusal")
        if row["state"] == "refunded":
            trade = ledger.get(ref)
            if trade is None or not trade.charged:
                say(ref, "refunded, but never charged (a never-paid trade ends cancelled)")
    return out


def by_kind(lines: Iterable[str]) -> Mapping[str, int]:
    """How many violations each fault kind has (the label's kind part)."""
    return Counter(line.split(":", 1)[0].split(" ", 1)[-1].split("[", 1)[0] for line in lines)
