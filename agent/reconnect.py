"""Where an agent connects next, and how soon, after its stream to a controller ended.

A standby names the leader (trailing metadata ``tether-leader``): the agent goes there at
once. A controller that answered but cannot serve yet (standing by with no leader known, or
cut off from etcd) will serve within a leader TTL: the agent keeps asking at its first delay
rather than backing off, so it is back moments after a takeover. Anything else (a
controller down, a network error) backs off exponentially, with jitter.
"""

from __future__ import annotations

import random

import grpc

from tether.sdk.errors import ERROR_REASON_KEY, leader_of

__all__ = ["Reconnect"]

# Reasons a live controller gives when it will serve soon (see tether.controller.errors).
_SOON = {"not_leader", "store_unavailable"}


class Reconnect:
    """The agent's reconnect policy over its list of controllers.

    Args:
        controllers: ``host:port`` of each controller (HA); a leader named by a standby is
            added when it is not among them.
        initial: First delay after a failure, seconds.
        maximum: Cap of the delay, seconds.
    """

    def __init__(self, controllers: list[str], initial: float, maximum: float) -> None:
        self.controllers = list(controllers)
        self.initial = initial
        self.maximum = maximum
        self.current = 0
        self.delay = initial

    @property
    def address(self) -> str:
        """The controller to connect to now."""
        return self.controllers[self.current % len(self.controllers)]

    def after(self, registered: bool, err: grpc.RpcError | None = None) -> float:
        """Choose the next controller once a session ended; return the seconds to wait.

        Args:
            registered: The session registered the node (it worked for a while).
            err: The error that ended it, if any.
        """
        if registered or _reason(err) in _SOON:
            self.delay = self.initial
        leader = leader_of(err) if err is not None else ""
        if leader and leader != self.address:
            if leader not in self.controllers:
                self.controllers.append(leader)
            self.current = self.controllers.index(leader)
            return random.uniform(0, self.initial / 4)  # at once; jitter spreads a fleet
        self.current = (self.current + 1) % len(self.controllers)
        sleep = random.uniform(self.delay / 2, self.delay)  # agents do not reconnect in step
        self.delay = min(self.delay * 2, self.maximum)
        return sleep


def _reason(err: grpc.RpcError | None) -> str:
    trailing = getattr(err, "trailing_metadata", None)
    metadata = (trailing() if callable(trailing) else None) or ()
    return next((v for k, v in metadata if k == ERROR_REASON_KEY), "")
