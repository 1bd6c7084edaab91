"""The hardware edges: scanners, indicators and vend outputs, each with a fake twin.

`build_*` pick the driver named in the config. Hardware libraries are imported only here
and in the driver modules, and only for the driver actually configured, so a kiosk with a
serial scanner never needs evdev, and the core never needs any of them.
"""

from __future__ import annotations

from kiosk.config import Config
from kiosk.ports import Indicator, KioskState, Scanner, Sound, VendOutput


class NoIndicator:
    """`indicators.driver = "none"`: a kiosk without lights (the log still shows states)."""

    def show(self, state: KioskState) -> None:
        pass

    def sound(self, sound: Sound) -> None:
        pass

    def close(self) -> None:
        pass


def build_scanner(config: Config) -> Scanner:
    s = config.scanner
    if s.driver == "evdev":
        from drivers.scanner_evdev import EvdevScanner

        return EvdevScanner(device=s.device, match=s.match, grab=s.grab, layout=s.layout)
    if s.driver == "serial":
        from drivers.scanner_serial import SerialScanner

        assert s.port is not None
        return SerialScanner(s.port, s.baud)
    from drivers.scanner_fake import FakeScanner

    return FakeScanner()


def build_indicator(config: Config) -> Indicator:
    i = config.indicators
    if i.driver == "gpio":
        from drivers.indicator_gpio import GpioIndicator

        return GpioIndicator(
            green=i.green,
            red=i.red,
            amber=i.amber,
            buzzer=i.buzzer,
            buzzer_type=i.buzzer_type,
            active_high=i.active_high,
        )
    if i.driver == "fake":
        from drivers.indicator_fake import FakeIndicator

        return FakeIndicator()
    return NoIndicator()


def build_vend_output(config: Config) -> VendOutput:
    v = config.vend
    if v.driver == "serial":
        from drivers.vend_serial import SerialVendOutput

        assert v.port is not None
        return SerialVendOutput(v.port, v.baud, config.alipay.currency)
    if v.driver == "relay":
        from drivers.vend_relay import RelayVendOutput

        assert v.relay_pin is not None
        return RelayVendOutput(
            relay_pin=v.relay_pin,
            pulse_ms=v.pulse_ms,
            sense_pin=v.sense_pin,
            sense_timeout_s=v.sense_timeout_s,
            active_high=v.relay_active_high,
        )
    if v.driver == "mdb":
        return build_mdb_vend_output(config)
    from drivers.vend_fake import FakeVendOutput

    return FakeVendOutput()


def build_mdb_vend_output(config: Config) -> VendOutput:
    """`vend.driver = "mdb"`: a Qibixx MDB Pi HAT (`/dev/serial0`) or MDB-USB (`/dev/ttyACM*`).

    The MDB keys (`mdb_address`, `mdb_reset_pin`, `approve_within_s`) are read with their SPEC
    defaults when the config does not carry them.
    """
    from drivers.vend_mdb import BAUD, MdbVendOutput

    v = config.vend
    # 9600 is the serial link's default; the boards only ever run at 115200.
    baud = v.baud if v.baud not in (None, 9600) else BAUD
    return MdbVendOutput(
        v.port or "/dev/serial0",
        config.alipay.currency,
        baud=baud,
        address=getattr(v, "mdb_address", 1),
        reset_pin=getattr(v, "mdb_reset_pin", None),
        approve_within_s=getattr(v, "approve_within_s", 60.0),
    )
