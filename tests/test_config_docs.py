"""The config reference, the example and the JSON Schema are derived from the declaration in
kiosk/config_keys.py, and the committed copies match it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from kiosk.config import ROWS, SECTIONS, check_config
from kiosk.config_docs import generated

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(generated()))
def test_committed_file_matches_the_declaration(name: str) -> None:
    committed = (ROOT / name).read_text(encoding="utf-8") if (ROOT / name).exists() else ""
    assert committed == generated()[name], f"{name} is stale: run  make config-docs"


def test_every_field_of_every_section_is_declared() -> None:
    for name, (_, cls) in SECTIONS.items():
        assert [f.name for f in dataclasses.fields(cls)] == list(ROWS[name]), name


def schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((ROOT / "docs/kiosk.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def example() -> dict[str, object]:
    return tomllib.loads((ROOT / "examples/kiosk.toml").read_text())


def test_the_example_is_valid_under_the_schema() -> None:
    assert list(schema_validator().iter_errors(example())) == []


def test_the_example_names_the_schema_for_editors() -> None:
    first = (ROOT / "examples/kiosk.toml").read_text().splitlines()[0]
    assert first == "#:schema ../docs/kiosk.schema.json"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("alipay", "currency", "XYZ"),
        ("alipay", "partner", "123"),
        ("alipay", "pay_timeout_s", 0),
        ("sale", "price", 1.5),
        ("sale", "mode", "free"),
        ("indicators", "green", 28),
        ("vend", "mdb_address", 3),
        ("kiosk", "terminal_id", "VM 42"),
        ("kiosk", "colour", "red"),
    ],
)
def test_the_schema_refuses_a_wrong_value(section: str, key: str, value: object) -> None:
    doc = example()
    table = doc[section]
    assert isinstance(table, dict)
    table[key] = value
    assert list(schema_validator().iter_errors(doc)), f"{section}.{key} = {value!r} passed"


def test_the_example_passes_kiosk_check_but_for_its_key_files(tmp_path: Path) -> None:
    path = tmp_path / "kiosk.toml"
    path.write_text((ROOT / "examples/kiosk.toml").read_text())
    _, problems = check_config(path, check_devices=False)
    assert problems
    assert all("/etc/kiosk/keys/" in p.message for p in problems), [str(p) for p in problems]
