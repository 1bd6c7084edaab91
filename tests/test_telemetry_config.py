"""The [telemetry] section (SPEC sections 3 and 8) as `kiosk check` reads it: TLS unless the
broker is on this machine or plain MQTT is allowed in so many words, a password file only its
owner may read, and no secret in the URL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiosk.config import check_config
from tests.test_config import GOOD, Keys, keys, site, write_file  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

TELEMETRY = """
[telemetry]
mqtt_url = "{url}"
username = "VM-0042"
password_file = "keys/mqtt.pass"
{extra}
"""


def check(folder: Path, url: str, extra: str = "", mode: int = 0o600) -> list[str]:
    write_file(folder / "keys/mqtt.pass", b"broker-password\n", mode)
    path = folder / "kiosk.toml"
    path.write_text(GOOD + TELEMETRY.format(url=url, extra=extra))
    config, problems = check_config(path, check_devices=False)
    found = [str(p) for p in problems if not p.warning]
    assert (config is None) == bool(found)
    return found


def test_mqtts_with_a_password_file_is_accepted(site: Path) -> None:  # noqa: F811
    assert check(site, "mqtts://broker.example.net:8883") == []
    path = site / "kiosk.toml"
    config, _ = check_config(path, check_devices=False)
    assert config is not None and config.telemetry is not None
    t = config.telemetry
    assert (t.mqtt_url, t.username, t.topic_prefix, t.heartbeat_s) == (
        "mqtts://broker.example.net:8883",
        "VM-0042",
        "kiosk",
        60.0,
    )
    assert t.password_file == site / "keys/mqtt.pass"


def test_without_the_section_there_is_no_telemetry(site: Path) -> None:  # noqa: F811
    path = site / "kiosk.toml"
    path.write_text(GOOD)
    config, _ = check_config(path, check_devices=False)
    assert config is not None and config.telemetry is None


def test_plain_mqtt_over_a_network_is_refused(site: Path) -> None:  # noqa: F811
    [problem] = check(site, "mqtt://broker.example.net")
    assert "telemetry.mqtt_url" in problem and "no TLS" in problem


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtt://localhost", "mqtt://[::1]"])
def test_plain_mqtt_on_loopback_is_accepted(site: Path, url: str) -> None:  # noqa: F811
    assert check(site, url) == []


def test_plain_mqtt_over_a_network_with_allow_plain_is_accepted(site: Path) -> None:  # noqa: F811
    assert check(site, "mqtt://broker.example.net", "allow_plain = true") == []


def test_a_password_file_readable_by_others_is_refused(site: Path) -> None:  # noqa: F811
    [problem] = check(site, "mqtts://broker.example.net", mode=0o644)
    assert "telemetry.password_file" in problem and "readable by group or others" in problem
    assert "broker-password" not in problem


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mqtts://user:secret@broker.example.net", "must not hold a user name or password"),
        ("https://broker.example.net", "not an mqtts:// URL"),
        ("mqtts://broker.example.net/kiosk", "only scheme, host and port"),
        ("mqtts://broker.example.net:port", "not a valid URL"),
    ],
)
def test_a_broker_url_that_is_not_one_is_refused(
    site: Path,  # noqa: F811
    url: str,
    says: str,
) -> None:
    [problem] = check(site, url)
    assert says in problem, problem
    assert "secret" not in problem or "user name or password" in problem


def test_a_topic_prefix_with_wildcards_is_refused(site: Path) -> None:  # noqa: F811
    [problem] = check(site, "mqtts://b.example.net", 'topic_prefix = "kiosk/#"')
    assert "telemetry.topic_prefix" in problem


def test_a_password_file_needs_a_username(site: Path) -> None:  # noqa: F811
    write_file(site / "keys/mqtt.pass", b"pw\n", 0o600)
    path = site / "kiosk.toml"
    path.write_text(
        GOOD
        + '\n[telemetry]\nmqtt_url = "mqtts://b.example.net"\npassword_file = "keys/mqtt.pass"\n'
    )
    _, problems = check_config(path, check_devices=False)
    assert any("needs telemetry.username" in str(p) for p in problems)


def test_a_section_that_reports_nothing_is_a_warning(site: Path) -> None:  # noqa: F811
    path = site / "kiosk.toml"
    path.write_text(GOOD + "\n[telemetry]\nheartbeat_s = 30\n")
    config, problems = check_config(path, check_devices=False)
    assert config is not None
    assert any(p.warning and "reports nothing" in str(p) for p in problems)


def test_a_kiosk_without_an_mqtt_broker_never_loads_paho() -> None:
    """paho is imported only when [telemetry] names a broker: `kiosk run` without one (or
    with a Prometheus textfile only) does not load it."""
    script = (
        "import sys, tempfile, dataclasses\n"
        "from pathlib import Path\n"
        "import kiosk.cli, kiosk.daemon, kiosk.figures, kiosk.telemetry\n"
        "from kiosk.alarms import AlarmBoard\n"
        "from kiosk.config import TelemetrySection\n"
        "from kiosk.demo import demo_config\n"
        "tmp = Path(tempfile.mkdtemp())\n"
        "config = demo_config(tmp / 'state', 'http://127.0.0.1:9')\n"
        "config = dataclasses.replace(config, telemetry=TelemetrySection(\n"
        "    prometheus_textfile=str(tmp / 'k.prom')))\n"
        "sink = kiosk.telemetry.TelemetrySink(\n"
        "    config, kiosk.figures.FiguresReader(tmp / 'state'), AlarmBoard())\n"
        "sink.start(); sink.stop()\n"
        "assert not [m for m in sys.modules if m.startswith('paho')], 'paho loaded'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
