"""The serial vend protocol's parser, framer and formatters (SPEC section 4)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiosk import vmc_protocol as vmc
from kiosk.errors import VendProtocolError


def reason_of(raw: bytes, currency: str = "USD") -> str:
    with pytest.raises(VendProtocolError) as caught:
        vmc.parse_vmc_line(raw, currency)
    return caught.value.reason


# -- parsing the controller's lines -------------------------------------------------------


def test_ping_parses() -> None:
    assert vmc.parse_vmc_line(b"PING\n", "USD") == vmc.Ping()


def test_cancel_parses() -> None:
    assert vmc.parse_vmc_line(b"CANCEL", "USD") == vmc.Cancel()


def test_vend_parses_item_and_decimal_amount() -> None:
    message = vmc.parse_vmc_line(b"VEND coffee-2 1.50\n", "USD")
    assert message == vmc.Vend("coffee-2", Decimal("1.50"))
    assert isinstance(message.amount, Decimal)


def test_vend_amount_in_a_zero_digit_currency() -> None:
    assert vmc.parse_vmc_line(b"VEND tea 150\n", "JPY") == vmc.Vend("tea", Decimal("150"))


def test_success_and_failure_carry_the_ref() -> None:
    assert vmc.parse_vmc_line(b"SUCCESS K42-0001\n", "USD") == vmc.Success("K42-0001")
    assert vmc.parse_vmc_line(b"FAILURE K42-0001\n", "USD") == vmc.Failure("K42-0001")


def test_carriage_return_before_newline_is_ignored() -> None:
    assert vmc.parse_vmc_line(b"PING\r\n", "USD") == vmc.Ping()


def test_carriage_return_inside_the_line_is_not_ignored() -> None:
    assert reason_of(b"PI\rNG\n") == vmc.UNKNOWN_VERB


@pytest.mark.parametrize("raw", [b"HELLO\n", b"ping\n", b"PONG\n", b"APPROVED x 1.50\n"])
def test_unknown_verb_is_refused(raw: bytes) -> None:
    assert reason_of(raw) == vmc.UNKNOWN_VERB


@pytest.mark.parametrize(
    "raw",
    [
        b"PING now\n",
        b"VEND coffee\n",
        b"VEND coffee 1.50 extra\n",
        b"VEND  coffee 1.50\n",  # two spaces: an empty field
        b"SUCCESS\n",
        b"FAILURE a b\n",
        b"CANCEL \n",  # trailing space
    ],
)
def test_wrong_field_count_is_refused(raw: bytes) -> None:
    assert reason_of(raw) == vmc.BAD_FIELDS


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("1.5", "USD"), ("1.500", "USD"), ("1", "USD"), ("1.50", "JPY"), ("0.00", "USD"),
     ("-1.00", "USD"), ("1,50", "USD"), ("1.50e0", "USD"), ("+1.50", "USD"), ("1.50", "KWD")],
)  # fmt: skip
def test_amount_without_exactly_the_minor_digits_is_refused(amount: str, currency: str) -> None:
    assert reason_of(f"VEND coffee {amount}\n".encode(), currency) == vmc.BAD_AMOUNT


def test_three_digit_currency_needs_three_digits() -> None:
    assert vmc.parse_vmc_line(b"VEND tea 1.500\n", "KWD") == vmc.Vend("tea", Decimal("1.500"))
    assert reason_of(b"VEND tea 1.50\n", "KWD") == vmc.BAD_AMOUNT


@pytest.mark.parametrize("item", ["a.b", "x" * 33, "a/b", "tab\there"])
def test_bad_item_is_refused(item: str) -> None:
    assert reason_of(f"VEND {item} 1.50\n".encode()) == vmc.BAD_ITEM


def test_item_of_32_characters_is_accepted() -> None:
    assert vmc.parse_vmc_line(b"VEND " + b"x" * 32 + b" 1.50", "USD").item == "x" * 32


def test_line_of_128_bytes_is_not_too_long_but_129_is() -> None:
    # Whitespace padding keeps the line otherwise wrong, so only the length check differs.
    assert reason_of(b"PING" + b" " * 124 + b"\r\n") == vmc.BAD_FIELDS
    assert reason_of(b"PING" + b" " * 125 + b"\r\n") == vmc.TOO_LONG


def test_longest_valid_vend_line_parses() -> None:
    assert vmc.parse_vmc_line(b"VEND " + b"x" * 32 + b" 100000000.00\r\n", "USD").item == "x" * 32


def test_non_ascii_is_refused() -> None:
    assert reason_of("VEND café 1.50\n".encode()) == vmc.NOT_ASCII


def test_ref_longer_than_64_is_refused() -> None:
    assert reason_of(b"SUCCESS " + b"r" * 65 + b"\n") == vmc.BAD_REF


def test_blank_line_is_reported_as_empty() -> None:
    assert reason_of(b"\r\n") == vmc.EMPTY


@given(st.binary(max_size=300), st.sampled_from(["USD", "JPY", "KWD"]))
def test_arbitrary_bytes_never_raise_anything_but_vend_protocol_error(
    raw: bytes, currency: str
) -> None:
    try:
        vmc.parse_vmc_line(raw, currency)
    except VendProtocolError as exc:
        assert vmc.err(exc.reason).startswith(b"ERR ")


@given(st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True), st.integers(1, 10**9 - 1))
def test_any_valid_vend_round_trips(item: str, cents: int) -> None:
    amount = Decimal(cents).scaleb(-2)
    line = f"VEND {item} {amount}\n".encode()
    assert vmc.parse_vmc_line(line, "USD") == vmc.Vend(item, amount)


# -- framing ------------------------------------------------------------------------------


def test_framer_joins_a_line_split_across_reads() -> None:
    framer = vmc.LineFramer()
    assert framer.feed(b"PI") == []
    assert framer.feed(b"NG\r\nVEND a 1.") == [b"PING\r"]
    assert framer.feed(b"50\n") == [b"VEND a 1.50"]


def test_framer_discards_an_overlong_line_up_to_its_newline() -> None:
    framer = vmc.LineFramer()
    assert framer.feed(b"x" * 100) == []
    assert framer.feed(b"x" * 100) == []
    assert framer.feed(b"x" * 1000) == []
    assert framer.feed(b"xx\nPING\n") == [None, b"PING"]


def test_framer_reports_an_overlong_line_that_arrives_in_one_read() -> None:
    assert vmc.LineFramer().feed(b"y" * 500 + b"\nPING\n") == [None, b"PING"]


def test_framer_keeps_a_line_of_exactly_128_bytes_with_crlf() -> None:
    line = b"z" * 128
    assert vmc.LineFramer().feed(line + b"\r\n") == [line + b"\r"]


def test_framer_reset_forgets_a_half_line() -> None:
    framer = vmc.LineFramer()
    framer.feed(b"GARB")
    framer.reset()
    assert framer.feed(b"PING\n") == [b"PING"]


# -- the kiosk's lines ----------------------------------------------------------------------


def test_fixed_lines() -> None:
    assert vmc.pong() == b"PONG\n"
    assert vmc.ok() == b"OK\n"
    assert vmc.busy() == b"BUSY\n"
    assert vmc.cancelled() == b"CANCELLED\n"
    assert vmc.timeout() == b"TIMEOUT\n"


def test_lines_with_a_token() -> None:
    assert vmc.out_of_service("OFFLINE") == b"OUT_OF_SERVICE OFFLINE\n"
    assert vmc.denied("CODE_REUSED") == b"DENIED CODE_REUSED\n"
    assert vmc.ack("K42-0001") == b"ACK K42-0001\n"
    assert vmc.err("bad-amount") == b"ERR bad-amount\n"


def test_approved_uses_the_currency_minor_digits() -> None:
    assert vmc.approved("K1", Decimal("1.50"), "USD") == b"APPROVED K1 1.50\n"
    assert vmc.approved("K1", Decimal("150"), "JPY") == b"APPROVED K1 150\n"
    assert vmc.approved("K1", Decimal("2"), "USD") == b"APPROVED K1 2.00\n"


def test_approved_refuses_to_round_an_amount() -> None:
    with pytest.raises(ValueError):
        vmc.approved("K1", Decimal("1.505"), "USD")


@pytest.mark.parametrize("reason", ["two words", "", "café", "x\n"])
def test_a_reason_that_would_split_the_line_is_refused(reason: str) -> None:
    with pytest.raises(ValueError):
        vmc.denied(reason)


@pytest.mark.parametrize(
    ("answer", "line"),
    [("OK", b"OK\n"), ("BUSY", b"BUSY\n"), ("CANCELLED", b"CANCELLED\n"),
     ("TIMEOUT", b"TIMEOUT\n"), ("OUT_OF_SERVICE OFFLINE", b"OUT_OF_SERVICE OFFLINE\n")],
)  # fmt: skip
def test_vend_answers(answer: str, line: bytes) -> None:
    assert vmc.vend_answer(answer) == line


@pytest.mark.parametrize("answer", ["APPROVED x 1.00", "OK now", "OUT_OF_SERVICE", "ok"])
def test_anything_else_is_not_a_vend_answer(answer: str) -> None:
    with pytest.raises(ValueError):
        vmc.vend_answer(answer)


def test_every_kiosk_line_parses_as_ascii_within_the_limit() -> None:
    longest = vmc.approved("r" * 64, Decimal("100000000.00"), "USD")
    assert longest.isascii() and len(longest) - 1 <= vmc.MAX_LINE
