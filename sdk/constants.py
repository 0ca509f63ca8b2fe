"""Facts the SDK, the controller and the agent share, each written once.

The controller and the agent import these so that a limit a user is told about (say, the
size of a task's output) is the limit every part enforces.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CONTROLLER",
    "DEFAULT_PRIORITY",
    "INT32_MAX",
    "INT64_MAX",
    "LOG_TAIL_BYTES",
    "MAX_OUTPUT_BYTES",
    "POLICY_NAMES",
    "RUN_ID_PATTERN",
]

# What a run id looks like (the controller's new_run_id: 12 hex digits of milliseconds, then 8
# random ones). An agent's work-dir cleaner removes only directories so named.
RUN_ID_PATTERN = r"[0-9a-f]{20}"

# Where `tether dev` listens and where clients and agents look when told nothing else.
DEFAULT_CONTROLLER = "127.0.0.1:7070"

# A task's JSON result ($TETHER_OUTPUT_FILE): small, because it lives in etcd with the task
# and is passed to every downstream task.
MAX_OUTPUT_BYTES = 64 * 1024

# How much of the end of each of an attempt's stdout and stderr is kept with the task in etcd;
# the whole logs stay on the node.
LOG_TAIL_BYTES = 4096

# Placement policies a workflow may name (`scheduling.policy`); the controller implements
# exactly these (a test checks the two agree).
# "first-fit" is the earlier releases' name of fifo, still accepted.
POLICY_NAMES = ("binpack", "spread", "fifo", "least-connections", "critical-path", "first-fit")

# A task's priority when its spec sets none (0..100, higher first).
DEFAULT_PRIORITY = 50

# The largest values of the API's int32 and int64 fields (an attempt number, a revision):
# protobuf refuses a larger Python int with a bare "Value out of range".
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
