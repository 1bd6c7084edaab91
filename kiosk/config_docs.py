"""Everything derived from the config declaration: docs/config.md, examples/kiosk.toml and
docs/kiosk.schema.json. `python -m kiosk.config_docs` (or `make config-docs`) rewrites them;
tests/test_config_docs.py fails when the committed files differ."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

from kiosk.config_keys import NO_EXAMPLE, ROWS, SECTIONS, Row

MAX_PIN = 27
SCHEMA_URL = "../docs/kiosk.schema.json"  # relative to examples/kiosk.toml
FILES = ("docs/config.md", "examples/kiosk.toml", "docs/kiosk.schema.json")


def _toml(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Enum):
        value = value.value
    return json.dumps(str(value))


def _shown(row: Row) -> Any:
    if row.key.example is not NO_EXAMPLE:
        return row.key.example
    return None if row.required else row.default


def _allowed(row: Row) -> str:
    k = row.key
    if k.choices:
        return " \\| ".join(f"`{c}`" for c in k.choices)
    if k.kind == "spki_pins":
        return f"a list of at most {k.maximum}, each {k.must}"
    if k.must:
        return k.must
    if k.kind == "duration":
        return f"more than 0, at most one day ({k.unit})"
    if k.kind == "int":
        return f"{k.minimum} to {k.maximum}" if k.maximum else f"{k.minimum} or more"
    if k.kind == "pin":
        return 'BCM 0 to 27, or "GPIO17", "BOARD11", "J8:11"'
    if k.kind == "money":
        return "a string with the currency's minor digits"
    if k.kind == "url":
        return "https URL"
    if k.kind == "broker":
        return "mqtts URL (mqtt on loopback or with allow_plain)"
    return ""


def markdown() -> str:
    out = [
        "# The config file, key by key",
        "",
        "Generated from `kiosk/config_keys.py` by `make config-docs`; do not edit by hand.",
        "An annotated example is `examples/kiosk.toml` (`kiosk init` writes it); check a config",
        "with `kiosk check --config PATH`. Durations are numbers and may be fractional; money is",
        'a string with exactly the currency\'s minor digits (`"1.50"` USD, `"150"` JPY).',
        "",
    ]
    for name, (section, _) in SECTIONS.items():
        note = " Required." if section.required else ""
        note += " Optional: without it, the feature is off." if section.optional else ""
        out += [f"## [{name}]", "", section.doc + note, ""]
        out += ["| key | kind | default | allowed | what it is |", "|---|---|---|---|---|"]
        for row in ROWS[name].values():
            default = "required" if row.required else f"`{_toml(row.default)}`"
            if not row.required and row.default in (None, "", ()):
                default = "none"
            for driver, value in row.key.driver_defaults:
                default += f"; {driver}: `{_toml(value)}`"
            kind = row.key.kind + (f" ({row.key.unit})" if row.key.unit else "")
            out.append(f"| `{row.name}` | {kind} | {default} | {_allowed(row)} | {row.key.doc} |")
        out.append("")
    return "\n".join(out)


def example() -> str:
    out = [
        f"#:schema {SCHEMA_URL}",
        "# The kiosk's config (SPEC section 3). Every key is in docs/config.md.",
        "# Check it with:  kiosk check --config kiosk.toml",
    ]
    for name, (section, _) in SECTIONS.items():
        # An optional section is shown whole but commented out: the example turns nothing on.
        off = "# " if section.optional else ""
        out += ["", f"{off}[{name}]  # {section.doc}"]
        for row in ROWS[name].values():
            shown = _shown(row)
            line = f"{row.name} = {_toml(shown)}" if shown is not None else f'{row.name} = ""'
            if (row.key.commented or shown is None) and not off:
                line = "# " + line
            out.append(f"{off}{line}  # {row.key.doc}")
    return "\n".join(out) + "\n"


def _schema_of(row: Row) -> dict[str, Any]:
    k = row.key
    schema: dict[str, Any] = {"description": k.doc}
    if k.kind == "bool":
        schema["type"] = "boolean"
    elif k.kind == "duration":
        limit = 86400 * (1000 if k.unit == "ms" else 1)
        schema.update(type="number", exclusiveMinimum=0, maximum=limit)
    elif k.kind == "int":
        schema["type"] = "integer"
        if k.minimum is not None:
            schema["minimum"] = k.minimum
        if k.maximum is not None:
            schema["maximum"] = k.maximum
    elif k.kind == "pin":
        schema["oneOf"] = [
            {"type": "integer", "minimum": 0, "maximum": MAX_PIN},
            {"type": "string", "pattern": "^(?i:(GPIO|BCM|BOARD|J8:)[0-9]{1,2})$"},
        ]
    elif k.kind in ("choice", "currency"):
        schema.update(type="string", enum=list(k.choices))
    elif k.kind == "money":
        schema.update(type="string", pattern=r"^[0-9]{1,9}(\.[0-9]{2})?$")
    elif k.kind == "spki_pins":
        items = {"type": "string", "pattern": f"^{k.pattern}$"}
        schema.update(type="array", items=items, maxItems=k.maximum)
    else:
        schema["type"] = "string"
        if k.pattern:
            schema["pattern"] = f"^({k.pattern})$" + ("|^$" if row.default == "" else "")
        if k.kind == "url":
            schema["pattern"] = "^https?://"
        if k.kind == "broker":
            schema["pattern"] = "^$|^mqtts?://"
    if not row.required and row.default is not None:
        schema["default"] = json.loads(json.dumps(row.default, default=str))
    return schema


def schema() -> dict[str, Any]:
    properties = {}
    for name, (section, _) in SECTIONS.items():
        rows = ROWS[name].values()
        properties[name] = {
            "type": "object",
            "description": section.doc,
            "additionalProperties": False,
            "required": [r.name for r in rows if r.required],
            "properties": {r.name: _schema_of(r) for r in rows},
        }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "kiosk.toml",
        "description": "The kiosk's config (SPEC section 3). Generated by make config-docs.",
        "type": "object",
        "additionalProperties": False,
        "required": [n for n, (s, _) in SECTIONS.items() if s.required],
        "properties": properties,
    }


def generated() -> dict[str, str]:
    """Each derived file's path (from the project root) and the text it must hold."""
    texts = (markdown(), example(), json.dumps(schema(), indent=2) + "\n")
    return dict(zip(FILES, texts, strict=True))


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(".")
    for name, text in generated().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
        print(f"wrote {root / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
