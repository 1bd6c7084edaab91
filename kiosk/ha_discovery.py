"""Home Assistant MQTT discovery: retained config payloads under `homeassistant/` that make a
kiosk a device with its sensors, read from the kiosk's own `state` and `availability` topics
(SPEC section 8). Nothing to set up in Home Assistant.

Topics: `homeassistant/<component>/<terminal_id>/<object_id>/config`.
"""

from __future__ import annotations

from typing import Any

from kiosk.ports import KioskState

DISCOVERY_PREFIX = "homeassistant"
MANUFACTURER = "Kiosk firmware"
MODEL = "Alipay vending kiosk"


def discovery_configs(
    terminal_id: str, base_topic: str, currency: str, firmware: str
) -> list[tuple[str, dict[str, Any]]]:
    """(topic, payload) for every entity of one kiosk. `base_topic` is
    `<topic_prefix>/<terminal_id>`."""
    state_topic = f"{base_topic}/state"
    availability_topic = f"{base_topic}/availability"
    node = terminal_id  # [A-Za-z0-9_-]{1,32}: a valid node_id as it is
    device = {
        "identifiers": [f"kiosk_{node}"],
        "name": f"Kiosk {terminal_id}",
        "manufacturer": MANUFACTURER,
        "model": MODEL,
        "sw_version": firmware,
    }
    origin = {"name": "kiosk", "sw_version": firmware}

    def sensor(
        object_id: str, name: str, template: str, **extra: Any
    ) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {
            "name": name,
            "unique_id": f"kiosk_{node}_{object_id}",
            "state_topic": state_topic,
            "value_template": template,
            "availability_topic": availability_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": device,
            "origin": origin,
            **extra,
        }
        return f"{DISCOVERY_PREFIX}/sensor/{node}/{object_id}/config", payload

    configs = [
        sensor(
            "state",
            "State",
            "{{ value_json.state }}",
            device_class="enum",
            options=[s.value for s in KioskState],
            icon="mdi:storefront-outline",
            json_attributes_topic=state_topic,
            json_attributes_template=(
                "{{ {'reason': value_json.reason, 'since': value_json.since} | tojson }}"
            ),
        ),
        sensor(
            "sales_today",
            "Sales today",
            "{{ value_json.sales_today.count }}",
            state_class="total_increasing",
            unit_of_measurement="sales",
            icon="mdi:cart-outline",
        ),
        sensor(
            "takings_today",
            "Takings today",
            "{{ value_json.sales_today.amount }}",
            device_class="monetary",
            unit_of_measurement=currency,
        ),
        sensor(
            "unfinished",
            "Unfinished transactions",
            "{{ value_json.unfinished }}",
            state_class="measurement",
            icon="mdi:progress-clock",
        ),
        sensor(
            "attention",
            "Transactions needing a person",
            "{{ value_json.attention }}",
            state_class="measurement",
            icon="mdi:account-alert-outline",
        ),
        sensor(
            "last_sale",
            "Last sale",
            "{{ value_json.last_sale_at }}",
            device_class="timestamp",
        ),
    ]
    online = {
        "name": "Online",
        "unique_id": f"kiosk_{node}_online",
        "state_topic": availability_topic,
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "qos": 1,
        "device": device,
        "origin": origin,
    }
    configs.append((f"{DISCOVERY_PREFIX}/binary_sensor/{node}/online/config", online))
    return configs
