"""How long a task waits before its next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable

from google.protobuf import duration_pb2

from tether.api.v1 import types_pb2 as t
from tether.controller.config import ControllerConfig

__all__ = ["retry_delay"]


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def retry_delay(
    spec: t.TaskSpec,
    failures: int,
    config: ControllerConfig,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the attempt after the ``failures``-th failure.

    ``initial * factor**(failures-1)``, capped at ``max``, then spread by ``± jitter``; fields
    the task leaves unset come from the controller's configuration.
    """
    b = spec.backoff
    initial = _seconds(b.initial) if b.HasField("initial") else config.retry_initial
    factor = b.factor or config.retry_factor
    cap = _seconds(b.max) if b.HasField("max") and _seconds(b.max) > 0 else config.retry_max
    jitter = b.jitter if spec.HasField("backoff") else config.retry_jitter
    delay = min(initial, cap)
    for _ in range(max(failures - 1, 0)):  # stepwise, so a huge factor cannot overflow
        delay = min(delay * factor, cap)
    return max(0.0, delay * (1 + jitter * (2 * rand() - 1)))
