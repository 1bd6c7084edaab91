"""Fuzzing the config file: arbitrary TOML documents and raw text through `check_config` and
`load_config`. Problems come back as `FILE:LINE: message`; nothing else is ever raised."""

from __future__ import annotations

import datetime
import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiosk.config import ConfigInvalid, ConfigProblem, check_config, load_config

FUZZ = settings(
    deadline=None,  # no wall-clock limit: a loaded machine is not a failure
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SECTIONS = ["kiosk", "alipay", "merchant", "sale", "scanner", "indicators", "vend"]
KEYS = {
    "kiosk": ["terminal_id", "state_dir"],
    "alipay": [
        "gateway",
        "backup_gateway",
        "partner",
        "allow_http",
        "seller_id",
        "sign_type",
        "private_key_file",
        "alipay_public_key_file",
        "md5_key_file",
        "ca_bundle",
        "currency",
        "trans_name",
        "pay_timeout_s",
        "query_interval_s",
        "query_deadline_s",
        "probe_interval_s",
    ],
    "merchant": [
        "secondary_merchant_id",
        "store_id",
        "secondary_merchant_name",
        "secondary_merchant_industry",
        "store_name",
    ],
    "sale": ["mode", "price", "item", "scan_timeout_s"],
    "scanner": ["driver", "device", "match", "grab", "layout", "port", "baud"],
    "indicators": ["driver", "green", "red", "amber", "buzzer", "buzzer_type", "active_high"],
    "vend": [
        "driver",
        "port",
        "baud",
        "timeout_s",
        "relay_pin",
        "pulse_ms",
        "sense_pin",
        "sense_timeout_s",
        "relay_active_high",
    ],
}

# Strings that mean something to some key, and strings that break naive code.
_MEANINGFUL = [
    "https://globalmapi.alipay.com/gateway.do",
    "http://127.0.0.1:8080/gateway.do",
    "http://example.com/gateway.do",
    "https://",
    "https://[::1",
    "http://[fe80::1%25eth0]/",
    "https://ｅｘａｍｐｌｅ.com/",
    "2088101122334455",
    "USD",
    "usd",
    "JPY",
    "1.50",
    "150",
    "0.00",
    "RSA2",
    "MD5",
    "rsa2",
    "fixed",
    "vmc",
    "evdev",
    "serial",
    "fake",
    "gpio",
    "relay",
    "none",
    "/dev/null",
    "/dev/ttyAMA10",
    "/etc/kiosk/keys/merchant.pem",
    "keys/none.pem",
    "",
    " ",
    "~",
    "~nosuchuser/keys",
    "a\u0000b",
    "line\nbreak",
    "C:\\keys\\a.pem",
    "é" * 300,
]
toml_strings = st.one_of(st.sampled_from(_MEANINGFUL), st.text(max_size=40))
toml_scalars = st.one_of(
    toml_strings,
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 17, 27, 28, -1, 9600, 10**30, 10**400]),
    st.floats(),  # nan and inf included: TOML has them
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Sections and keys, mostly the real ones, with any value; sometimes a stray top-level key."""
    doc: dict[str, Any] = {}
    names = st.one_of(st.sampled_from(SECTIONS), st.text(min_size=1, max_size=10))
    for name in draw(st.lists(names, max_size=8, unique=True)):
        keys = st.one_of(st.sampled_from(KEYS.get(name, ["x"])), st.text(min_size=1, max_size=10))
        # Meaningful strings first: hypothesis favours the first branch of one_of.
        values = st.one_of(st.sampled_from(_MEANINGFUL), toml_values)
        doc[name] = draw(st.dictionaries(keys, values, max_size=8))
    if draw(st.booleans()):
        doc[draw(st.text(min_size=1, max_size=10))] = draw(toml_scalars)
    return doc


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    escaped = "".join(
        ch if ch.isprintable() and ch not in '"\\' else f"\\U{ord(ch):08X}" for ch in text
    )
    return f'"{escaped}"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return json.dumps(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def render(doc: dict[str, Any]) -> str:
    """The document as TOML text: top-level scalars first, then one [section] per table."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# Every section with most of its keys set, each to a meaningful or arbitrary value: so the
