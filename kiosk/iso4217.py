"""ISO 4217 currencies the kiosk may meet: alpha code, numeric code, minor digits, and whether
Alipay's cross-border acquiring settles in it.

The numeric code is what an MDB cashless device announces to the vending machine (`0x1` then
the code as three BCD digits: USD 840 is `0x1840`); `mdb_currency_code` makes it.

`settled` follows the settlement currencies Alipay lists for merchants of its overseas
acquiring (MAPI `alipay.acquire.overseas.spot.pay`, "Settlement currencies" in Alipay Global's
merchant documentation): USD, EUR, GBP, HKD, JPY, KRW, SGD, AUD, CAD, CHF, NZD, THB, MYR, SEK,
NOK, DKK and CNY. Every one of them has 0 or 2 minor digits. The other rows are common codes a
technician may type; they are refused with the reason instead of "unknown code". Minor digits
are ISO 4217's (amendment 176); a three-digit currency is refused by the kiosk, since Alipay's
`trans_amount` carries at most two.
"""

from __future__ import annotations

from typing import NamedTuple


class Currency(NamedTuple):
    alpha: str
    numeric: int
    minor_digits: int
    settled: bool  # Alipay's cross-border acquiring settles in it


_ROWS = """
AED 784 2 -   AUD 036 2 y   BHD 048 3 -   BRL 986 2 -   CAD 124 2 y   CHF 756 2 y
CLP 152 0 -   CNY 156 2 y   CZK 203 2 -   DKK 208 2 y   EUR 978 2 y   GBP 826 2 y
HKD 344 2 y   HUF 348 2 -   IDR 360 2 -   ILS 376 2 -   INR 356 2 -   IQD 368 3 -
ISK 352 0 -   JOD 400 3 -   JPY 392 0 y   KRW 410 0 y   KWD 414 3 -   LKR 144 2 -
LYD 434 3 -   MOP 446 2 -   MUR 480 2 -   MXN 484 2 -   MYR 458 2 y   NOK 578 2 y
NZD 554 2 y   OMR 512 3 -   PHP 608 2 -   PKR 586 2 -   PLN 985 2 -   PYG 600 0 -
QAR 634 2 -   RUB 643 2 -   SAR 682 2 -   SEK 752 2 y   SGD 702 2 y   THB 764 2 y
TND 788 3 -   TRY 949 2 -   TWD 901 2 -   UGX 800 0 -   USD 840 2 y   VND 704 0 -
ZAR 710 2 -
"""


def _table() -> dict[str, Currency]:
    words = _ROWS.split()
    rows = [words[i : i + 4] for i in range(0, len(words), 4)]
    return {a: Currency(a, int(n), int(d), s == "y") for a, n, d, s in rows}


CURRENCIES: dict[str, Currency] = _table()
SETTLED: tuple[str, ...] = tuple(sorted(c.alpha for c in CURRENCIES.values() if c.settled))

# Every active ISO 4217 alpha code, to tell a real currency Alipay does not settle from a typo.
ISO_CODES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP
    MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
    TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW
    ZWG
    """.split()  # noqa: SIM905
) | frozenset(CURRENCIES)


def numeric_code(currency: str) -> int:
    """The ISO 4217 numeric code of an upper-case alphabetic code ("USD" -> 840).

    Raises ValueError for a currency this table does not hold.
    """
    known = CURRENCIES.get(currency)
    if known is None:
        raise ValueError(
            f"{currency!r} has no ISO 4217 numeric code here (known: {', '.join(CURRENCIES)})"
        )
    return known.numeric


def mdb_currency_code(currency: str) -> str:
    """The reader's MDB currency code: "USD" -> "0x1840". ValueError as `numeric_code`."""
    return f"0x1{numeric_code(currency):03d}"
