"""Which nodes a task may land on: ``node_selector`` and ``affinity`` expressions over labels.

Pure functions over label mappings. A selector key without a ``/`` that a node does not carry
is looked up under ``tether.io/`` too, so ``node_selector: {gpu-model: a100}`` matches the
label ``tether.io/gpu-model=a100`` that agents report by themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "LABEL_PREFIX",
    "OPERATORS",
    "Constraints",
    "Expr",
    "label_of",
]

LABEL_PREFIX = "tether.io/"
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def label_of(labels: Mapping[str, str], key: str) -> str | None:
    """The value of label ``key`` (or of ``tether.io/key`` for a bare key), None if absent."""
    v = labels.get(key)
    if v is None and "/" not in key:
        v = labels.get(LABEL_PREFIX + key)
    return v


@dataclass(frozen=True)
class Expr:
    """One affinity expression: ``key In [a, b]``, ``key NotIn [a]``, ``key Exists``, ...

    ``weight`` 0 makes it required (a filter); a weight > 0 makes it preferred (a score).
    """

    key: str
    op: str
    values: tuple[str, ...] = ()
    weight: int = 0

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` satisfies this expression."""
        v = label_of(labels, self.key)
        if self.op == "In":
            return v is not None and v in self.values
        if self.op == "NotIn":
            return v is None or v not in self.values
        if self.op == "Exists":
            return v is not None
        if self.op == "DoesNotExist":
            return v is None
        raise ValueError(f"unknown affinity operator {self.op!r}")

    def __str__(self) -> str:
        if self.op in ("In", "NotIn"):
            return f"{self.key} {self.op} [{', '.join(self.values)}]"
        return f"{self.key} {self.op}"


@dataclass(frozen=True)
class Constraints:
    """Everything that restricts where a task may go, hashable so that a pass can cache the
    nodes that pass it.

    Attributes:
        selector: ``node_selector`` as sorted (key, value) pairs; all must match.
        required: Required affinity expressions (weight 0); all must match.
        preferred: Preferred expressions; each that matches adds its weight to a node's score.
    """

    selector: tuple[tuple[str, str], ...] = ()
    required: tuple[Expr, ...] = ()
    preferred: tuple[Expr, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.selector or self.required or self.preferred)

    def allows(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` passes the selector and every required expression."""
        for k, v in self.selector:
            if label_of(labels, k) != v:
                return False
        return all(e.matches(labels) for e in self.required)

    def preference(self, labels: Mapping[str, str]) -> int:
        """Sum of the weights of the preferred expressions a node with ``labels`` matches."""
        return sum(e.weight for e in self.preferred if e.matches(labels))

    def describe(self) -> str:
        """The filtering part as a user wrote it: ``gpu-model=a100, zone In [a, b]``."""
        parts = [f"{k}={v}" for k, v in self.selector] + [str(e) for e in self.required]
        return ", ".join(parts)

    def first_unmet(self, labels: Mapping[str, str]) -> str:
        """The first selector entry or required expression a node with ``labels`` fails."""
        for k, v in self.selector:
            if label_of(labels, k) != v:
                return f"{k}={v}"
        for e in self.required:
            if not e.matches(labels):
                return str(e)
        return ""
