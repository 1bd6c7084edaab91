"""Rule 6 in the log beyond the kiosk's own events: a library's plain message and an
exception's text (its message and traceback) come out with any whole payment code masked to
its last 4 digits, in the JSON lines of the service and in the text lines of a terminal."""

from __future__ import annotations

import json
import logging

import pytest

from kiosk.log import JsonFormatter, TextFormatter

CODE = "281234567890120001"


def _records() -> list[logging.LogRecord]:
    plain = logging.LogRecord(
        "urllib3", logging.WARNING, __file__, 1, "retrying %s", (f"code={CODE}",), None
    )
    try:
        raise RuntimeError(f"unexpected answer for {CODE}")
    except RuntimeError:
        import sys

        failed = logging.LogRecord(
            "kiosk", logging.ERROR, __file__, 2, "thread %s died", ("sale",), sys.exc_info()
        )
    return [plain, failed]


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter(timestamps=True)])
def test_no_whole_code_in_a_plain_message_or_an_exception(formatter: logging.Formatter) -> None:
    lines = [formatter.format(record) for record in _records()]
    text = "\n".join(lines)
    assert CODE not in text
    assert text.count("**************0001") == 2  # the library's message, the exception's
    if isinstance(formatter, JsonFormatter):
        failed = json.loads(lines[1])
        assert "RuntimeError: unexpected answer for **************0001" in failed["exception"]
        assert "Traceback (most recent call last)" in failed["exception"]
