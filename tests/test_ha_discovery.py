"""Home Assistant MQTT discovery payloads checked against Home Assistant's documented schema
for MQTT sensors and binary sensors, written down here as data: the keys each accepts, the
type of each, the required ones, and the rules between device_class, state_class and unit.

From the MQTT Sensor / Binary Sensor docs (home-assistant.io/integrations/sensor.mqtt,
binary_sensor.mqtt) and the schemas behind them (components/mqtt/sensor.py, schemas.py;
sensor device and state classes in components/sensor).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kiosk.ha_discovery import discovery_configs
from kiosk.ports import KioskState

STRING, INT, BOOL, LIST, DICT = str, int, bool, list, dict
TEMPLATE = "template"  # a string holding a Jinja template
TOPIC = "topic"  # a subscribe topic: no wildcards where a single topic is meant

# MQTT_ENTITY_COMMON_SCHEMA (availability, device, origin, entity options).
COMMON: dict[str, Any] = {
    "availability_topic": TOPIC,
    "availability_template": TEMPLATE,
    "availability_mode": STRING,
    "availability": LIST,
    "payload_available": STRING,
    "payload_not_available": STRING,
    "device": DICT,
    "origin": DICT,
    "enabled_by_default": BOOL,
    "entity_category": STRING,
    "entity_picture": STRING,
    "icon": STRING,
    "json_attributes_topic": TOPIC,
    "json_attributes_template": TEMPLATE,
    "object_id": STRING,
    "default_entity_id": STRING,
    "unique_id": STRING,
    "name": STRING,
    "qos": INT,
    "encoding": STRING,
}
# MQTT_RO_SCHEMA + the sensor platform's own keys.
SENSOR: dict[str, Any] = {
    **COMMON,
    "state_topic": TOPIC,
    "value_template": TEMPLATE,
    "device_class": STRING,
    "expire_after": INT,
    "force_update": BOOL,
    "last_reset_value_template": TEMPLATE,
    "options": LIST,
    "suggested_display_precision": INT,
    "state_class": STRING,
    "unit_of_measurement": STRING,
}
BINARY_SENSOR: dict[str, Any] = {
    **COMMON,
    "state_topic": TOPIC,
    "value_template": TEMPLATE,
    "device_class": STRING,
    "expire_after": INT,
    "force_update": BOOL,
    "off_delay": INT,
    "payload_on": STRING,
    "payload_off": STRING,
}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}}
SCHEMAS = {"sensor": SENSOR, "binary_sensor": BINARY_SENSOR}
# MQTT_ENTITY_DEVICE_INFO_SCHEMA: at least one of identifiers / connections.
DEVICE: dict[str, Any] = {
    "identifiers": LIST,
    "connections": LIST,
    "manufacturer": STRING,
    "model": STRING,
    "model_id": STRING,
    "name": STRING,
    "hw_version": STRING,
    "serial_number": STRING,
    "sw_version": STRING,
    "via_device": STRING,
    "suggested_area": STRING,
    "configuration_url": STRING,
}
ORIGIN: dict[str, Any] = {"name": STRING, "sw_version": STRING, "support_url": STRING}
ORIGIN_REQUIRED = {"name"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
# The sensor device classes the kiosk may use, with the state classes and units each allows
# (None: no state class / no unit). timestamp and enum take neither; monetary takes `total`
# or none, and an ISO 4217 currency as its unit.
SENSOR_DEVICE_CLASSES: dict[str, dict[str, Any]] = {
    "timestamp": {"state_classes": {None}, "unit": "none"},
    "date": {"state_classes": {None}, "unit": "none"},
    "enum": {"state_classes": {None}, "unit": "none"},
    "monetary": {"state_classes": {None, "total"}, "unit": "currency"},
}
BINARY_DEVICE_CLASSES = {"connectivity", "problem", "running", "safety", "power"}
DISCOVERY_TOPIC = re.compile(
    r"homeassistant/(sensor|binary_sensor)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config"
)
UNIQUE_ID = re.compile(r"[a-zA-Z0-9_-]+")


def check_type(where: str, value: Any, kind: Any) -> None:
    if kind == TEMPLATE:
        assert isinstance(value, str) and "{{" in value and "}}" in value, (where, value)
    elif kind == TOPIC:
        assert isinstance(value, str) and value, where
        assert "+" not in value and "#" not in value and not value.startswith("/"), where
    elif kind is INT:
        assert isinstance(value, int) and not isinstance(value, bool), (where, value)
    else:
        assert isinstance(value, kind), (where, value, kind)


def check_against_schema(topic: str, payload: dict[str, Any]) -> None:
    match = DISCOVERY_TOPIC.fullmatch(topic)
    assert match, topic
    component = match.group(1)
    schema = SCHEMAS[component]
    unknown = set(payload) - set(schema)
    assert not unknown, f"{topic}: keys Home Assistant does not take: {unknown}"
    missing = REQUIRED[component] - set(payload)
    assert not missing, f"{topic}: missing {missing}"
    for key, value in payload.items():
        check_type(f"{topic} {key}", value, schema[key])
    assert "availability" not in payload or "availability_topic" not in payload
    assert payload.get("qos", 0) in (0, 1, 2)
    assert payload.get("entity_category", "config") in ENTITY_CATEGORIES
    assert UNIQUE_ID.fullmatch(payload["unique_id"])
    device = payload["device"]
    assert not set(device) - set(DEVICE), device
    for key, value in device.items():
        check_type(f"device {key}", value, DEVICE[key])
    assert device.get("identifiers") or device.get("connections")
    assert all(isinstance(i, str) for i in device["identifiers"])
    origin = payload["origin"]
    assert ORIGIN_REQUIRED <= set(origin) <= set(ORIGIN)
    if component == "sensor":
        check_sensor_classes(topic, payload)
    else:
        assert payload.get("device_class") in BINARY_DEVICE_CLASSES | {None}


def check_sensor_classes(topic: str, payload: dict[str, Any]) -> None:
    state_class = payload.get("state_class")
    assert state_class in STATE_CLASSES | {None}, topic
    device_class = payload.get("device_class")
    unit = payload.get("unit_of_measurement")
    if device_class is not None:
        rules = SENSOR_DEVICE_CLASSES[device_class]
        assert state_class in rules["state_classes"], (topic, device_class, state_class)
        if rules["unit"] == "none":
            assert unit is None, (topic, device_class, unit)
        elif rules["unit"] == "currency":
            assert isinstance(unit, str) and re.fullmatch(r"[A-Z]{3}", unit), topic
    if "options" in payload:
        assert device_class == "enum" and payload["options"], topic
        assert state_class is None and unit is None, topic
    if "last_reset_value_template" in payload:
        assert state_class == "total", topic


CONFIGS = discovery_configs("VM-0042", "kiosk/VM-0042", "USD", "0.1.0")


@pytest.mark.parametrize(("topic", "payload"), CONFIGS, ids=[t for t, _ in CONFIGS])
def test_each_discovery_config_fits_home_assistants_schema(
    topic: str, payload: dict[str, Any]
) -> None:
    check_against_schema(topic, payload)
    json.dumps(payload)  # what goes on the wire


def test_the_kiosk_is_one_device_with_the_sensors_an_operator_needs() -> None:
    devices = {json.dumps(p["device"], sort_keys=True) for _, p in CONFIGS}
    assert len(devices) == 1
    sensors = {t.split("/")[3]: p for t, p in CONFIGS}
    assert set(sensors) == {
        "state",
        "sales_today",
        "takings_today",
        "unfinished",
        "attention",
        "last_sale",
        "online",
    }
    assert len({p["unique_id"] for _, p in CONFIGS}) == len(CONFIGS)
    assert sensors["state"]["options"] == [s.value for s in KioskState]
    assert sensors["last_sale"]["device_class"] == "timestamp"
    assert sensors["takings_today"]["unit_of_measurement"] == "USD"
    assert sensors["online"]["state_topic"] == "kiosk/VM-0042/availability"


def state_payload() -> dict[str, Any]:
    return {
        "state": "ready",
        "reason": None,
        "since": "2026-01-02T03:04:05Z",
        "firmware": "0.1.0",
        "unfinished": 1,
        "attention": 0,
        "sales_today": {"count": 3, "amount": "4.50", "currency": "USD"},
        "last_sale_at": "2026-01-02T03:04:05Z",
    }


@pytest.mark.parametrize(
    ("object_id", "expected"),
    [
        ("state", "ready"),
        ("sales_today", "3"),
        ("takings_today", "4.50"),
        ("unfinished", "1"),
        ("attention", "0"),
        ("last_sale", "2026-01-02T03:04:05Z"),
    ],
)
def test_each_value_template_reads_its_field_of_the_state_payload(
    object_id: str, expected: str
) -> None:
    """The templates are the simple `value_json.a.b` form: followed here by hand, so a field
    renamed in the state payload breaks this test, not a dashboard in the field."""
    [payload] = [p for t, p in CONFIGS if t.split("/")[3] == object_id]
    path = re.fullmatch(r"\{\{ value_json((?:\.[a-z_]+)+) \}\}", payload["value_template"])
    assert path, payload["value_template"]
    value: Any = state_payload()
    for part in path.group(1).strip(".").split("."):
        value = value[part]
    assert str(value) == expected
