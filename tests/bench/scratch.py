"""Scratch directories for benchmarks, removed when the benchmark ends.

A benchmark's etcd data and agents' work dirs reach hundreds of MB; left behind, a few runs
fill the disk. ``BENCH_KEEP_DIRS=1`` keeps them (their paths go to stderr) for a look after.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def new_scratch_dir(prefix: str, parent: str | Path | None = None) -> Path:
    """A new directory under ``parent`` (default: the system's temporary directory)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_scratch_dir(path: Path) -> None:
    """Remove ``path`` and all in it, unless ``BENCH_KEEP_DIRS`` is set or an exception is on
    its way through the ``finally`` this is called from: then the directory, which holds the
    logs of what failed (a controller's, etcd's), is kept and its path printed."""
    if os.environ.get("BENCH_KEEP_DIRS") or sys.exc_info()[0] is not None:
        print(f"kept {path}", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)
