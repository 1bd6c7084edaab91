"""`kiosk run` with a timestamp at each step of a sale, for bench_scan_to_approved.py.

Started as `python bench/kiosk_traced.py python -m kiosk run ARGS` (the rig's `wrap`): it wraps
a few of the kiosk's own functions, each to note `time.monotonic()` (CLOCK_MONOTONIC, the same
clock in every process here, so the bench can set its own moments beside them), and then runs
`kiosk run ARGS` unchanged. At exit it writes one JSON object per sale to $KIOSK_BENCH_TRACE.

Marks, in the order a paid sale passes them: `scanned` (the scanner handed the line to the
core), `sale` (the sale thread took it), `journaled` (the transaction committed) and `signed`
(the pay signed, on the client's signing thread, beside that commit), `sending` (the request
about to leave), `answered` (the answer's bytes are in), `parsed`, `verified`, `committed`
(VENDING committed), `approved` (the APPROVED line written to the port).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TRACE_ENV = "KIOSK_BENCH_TRACE"


class _Trace:
    def __init__(self) -> None:
        self.sales: list[dict[str, Any]] = []
        self.scanned: float | None = None  # the last line the scanner delivered
        self.current: dict[str, Any] | None = None  # the sale in hand, on the sale's thread
        self.sale_thread: threading.Thread | None = None

    def mark(self, name: str, any_thread: bool = False) -> None:
        """Note `name` for the sale in hand; from its own thread only unless `any_thread` (a
        step only the sale takes, wherever it runs)."""
        current = self.current
        if current is None:
            return
        if not any_thread and threading.current_thread() is not self.sale_thread:
            return  # the journal worker, a probe: not the sale being timed
        current.setdefault(name, time.monotonic())


TRACE = _Trace()


def _after(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        TRACE.mark(name)
        return result

    return wrapped


def _around(before: str, after: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        TRACE.mark(before)
        result = fn(*args, **kwargs)
        TRACE.mark(after)
        return result

    return wrapped


def install(path: str) -> None:
    from drivers.vend_serial import SerialVendOutput
    from kiosk.alipay import client
    from kiosk.daemon import Kiosk
    from kiosk.journal import Journal
    from kiosk.payment import PaymentFlow

    on_scan = Kiosk.on_scan

    def traced_on_scan(self: Kiosk, text: str) -> None:
        TRACE.scanned = time.monotonic()
        on_scan(self, text)

    sell = PaymentFlow.sell

    def traced_sell(self: PaymentFlow, *args: Any, **kwargs: Any) -> Any:
        TRACE.sale_thread = threading.current_thread()
        TRACE.current = {"scanned": TRACE.scanned, "sale": time.monotonic()}
        try:
            return sell(self, *args, **kwargs)
        finally:
            if TRACE.current is not None:
                TRACE.sales.append(TRACE.current)
            TRACE.current = None

    open_transaction = Journal.open_transaction

    def traced_open(self: Journal, **kwargs: Any) -> Any:
        txn = open_transaction(self, **kwargs)
        TRACE.mark("journaled")
        if TRACE.current is not None and threading.current_thread() is TRACE.sale_thread:
            TRACE.current["ref"] = txn.ref
        return txn

    update = Journal.update

    def traced_update(self: Journal, *args: Any, **kwargs: Any) -> Any:
        txn = update(self, *args, **kwargs)
        if TRACE.current is not None and "verified" in TRACE.current:
            TRACE.mark("committed")
        return txn

    send = SerialVendOutput._send

    def traced_send(self: SerialVendOutput, line: bytes) -> bool:
        sent = send(self, line)
        if line.startswith(b"APPROVED "):
            TRACE.mark("approved")
        return sent

    pay_params = client.AlipayClient.pay_params

    def traced_pay_params(self: client.AlipayClient, order: Any) -> Any:
        params = pay_params(self, order)
        TRACE.mark("signed", any_thread=True)  # only a sale pays, on the signing thread
        return params

    call = client.AlipayClient._call

    def traced_call(self: client.AlipayClient, *args: Any, **kwargs: Any) -> Any:
        TRACE.mark("sending")
        return call(self, *args, **kwargs)

    Kiosk.on_scan = traced_on_scan  # type: ignore[method-assign]
    PaymentFlow.sell = traced_sell  # type: ignore[method-assign]
    Journal.open_transaction = traced_open  # type: ignore[method-assign]
    Journal.update = traced_update  # type: ignore[method-assign]
    SerialVendOutput._send = traced_send  # type: ignore[method-assign]
    client.AlipayClient.pay_params = traced_pay_params  # type: ignore[method-assign]
    client.AlipayClient._call = traced_call  # type: ignore[method-assign]
    client.parse_answer = _around("answered", "parsed", client.parse_answer)
    client.verify_answer = _after("verified", client.verify_answer)

    def dump() -> None:
        with open(path, "w") as f:
            for sale in TRACE.sales:
                f.write(json.dumps(sale) + "\n")

    atexit.register(dump)


def main() -> int:
    argv = sys.argv[1:]
    # The rig's own command follows: `python -m kiosk ARGS`.
    at = argv.index("kiosk") if "kiosk" in argv else -1
    if at < 1 or argv[at - 1] != "-m":
        print("usage: kiosk_traced.py PYTHON -m kiosk ARGS", file=sys.stderr)
        return 2
    from kiosk.cli import main as kiosk_main
    from kiosk.cli import without_text_guessing

    without_text_guessing()  # as `kiosk run` does first: install() loads requests
    install(os.environ[TRACE_ENV])

    return kiosk_main(argv[at + 1 :])


if __name__ == "__main__":
    sys.exit(main())
