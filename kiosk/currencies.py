"""ISO 4217 numeric codes for the currencies a kiosk may charge in.

An MDB cashless device announces its currency to the vending machine as a number (`0x1` then
the ISO 4217 numeric code as three BCD digits: USD 840 is `0x1840`), so the config check and
the MDB driver need the numeric code of `alipay.currency`. One table, here; a currency missing
from it is refused by the check rather than announced wrong.
"""

from __future__ import annotations

# Alipay's settlement currencies and the ones its partners commonly price in (ISO 4217).
ISO_NUMERIC: dict[str, int] = {
    "AED": 784,
    "AUD": 36,
    "BDT": 50,
    "BHD": 48,
    "BRL": 986,
    "CAD": 124,
    "CHF": 756,
    "CLP": 152,
    "CNY": 156,
    "CZK": 203,
    "DKK": 208,
    "EUR": 978,
    "GBP": 826,
    "HKD": 344,
    "HUF": 348,
    "IDR": 360,
    "ILS": 376,
    "IQD": 368,
    "ISK": 352,
    "JOD": 400,
    "JPY": 392,
    "KRW": 410,
    "KWD": 414,
    "KZT": 398,
    "LKR": 144,
    "LYD": 434,
    "MNT": 496,
    "MOP": 446,
    "MXN": 484,
    "MYR": 458,
    "NOK": 578,
    "NPR": 524,
    "NZD": 554,
    "OMR": 512,
    "PHP": 608,
    "PKR": 586,
    "PLN": 985,
    "PYG": 600,
    "QAR": 634,
    "RUB": 643,
    "SAR": 682,
    "SEK": 752,
    "SGD": 702,
    "THB": 764,
    "TND": 788,
    "TRY": 949,
    "TWD": 901,
    "UGX": 800,
    "USD": 840,
    "VND": 704,
    "ZAR": 710,
}


def numeric_code(currency: str) -> int:
    """The ISO 4217 numeric code of an upper-case alphabetic code ("USD" → 840).

    Raises ValueError for a currency this table does not hold.
    """
    try:
        return ISO_NUMERIC[currency]
    except KeyError:
        known = ", ".join(sorted(ISO_NUMERIC))
        raise ValueError(
            f"{currency!r} has no ISO 4217 numeric code here (known: {known})"
        ) from None
