"""Money as Decimal, formatted with exactly the currency's minor digits."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from kiosk.iso4217 import CURRENCIES

CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
MIN_AMOUNT = Decimal("0.01")
MAX_AMOUNT = Decimal("100000000.00")


def minor_digits(currency: str) -> int:
    """How many digits follow the decimal point in this currency's amounts."""
    known = CURRENCIES.get(currency)
    return known.minor_digits if known else 2


def format_amount(amount: Decimal, currency: str) -> str:
    """The amount as Alipay and the VMC see it: '1.50' USD, '150' JPY."""
    digits = minor_digits(currency)
    quantum = Decimal(1).scaleb(-digits)
    return str(amount.quantize(quantum))


def parse_amount(text: str, currency: str) -> Decimal:
    """Parse an amount that must carry exactly the currency's minor digits.

    Raises ValueError with a precise message otherwise ("1.5" is not a USD amount).
    """
    digits = minor_digits(currency)
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", text):
        # A number, even with the wrong digits: say what is wrong with its size first.
        if Decimal(text) <= 0:
            raise ValueError(f"{text!r} must be more than zero")
        if Decimal(text) > MAX_AMOUNT:
            raise ValueError(f"{text!r} is over Alipay's limit of {MAX_AMOUNT}")
    pattern = r"^\d{1,9}$" if digits == 0 else rf"^\d{{1,9}}\.\d{{{digits}}}$"
    if not re.fullmatch(pattern, text):
        example = "150" if digits == 0 else "1." + "5".ljust(digits, "0")
        raise ValueError(
            f"{text!r} is not a {currency} amount: it needs exactly {digits} minor digits "
            f"(like {example!r})"
        )
    try:
        return Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise ValueError(f"{text!r} is not a number") from exc
