"""MAPI answers: parse the `<alipay>` XML envelope safely, verify its response signature.

Parsing only reads; it judges nothing. The client decides what an answer means.
`render_answer` builds an envelope the same way Alipay does, for the gateway simulator and tests.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from kiosk.alipay.signing import Signature, presign_string
from kiosk.errors import GatewayError

MAX_ANSWER_BYTES = 64 * 1024

# Encodings expat decodes itself; anything else (GBK) is transcoded to UTF-8 first, because
# expat refuses multi-byte encodings it does not know.
_EXPAT_ENCODINGS = {"utf-8", "ascii"}
# The declaration is not signed, so only the encodings Alipay actually uses are believed:
# any other could make a signed answer read as different text.
_ALLOWED_ENCODINGS = {"utf-8", "ascii", "gbk", "gb2312", "gb18030"}
_DECLARATION = re.compile(rb"^\s*<\?xml\b[^>]*?\bencoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")


class AnswerUnreadable(GatewayError, ValueError):
    """The gateway's answer is not a sound MAPI envelope; the message says why, briefly."""


@dataclass(frozen=True)
class Answer:
    """One parsed MAPI answer envelope."""

    is_success: bool
    error: str | None  # <error>, set when is_success is F
    fields: Mapping[str, str] = field(default_factory=dict)  # children of <response><alipay>
    has_response: bool = False
    sign: str | None = None
    sign_type: str | None = None
    encoding: str = "utf-8"  # the declared encoding, as a Python codec name


def declared_encoding(body: bytes) -> str:
    """The codec named by the XML declaration (`utf-8` when none is declared)."""
    match = _DECLARATION.match(body)
    if match is None:
        return "utf-8"
    name = match.group(1).decode("ascii")
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise AnswerUnreadable(f"answer declares an unknown encoding {name[:20]!r}") from None
    if codec not in _ALLOWED_ENCODINGS:
        raise AnswerUnreadable(f"answer declares encoding {name[:20]!r}, not UTF-8 or GBK")
    return codec


def _to_utf8(body: bytes, encoding: str) -> bytes:
    if encoding in _EXPAT_ENCODINGS:
        return body
    try:
        text = body.decode(encoding)
    except (UnicodeError, LookupError):
        raise AnswerUnreadable(f"answer is not valid {encoding}") from None
    # The declaration must now say UTF-8, or expat would try the old encoding again.
    text = re.sub(
        r"^(\s*<\?xml\b[^>]*?\bencoding\s*=\s*)[\"'][A-Za-z0-9._-]+[\"']",
        r'\1"UTF-8"',
        text,
        count=1,
    )
    return text.encode("utf-8")


def parse_answer(body: bytes) -> Answer:
    """Parse an answer body. Raises `AnswerUnreadable` for anything that is not an envelope:
    too long, truncated, garbage, a DTD or entity declaration, a root other than `<alipay>`,
    a missing `<is_success>`, or a field given twice."""
    if len(body) > MAX_ANSWER_BYTES:
        raise AnswerUnreadable(f"answer over {MAX_ANSWER_BYTES // 1024} KiB")
    encoding = declared_encoding(body)
    try:
        root = SafeET.fromstring(_to_utf8(body, encoding), forbid_dtd=True)
    except DefusedXmlException:
        raise AnswerUnreadable("answer declares a DTD or entities") from None
    except (ParseError, ValueError):
        raise AnswerUnreadable("answer does not parse") from None
    if root.tag != "alipay":
        raise AnswerUnreadable("answer is not an <alipay> envelope")
    flag = _text(root.find("is_success"))
    if flag not in ("T", "F"):
        raise AnswerUnreadable("answer has no is_success T or F")
    inner = root.find("response/alipay")
    fields: dict[str, str] = {}
    if inner is not None:
        for child in inner:
            if child.tag in fields:
                raise AnswerUnreadable(f"answer gives {child.tag[:40]} twice")
            fields[child.tag] = child.text or ""
    return Answer(
        is_success=flag == "T",
        error=_text(root.find("error")) or None,
        fields=fields,
        has_response=inner is not None,
        sign=_text(root.find("sign")) or None,
        sign_type=_text(root.find("sign_type")) or None,
        encoding=encoding,
    )


def _text(element: Element | None) -> str:
    return "" if element is None or element.text is None else element.text.strip()


def verify_answer(answer: Answer, signature: Signature) -> bool:
    """True when the answer's `<sign>` covers its response fields.

    Alipay signs over UTF-8 bytes as asked, but answers are declared GBK; some gateways signed
    the GBK bytes, so that encoding is tried second.
    """
    if answer.sign is None:
        return False
    text = presign_string(answer.fields)
    if signature.verify(text, answer.sign, "utf-8"):
        return True
    if answer.encoding not in ("utf-8", "ascii"):
        try:
            return signature.verify(text, answer.sign, answer.encoding)
        except UnicodeError:
            return False
    return False


def render_answer(
    fields: Mapping[str, str] | None,
    signature: Signature | None,
    *,
    request: Mapping[str, str] | None = None,
    error: str | None = None,
    encoding: str = "GBK",
    sign_encoding: str = "utf-8",
) -> bytes:
    """An answer envelope as Alipay writes it.

    `error` set: `is_success=F` with that code, no response and no signature (a gateway
    rejection). Otherwise `fields` go into `<response><alipay>` and, if `signature` is given,
    are signed over `sign_encoding` bytes. The request echo never carries the buyer's code.
    """
    # Only the simulator and the tests write answers: the daemon, which reads them, goes
    # without xml.sax (about 0.1 MiB resident).
    from xml.sax.saxutils import escape

    parts = [f'<?xml version="1.0" encoding="{encoding}"?>', "<alipay>"]
    parts.append(f"<is_success>{'F' if error else 'T'}</is_success>")
    if error:
        parts.append(f"<error>{escape(error)}</error>")
    elif fields is not None:
        if request:
            parts.append("<request>")
            for key, value in request.items():
                if key in ("sign", "buyer_identity_code"):
                    continue
                parts.append(f'<param name="{escape(key)}">{escape(value)}</param>')
            parts.append("</request>")
        parts.append("<response><alipay>")
        parts.extend(f"<{key}>{escape(value)}</{key}>" for key, value in fields.items())
        parts.append("</alipay></response>")
        if signature is not None:
            sign = signature.sign(presign_string(fields), sign_encoding)
            parts.append(f"<sign>{sign}</sign><sign_type>{signature.sign_type.value}</sign_type>")
    parts.append("</alipay>")
    return "".join(parts).encode(encoding)
