"""Structured logs: every line is an event with fields, to stderr (journald takes it).

`event(log, "payment.result", ref=ref, outcome="declined")` logs
`event=payment.result ref=... outcome=declined` as text, or one JSON object per line with
`--log-format json`. Never pass a whole payment code or key material as a field: use
`mask_code()`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_FIELDS = "kiosk_fields"


def mask_code(code: str | None) -> str | None:
    """A payment code as it may appear anywhere outside the journal: only the last 4 digits."""
    if code is None:
        return None
    return "*" * max(len(code) - 4, 0) + code[-4:]


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields."""
    log.log(level, name, extra={_FIELDS: {"event": name, **fields}})


class TextFormatter(logging.Formatter):
    """`event=... key=value` lines. `timestamps` prefixes local time for a person at a
    terminal; journald stamps each line itself, so the service's lines carry none."""

    def __init__(self, timestamps: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, _FIELDS, None)
        if fields is None:
            text = record.getMessage()
        else:
            text = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        line = f"{record.levelname.lower()} {record.name}: {text}"
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            line = f"{stamp}.{int(record.msecs):03d} {line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, _FIELDS, None)
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if fields is None:
            obj["event"] = "message"
            obj["message"] = record.getMessage()
        else:
            obj.update(fields)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or text == "") else text


def under_systemd() -> bool:
    """Started by systemd (a service: journald stamps and keeps what we print)."""
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))


def _in_terminal() -> bool:
    if under_systemd():
        return False  # journald has the time
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send the kiosk's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else TextFormatter(timestamps=_in_terminal())
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # requests/urllib3 debug lines can carry full request URLs; keep them quiet.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
