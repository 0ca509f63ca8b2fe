"""Timers of one leadership term: retry delays (one per task) and one-shot checks (run
deadlines, the orphan check). All are cancelled when the engine stops, so a stepped-down
controller does not act on a timer armed in its term.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

from tether.sdk.telemetry import get_logger

__all__ = ["Timers", "every"]

log = get_logger("controller.engine")


async def every(period: float, one_pass: Callable[[], Awaitable[object]], what: str) -> None:
    """Await ``one_pass()`` every ``period`` seconds (first after one period) until
    cancelled; a failed pass is logged as ``what failed`` and the next one tried."""
    while True:
        await asyncio.sleep(period)
        try:
            await one_pass()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # etcd away, or leadership lost: try again next period
            log.warning(f"{what} failed", error=str(e))


class Timers:
    """Call-later handles of one engine, by key for retries."""

    def __init__(self) -> None:
        self._keyed: dict[Hashable, asyncio.TimerHandle] = {}
        self._other: list[asyncio.TimerHandle] = []

    def arm(self, key: Hashable, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` after ``delay`` seconds, replacing the timer armed under ``key``."""
        self.disarm(key)

        def fire() -> None:
            self._keyed.pop(key, None)
            callback()

        self._keyed[key] = asyncio.get_running_loop().call_later(delay, fire)

    def disarm(self, key: Hashable) -> None:
        """Cancel the timer armed under ``key``, if any."""
        old = self._keyed.pop(key, None)
        if old:
            old.cancel()

    def later(self, delay: float, callback: Callable[..., None], *args) -> None:
        """Call ``callback(*args)`` once after ``delay`` seconds (until the engine stops)."""
        self._other.append(asyncio.get_running_loop().call_later(delay, callback, *args))

    def cancel_all(self) -> None:
        """Cancel every timer."""
        for h in [*self._keyed.values(), *self._other]:
            h.cancel()