# checks that only run for one key (paths, URLs, durations) see odd values often.
_NASTY: list[Any] = [
    "~nosuchuser/keys",
    "a\u0000b",
    "https://[::1",
    "x" * 300,
    "line\nbreak",
    "https://ｅｘａｍｐｌｅ.com/",
    10**400,
    float("nan"),
]
_ANY_VALUE = st.one_of(st.sampled_from(_NASTY), st.sampled_from(_MEANINGFUL), toml_scalars)
full_documents = st.fixed_dictionaries(
    {
        name: st.fixed_dictionaries({}, optional={key: _ANY_VALUE for key in keys})
        for name, keys in KEYS.items()
    }
)

raw_texts = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.one_of(
            st.sampled_from(["[kiosk]", "[alipay]", "[[x]]", "[", "]", '"""', "'''", "=", "#"]),
            st.sampled_from(['terminal_id = "T"', "baud = 0x10", "a = [[[[1]]]]", "x = {"]),
            st.text(max_size=20),
        ),
        max_size=15,
    ).map("\n".join),
)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kiosk-fuzz-config-") as name:
        yield Path(name)


def check(folder: Path, text: str) -> tuple[Any, list[ConfigProblem]]:
    path = folder / "kiosk.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return check_config(path)


PROBLEM_SHAPE = r"{file}:(\d+):(\d+): (error|warning): [^\n]+"


def assert_sound_problems(path: Path, text: str, problems: list[ConfigProblem]) -> None:
    last_line = max(1, len(text.splitlines()))
    for problem in problems:
        assert 1 <= problem.line <= last_line and problem.column >= 1
        assert problem.file == str(path)
        assert problem.message
        shape = re.fullmatch(PROBLEM_SHAPE.format(file=re.escape(str(path))), str(problem))
        assert shape, f"not FILE:LINE:COL: error: message: {problem}"
    assert [p.line for p in problems] == sorted(p.line for p in problems)


@settings(FUZZ, max_examples=150)
@given(doc=documents())
def test_any_toml_document_gives_problems_with_lines_never_an_exception(
    folder: Path, doc: dict[str, Any]
) -> None:
    text = render(doc)
    _, problems = check(folder, text)
    assert_sound_problems(folder / "kiosk.toml", text, problems)


@settings(FUZZ, max_examples=150)
@given(doc=full_documents)
def test_every_key_with_any_value_gives_problems_never_an_exception(
    folder: Path, doc: dict[str, Any]
) -> None:
    text = render(doc)
    _, problems = check(folder, text)
    assert_sound_problems(folder / "kiosk.toml", text, problems)


@settings(FUZZ, max_examples=150)
@given(text=raw_texts)
def test_any_text_gives_problems_with_lines_never_an_exception(folder: Path, text: str) -> None:
    _, problems = check(folder, text)
    assert_sound_problems(folder / "kiosk.toml", text, problems)


@settings(FUZZ, max_examples=100)
@given(doc=documents())
def test_a_config_comes_back_only_without_errors(folder: Path, doc: dict[str, Any]) -> None:
    config, problems = check(folder, render(doc))
    errors = [p for p in problems if not p.warning]
    assert (config is None) == bool(errors)


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=200))
def test_any_bytes_as_the_config_file_give_problems(folder: Path, data: bytes) -> None:
    path = folder / "kiosk.toml"
    path.write_bytes(data)
    _, problems = check_config(path)
    assert_sound_problems(path, data.decode("utf-8", "replace"), problems)


@settings(FUZZ, max_examples=100)
@given(doc=documents())
def test_load_config_raises_only_config_invalid(folder: Path, doc: dict[str, Any]) -> None:
    path = folder / "kiosk.toml"
    path.write_text(render(doc), encoding="utf-8")
    try:
        load_config(path)
    except ConfigInvalid as exc:
        assert exc.problems


@settings(FUZZ, max_examples=100)
@given(doc=documents())
def test_an_unknown_key_is_reported_on_its_own_line(folder: Path, doc: dict[str, Any]) -> None:
    text = render(doc)
    _, problems = check(folder, text)
    lines = text.splitlines()
    for problem in problems:
        found = re.fullmatch(r"unknown key '([A-Za-z0-9_-]+)' in \[([a-z]+)\]", problem.message)
        if found:
            assert lines[problem.line - 1].startswith(f"{found.group(1)} =")


# -- regression tests: each config once crashed the check with an exception -------------------

BASE = """\
[kiosk]
terminal_id = "T"
[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
"""


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.split("\n"), start=1) if fragment in line)


