"""Structured logs: every line is an event with fields, to stderr (journald takes it).

`event(log, "payment.result", ref=ref, outcome="declined")` logs
`event=payment.result ref=... outcome=declined` as text, or one JSON object per line with
`--log-format json`. Never pass a whole payment code or key material as a field: use
`mask_code()`. As a backstop, `event()` masks anything in a string field that could be a
payment code (`mask_codes()`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

_FIELDS = "kiosk_fields"


def mask_code(code: str | None) -> str | None:
    """A payment code as it may appear anywhere outside the journal: only the last 4 digits."""
    if code is None:
        return None
    return "*" * max(len(code) - 4, 0) + code[-4:]


def mask_partial(text: str) -> str:
    """A half-read scan as it may be logged: no digit at all. Its last 4 are a code's middle
    digits when the line was cut short, and with the rescan's last 4 they would give away 8."""
    return re.sub(r"[0-9]", "*", text)


# A maximal run of digits long enough to be (or to hold) a payment code.
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]{16,}(?![0-9])")
_CODE_FIRST_TWO = range(25, 31)  # Alipay payment codes are 16-24 digits starting 25-30
_CODE_LENGTHS = range(16, 25)
_TRADE_ID_PREFIX = "20"  # Alipay trade ids (and dates) start with 20; they stay readable


def _mask_run(match: re.Match[str]) -> str:
    run = match.group()
    if len(run) in _CODE_LENGTHS:
        looks_like_code = int(run[:2]) in _CODE_FIRST_TWO
    else:  # longer than any code: it may hold one, unless it is an Alipay trade id
        looks_like_code = not run.startswith(_TRADE_ID_PREFIX)
    return "*" * (len(run) - 4) + run[-4:] if looks_like_code else run


def mask_codes(text: str) -> str:
    """`text` with every run of digits that could be a payment code masked to its last 4
    digits (`************1234`), wherever it stands in the text. For text that came from
    outside (a gateway's error message) on its way to a log line or the disk."""
    return _DIGIT_RUN.sub(_mask_run, text)


def _drop_run(match: re.Match[str]) -> str:
    masked = _mask_run(match)
    return match.group() if masked == match.group() else "[code removed]"


def drop_codes(text: str) -> str:
    """`text` with every run of digits that could be a payment code removed whole, not even
    its last 4 digits left: for what leaves the kiosk (telemetry, SPEC section 8)."""
    return _DIGIT_RUN.sub(_drop_run, text)


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields. String fields pass through `mask_codes()`."""
    masked = {k: mask_codes(v) if isinstance(v, str) else v for k, v in fields.items()}
    log.log(level, name, extra={_FIELDS: {"event": name, **masked}})


class TextFormatter(logging.Formatter):
    """`event=... key=value` lines. `timestamps` prefixes local time for a person at a
    terminal; journald stamps each line itself, so the service's lines carry none."""

    def __init__(self, timestamps: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, _FIELDS, None)
        if fields is None:
            text = mask_codes(record.getMessage())
        else:
            text = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        line = f"{record.levelname.lower()} {record.name}: {text}"
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            line = f"{stamp}.{int(record.msecs):03d} {line}"
        if record.exc_info:
            line += "\n" + mask_codes(self.formatException(record.exc_info))
        return line


# One encoder for every line (json.dumps with options makes a new one per call).
_to_json = json.JSONEncoder(default=str, ensure_ascii=False).encode


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
            obj["message"] = mask_codes(record.getMessage())
        else:
            obj.update(fields)
        if record.exc_info:
            obj["exception"] = mask_codes(self.formatException(record.exc_info))
        return _to_json(obj)


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


# syslog priorities (sd-daemon(3)): journald reads a "<N>" prefix on each line of a stream.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority_of(level: int) -> int:
    for floor, priority in _PRIORITIES:
        if level >= floor:
            return priority
    return 7  # debug


def stderr_is_journal(environ: dict[str, str] | None = None, stream: Any = None) -> bool:
    """Whether stderr is journald's stream: $JOURNAL_STREAM names its device and inode
    (systemd.exec(5)), and they match, so a redirected stderr gets no prefixes."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        found = os.fstat((stream or sys.stderr).fileno())
    except (OSError, AttributeError, ValueError):
        return False
    return (found.st_dev, found.st_ino) == (int(dev), int(ino))


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines to stderr; with `priorities`, every line starts with journald's `<N>`, so
    `journalctl -p err` finds the errors (a traceback's lines carry its record's priority)."""

    def __init__(self, priorities: bool = False) -> None:
        super().__init__(sys.stderr)
        self.priorities = priorities

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.priorities:
            return text
        prefix = f"<{priority_of(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send the kiosk's logs, and whatever libraries say (warnings, urllib3, paho, a thread's
    uncaught exception), to stderr in the chosen format: with "json", every line is one JSON
    object. Under journald each line carries its priority."""
    handler = StderrHandler(priorities=stderr_is_journal())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else TextFormatter(timestamps=_in_terminal())
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # requests/urllib3 debug lines can carry full request URLs; keep them quiet.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # warnings.warn(...) from any library becomes a log record (logger py.warnings), not a
    # bare line on stderr.
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    # No line says where in the code, or in which thread or process, it was logged: records
    # made without that skip a walk up the stack and three look-ups each (the logging HOWTO's
    # "Optimization"); a sale makes a dozen of them on its way to APPROVED.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """A thread that died of an exception: one log record with the traceback, not Python's
    bare print to stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("kiosk").error(
        "thread %s died",
        name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


class _LogThread(logging.Handler):
    """Formats and writes records on a thread of its own: whoever logs (a sale on its way to
    APPROVED) only hands the record over. Records keep their order and their time of logging
    (`record.created`); `close()` writes what is still queued."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(target.level)
        self.setFormatter(target.formatter)  # what the format is, for whoever asks
        self._target = target
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: a put on a SimpleQueue is safe even from a signal handler.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if record.args:  # arguments may change later: their text is taken now
            record.msg, record.args = record.getMessage(), None
        self._queue.put(record)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5.0)
        self._target.flush()
        super().close()

    def _write(self) -> None:
        while (record := self._queue.get()) is not None:
            self._target.handle(record)


@contextlib.contextmanager
def logging_in_background() -> Iterator[None]:
    """While inside, the root logger's handlers write from a log thread (the daemon's hot path
    never formats or writes a line); on the way out, everything queued is written first."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    threads = [_LogThread(handler) for handler in handlers]
    root.handlers[:] = threads
    try:
        yield
    finally:
        root.handlers[:] = handlers
        for thread in threads:
            thread.close()
