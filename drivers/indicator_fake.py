"""An `Indicator` that records what it was told, for tests and `kiosk demo`."""

from __future__ import annotations

import threading

from kiosk.ports import KioskState, Sound


class FakeIndicator:
    """Records every state shown and every sound played; thread-safe.

    `wait_for()` reads the history like a script: each call looks only at states shown after
    the one the previous call matched, so `wait_for(PAYING)`, `wait_for(READY)` waits for the
    READY that follows the payment, not the one shown at start-up.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._history: list[KioskState] = []
        self._sounds: list[Sound] = []
        self._cursor = 0  # where the next wait_for() starts looking
        self.closed = False

    def show(self, state: KioskState) -> None:
        with self._changed:
            self._history.append(state)
            self._changed.notify_all()

    def sound(self, sound: Sound) -> None:
        with self._changed:
            self._sounds.append(sound)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    @property
    def history(self) -> list[KioskState]:
        """Every state shown, oldest first."""
        with self._changed:
            return list(self._history)

    @property
    def sounds(self) -> list[Sound]:
        """Every sound played, oldest first."""
        with self._changed:
            return list(self._sounds)

    @property
    def state(self) -> KioskState | None:
        """The state shown last, or None before the first `show()`."""
        with self._changed:
            return self._history[-1] if self._history else None

    def wait_for(self, state: KioskState, timeout: float) -> bool:
        """Wait until `state` is shown after the previous match; False on timeout."""
        with self._changed:

            def found() -> bool:
                try:
                    index = self._history.index(state, self._cursor)
                except ValueError:
                    return False
                self._cursor = index + 1
                return True

            return self._changed.wait_for(found, timeout)

    def wait_for_sound(self, sound: Sound, count: int, timeout: float) -> bool:
        """Wait until `sound` has been played at least `count` times in all."""
        with self._changed:
            return self._changed.wait_for(lambda: self._sounds.count(sound) >= count, timeout)
