"""Parsing and formatting of resource quantities and durations.

Memory follows Kubernetes quantities (``512Mi``, ``2Gi``, ``1G``, ``1000``), durations follow
Go (``30s``, ``10m``, ``1h30m``, ``250ms``), so that specs read the same as elsewhere.
"""

from __future__ import annotations

import math
import re

from tether.sdk.constants import INT64_MAX

_MEMORY_UNITS = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?|k)?\s*$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|us|s|m|h|d)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


# The longest duration the API can carry (google.protobuf.Duration: 10,000 years), and the
# most bytes an int64 field holds.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_MEMORY_BYTES = INT64_MAX


def parse_memory(value: str | int | float) -> int:
    """Return bytes for a memory quantity such as ``512Mi``, ``2Gi`` or ``1000``.

    Raises:
        ValueError: the value is not a quantity or is negative.
    """
    if isinstance(value, bool):
        raise ValueError("memory must be a quantity like 512Mi, not a boolean")
    if isinstance(value, int | float):
        if not value >= 0:  # NaN too
            raise ValueError(f"memory must be >= 0, got {value}")
        n = value
    else:
        m = _MEMORY.match(str(value))
        if not m:
            raise ValueError(f"invalid memory quantity {value!r} (use e.g. 512Mi, 2Gi)")
        n = float(m.group(1)) * _MEMORY_UNITS[m.group(2) or ""]
    if n > MAX_MEMORY_BYTES:
        raise ValueError(f"memory {value!r} is more than any machine has (at most 8Ei)")
    return int(n)


def format_memory(n: int) -> str:
    """Format bytes as people read them: ``64Mi``, ``23.5Gi``, ``1000``.

    Whole multiples of a binary unit print exactly (so the result parses back to the same
    number); other values print in the largest unit they reach, with one decimal.
    """
    units = ("Pi", "Ti", "Gi", "Mi", "Ki")
    for i, unit in enumerate(units):
        size = _MEMORY_UNITS[unit]
        if n < size:
            continue
        if n % size == 0:
            return f"{n // size}{unit}"
        if round(n / size, 1) >= 1024 and i > 0:  # 1023.97Mi reads as 1Gi, not 1024Mi
            unit, size = units[i - 1], _MEMORY_UNITS[units[i - 1]]
        return f"{n / size:.1f}".removesuffix(".0") + unit
    return str(n)


def parse_duration(value: str | int | float) -> float:
    """Return seconds for a duration such as ``30s``, ``10m``, ``1h30m``; a number is seconds.

    Raises:
        ValueError: the value is not a duration or is negative.
    """
    if isinstance(value, bool):
        raise ValueError("duration must be like 30s or 10m, not a boolean")
    if isinstance(value, int | float):
        if math.isnan(value) or value < 0:
            raise ValueError(f"duration must be >= 0, got {value}")
        total = float(value)
    else:
        text = str(value).strip()
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h30m)")
    if total > MAX_DURATION_SECONDS:  # infinity too
        raise ValueError(f"duration {value!r} is too long (at most 10000 years)")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds compactly (``1.5s``, ``2m3s``)."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
