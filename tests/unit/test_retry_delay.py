"""The retry backoff formula, as a pure function."""

from google.protobuf import duration_pb2

from tether.api.v1 import types_pb2 as t
from tether.controller.config import ControllerConfig
from tether.controller.retry import retry_delay

CFG = ControllerConfig(retry_initial=1.0, retry_factor=2.0, retry_max=60.0, retry_jitter=0.2)


def d(s: float) -> duration_pb2.Duration:
    x = duration_pb2.Duration()
    x.FromNanoseconds(int(s * 1e9))
    return x


def test_defaults_grow_exponentially_to_the_cap():
    spec = t.TaskSpec(name="x")
    mid = [retry_delay(spec, n, CFG, rand=lambda: 0.5) for n in range(1, 9)]
    assert mid == [1, 2, 4, 8, 16, 32, 60, 60]


def test_jitter_bounds():
    spec = t.TaskSpec(name="x")
    assert retry_delay(spec, 3, CFG, rand=lambda: 0.0) == 4 * 0.8
    assert retry_delay(spec, 3, CFG, rand=lambda: 1.0) == 4 * 1.2


def test_task_backoff_overrides_and_huge_factors_do_not_overflow():
    spec = t.TaskSpec(
        name="x", backoff=t.RetryBackoff(initial=d(0.5), factor=1e300, max=d(7), jitter=0)
    )
    assert retry_delay(spec, 1, CFG) == 0.5
    assert retry_delay(spec, 100, CFG) == 7
    zero = t.TaskSpec(name="x", backoff=t.RetryBackoff(initial=d(0), jitter=0))
    assert retry_delay(zero, 5, CFG) == 0
