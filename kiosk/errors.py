"""The kiosk's exception tree: one base, leaves that also subclass the matching builtin."""


class KioskError(Exception):
    """Base of every error the firmware raises on purpose."""


class ConfigError(KioskError, ValueError):
    """The config file, or something it points at, is unusable."""


class JournalError(KioskError, OSError):
    """The journal cannot be read or written; the kiosk must not take payments."""


class JournalCorrupt(JournalError):
    """The journal file exists but is not a sound journal. It is never overwritten."""


class JournalTooNew(JournalError):
    """The journal has a newer schema than this firmware knows. It is never touched."""


class ActionRefused(KioskError, ValueError):
    """An operator action that does not apply to the transaction named (not in attention,
    unknown ref). Nothing was changed."""


class GatewayError(KioskError):
    """Base of the payment gateway client's errors."""


class GatewayUnreachable(GatewayError, ConnectionError):
    """No gateway took the connection: the request never left the kiosk."""


class KeyFileError(ConfigError):
    """A key file is unusable: unreadable, not a key, or readable by group or others."""


class PaymentCodeError(KioskError, ValueError):
    """A scan that is not an Alipay payment code."""


class VendProtocolError(KioskError, ValueError):
    """A malformed line on the serial vend link; `reason` is what `ERR` reports."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