# (config text, part of the one problem's message, a fragment of its line or None for line 0)
CRASHERS = [
    # tomllib recursed once per nesting level: RecursionError.
    pytest.param(
        "a = " + "[" * 2000 + "]" * 2000 + "\n",
        "nested too deeply",
        "a = [",
        id="nested-arrays",
    ),
    pytest.param(
        '[kiosk]\nterminal_id = "T"\nx = ' + "{a = " * 1000 + "1" + "}" * 1000 + "\n",
        "nested too deeply",
        "x = {",
        id="nested-inline-tables",
    ),
    # tomllib's int() refuses over 4300 digits: ValueError out of tomllib.loads.
    pytest.param(
        BASE + "pay_timeout_s = " + "9" * 5000 + "\n",
        "a number with far too many digits",
        "pay_timeout_s",
        id="integer-over-4300-digits",
    ),
    # math.isfinite(int) raised OverflowError.
    pytest.param(
        BASE + "pay_timeout_s = " + "9" * 400 + "\n",
        "alipay.pay_timeout_s must be at most 86400 seconds (one day), not a number of 400 digits",
        "pay_timeout_s",
        id="huge-duration",
    ),
    # A hex integer parses at any size, but str() of it raised ValueError in the message.
    pytest.param(
        BASE + "trans_name = 0x" + "f" * 5000 + "\n",
        "alipay.trans_name must be a string, not a number of over 4300 digits",
        "trans_name",
        id="huge-hex-integer-as-string",
    ),
    # Path.expanduser raised RuntimeError.
    pytest.param(
        '[kiosk]\nterminal_id = "T"\nstate_dir = "~nosuchuser/state"\n',
        "kiosk.state_dir '~nosuchuser/state': no home directory for its ~nosuchuser",
        "state_dir",
        id="unknown-home",
    ),
    # Path.stat raised ValueError.
    pytest.param(
        BASE + 'private_key_file = "a\\u0000b"\nalipay_public_key_file = "b"\n',
        "alipay.private_key_file 'a\\x00b' holds a NUL character",
        "private_key_file",
        id="nul-in-key-path",
    ),
    # Not a crash in check, but the driver's open() would have raised ValueError at start.
    pytest.param(
        BASE + '[vend]\nport = "/dev/tty\\u0000S0"\n',
        "vend.port '/dev/tty\\x00S0' holds a NUL character",
        "port",
        id="nul-in-device-path",
    ),
    # urlsplit itself raised ValueError.
    pytest.param(
        BASE.replace("https://globalmapi.alipay.com/gateway.do", "https://[::1"),
        "alipay.gateway 'https://[::1' is not a valid URL: Invalid IPv6 URL",
        "gateway",
        id="bad-ipv6-url",
    ),
    # Path.is_file raised OSError ENAMETOOLONG.
    pytest.param(
        BASE + 'ca_bundle = "' + "x" * 300 + '"\n',
        "File name too long",
        "ca_bundle",
        id="long-ca-bundle",
    ),
]


@pytest.mark.parametrize(("text", "message", "at"), CRASHERS)
def test_config_that_crashed_check_gives_a_precise_problem(
    tmp_path: Path, text: str, message: str, at: str
) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text(text, encoding="utf-8")

    config, problems = check_config(path)

    assert config is None
    found = [p for p in problems if message in p.message]
    assert found, [str(p) for p in problems]
    assert found[0].line == line_of(text, at)


def test_config_that_crashed_check_fails_load_with_config_invalid(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text("a = " + "[" * 2000 + "]" * 2000 + "\n", encoding="utf-8")

    with pytest.raises(ConfigInvalid, match="nested too deeply"):
        load_config(path)


def test_over_long_device_path_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text(BASE + '[scanner]\ndriver = "evdev"\ndevice = "/dev/' + "x" * 300 + '"\n')

    _, problems = check_config(path)

    long_name = [p for p in problems if "File name too long" in p.message]
    assert long_name and long_name[0].warning
    assert long_name[0].line == line_of(path.read_text(), "device =")


@pytest.mark.parametrize(
    "text",
    ['["\\n"]\n', BASE + 'ca_bundle = "line\\nbreak"\n', '["\\u2028\\u001b"]\n'],
    ids=["section-name", "path-value", "unicode-break-and-escape"],
)
def test_every_problem_prints_on_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text(text, encoding="utf-8")
    _, problems = check_config(path)
    assert problems and all(str(p).isprintable() for p in problems)
