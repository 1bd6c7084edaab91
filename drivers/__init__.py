"""The hardware edges: scanners, indicators and vend outputs, each with a fake twin.

`build_*` pick the driver named in the config. Hardware libraries are imported only here
and in the driver modules, and only for the driver actually configured, so a kiosk with a
serial scanner never needs evdev, and the core never needs any of them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from kiosk.config import Config, ScannerSection
from kiosk.errors import ConfigError
from kiosk.ports import Indicator, KioskState, Scanner, Sound, VendOutput

HARDWARE_EXTRA = "pip install 'kiosk[hardware]'"
_LIBRARIES = {"evdev": "evdev", "serial": "pyserial", "gpiozero": "gpiozero"}
NO_GPIO = "no GPIO on this machine (set GPIOZERO_PIN_FACTORY=mock to try selftest without hardware)"


class DriverUnavailable(ConfigError):
    """The config names a driver this machine cannot run: its library is not installed, or
    there is no GPIO. A mistake in the setup, not a fault of the kiosk (exit 2)."""


@contextlib.contextmanager
def _hardware(what: str) -> Iterator[None]:
    """Turn a missing hardware library or a missing GPIO into one sentence that says what to
    do, where the driver is built, so neither reaches the user as a traceback."""
    # gpiozero warns once per pin library it could not load before it gives up; those
    # warnings would bury the one line that says what to do.
    with warnings.catch_warnings(record=True) as fallbacks:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as exc:
            _explain(exc, what)
            raise
    for fallback in fallbacks:  # it worked in the end: let them through as they were
        warnings.warn_explicit(
            fallback.message, fallback.category, fallback.filename, fallback.lineno
        )


def _explain(exc: Exception, what: str) -> None:
    """Raise DriverUnavailable for a missing library or GPIO; return for anything else."""
    if _is_bad_pin_factory(exc):  # itself an ImportError: asked first
        raise DriverUnavailable(NO_GPIO) from None
    if isinstance(exc, ImportError):
        top = (exc.name or "").partition(".")[0]
        if top in _LIBRARIES:
            raise DriverUnavailable(
                f"the {what} needs {_LIBRARIES[top]}, which is not installed: {HARDWARE_EXTRA}"
            ) from None


def _is_bad_pin_factory(exc: Exception) -> bool:
    try:
        from gpiozero.exc import BadPinFactory
    except ImportError:
        return False
    return isinstance(exc, BadPinFactory)


class NoIndicator:
    """`indicators.driver = "none"`: a kiosk without lights (the log still shows states)."""

    def show(self, state: KioskState) -> None:
        pass

    def sound(self, sound: Sound) -> None:
        pass

    def close(self) -> None:
        pass


def build_scanner(config: Config) -> Scanner:
    return build_scanner_for(config.scanner)


def build_scanner_for(s: ScannerSection) -> Scanner:
    """The scanner a [scanner] section names, on its own: `kiosk run` holds it before the
    rest of the config is known to be good."""
    if s.driver == "evdev":
        with _hardware("evdev scanner"):
            from drivers.scanner_evdev import EvdevScanner

            return EvdevScanner(device=s.device, match=s.match, grab=s.grab, layout=s.layout)
    if s.driver == "serial":
        with _hardware("serial scanner"):
            from drivers.scanner_serial import SerialScanner

            assert s.port is not None
            return SerialScanner(s.port, s.baud)
    from drivers.scanner_fake import FakeScanner

    return FakeScanner()


def build_indicator(config: Config) -> Indicator:
    i = config.indicators
    if i.driver == "gpio":
        with _hardware("GPIO indicator"):
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
        with _hardware("serial vend link"):
            from drivers.vend_serial import SerialVendOutput

            assert v.port is not None
            return SerialVendOutput(v.port, v.baud, config.alipay.currency)
    if v.driver == "relay":
        with _hardware("GPIO vend relay"):
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

    The config check has filled in the mdb driver's own port and baud defaults.
    """
    v = config.vend
    assert v.port is not None
    with _hardware("MDB board"):
        from drivers.vend_mdb import MdbVendOutput

        return MdbVendOutput(
            v.port,
            config.alipay.currency,
            baud=v.baud,
            address=v.mdb_address,
            reset_pin=v.mdb_reset_pin,
            approve_within_s=v.approve_within_s,
        )
