"""Long ``depends_on`` lists, stored apart from their task's record.

A task's record is rewritten at each of its state changes; a join over 100,000 parents would
make each of those writes about 1 MiB (and over etcd's request cap at a few more parents).
So a list longer than :data:`SPLIT_NAMES` is written once, at submit, in parts of
:data:`PART_NAMES` names (``<prefix>/deps/<run>/<task>/<part>``); the task's record keeps
``depends_on_parts`` instead. The cache and every reply hold the whole list.
"""

from __future__ import annotations

from collections.abc import Iterable

from tether.api.v1 import types_pb2 as t
from tether.controller.store import Keys, Put, Store

__all__ = ["PART_NAMES", "SPLIT_NAMES", "part_puts", "restore", "stored_record"]

# Task names are at most 128 characters (max_id_length), so a part stays under 66 KiB and a
# record keeps at most 33 KiB of names.
SPLIT_NAMES = 256
PART_NAMES = 512


def _parts(spec: t.TaskSpec) -> int:
    n = len(spec.depends_on)
    return 0 if n <= SPLIT_NAMES else -(-n // PART_NAMES)


def stored_record(msg: t.TaskRun) -> bytes:
    """The task's record as etcd keeps it: without a long depends_on list."""
    parts = _parts(msg.spec)
    if not parts:
        return msg.SerializeToString()
    copy = t.TaskRun()
    copy.CopyFrom(msg)
    copy.spec.ClearField("depends_on")
    copy.depends_on_parts = parts
    return copy.SerializeToString()


def part_puts(keys: Keys, msg: t.TaskRun) -> list[Put]:
    """The writes of a task's depends_on parts (none for a short list)."""
    deps = msg.spec.depends_on
    return [
        Put(
            keys.depends_on_part(msg.run_id, msg.spec.name, i),
            t.DependsOnPart(
                depends_on=deps[i * PART_NAMES : (i + 1) * PART_NAMES]
            ).SerializeToString(),
        )
        for i in range(_parts(msg.spec))
    ]


async def restore(store: Store, msgs: Iterable[t.TaskRun], revision: int = 0) -> None:
    """Put the stored-apart depends_on lists back into task records read from etcd."""
    for m in msgs:
        if not m.depends_on_parts:
            continue
        prefix = store.keys.depends_on_of(m.run_id, m.spec.name)
        kvs, _ = await store.range(prefix, revision=revision)
        for kv in kvs:  # ascending: part numbers are zero-padded
            m.spec.depends_on.extend(t.DependsOnPart.FromString(kv.value).depends_on)
        m.depends_on_parts = 0
