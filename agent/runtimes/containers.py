"""What a task's container looks like: the pure part of the ``docker`` runtime.

Turns a :class:`LaunchSpec` into the arguments of the Docker Engine API's container create
call, so that the mapping (limits, GPUs, mounts, labels) can be checked without an engine.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

from docker.types import DeviceRequest, LogConfig

from tether.agent.layout import NODE_LABEL
from tether.agent.runtimes.base import LaunchSpec, RuntimeError_

__all__ = [
    "MANAGED_LABEL",
    "MOUNT",
    "PULL_POLICIES",
    "container_name",
    "create_args",
    "device_requests",
    "pull_policy",
]

# Where the attempt directory (inputs, output file) appears inside the container.
MOUNT = PurePosixPath("/tether")

# Marks the containers a Tether agent made, beside the attempt's own labels (layout.py).
MANAGED_LABEL = "tether.managed"

PULL_POLICIES = ("if-not-present", "always", "never")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")


def container_name(spec: LaunchSpec) -> str:
    """``tether-<run>-<task>-<attempt>``: unique in the mesh, and readable in ``docker ps``."""
    return "tether-" + _NAME_BAD.sub("_", spec.name)


def pull_policy(spec: LaunchSpec) -> str:
    """The spec's image pull policy, ``if-not-present`` when unset."""
    policy = spec.image_pull_policy or "if-not-present"
    if policy not in PULL_POLICIES:
        raise RuntimeError_(f"unknown image pull policy {policy!r}", reason="image")
    return policy


def device_requests(gpu_indices: list[int]) -> list[DeviceRequest]:
    """The NVIDIA device request for the GPUs the scheduler chose; none without GPUs.

    Only tasks given GPUs carry a request, because an engine without the NVIDIA container
    runtime refuses to start any container that has one.
    """
    if not gpu_indices:
        return []
    return [
        DeviceRequest(
            driver="nvidia",
            device_ids=[str(i) for i in gpu_indices],
            capabilities=[["gpu"]],
        )
    ]


def _log_config(limit: int) -> LogConfig:
    # The engine's copy of the output is what the log files are written from, and json-file
    # can be read back on every engine. It is bounded like the files, with room for JSON
    # framing, which makes short lines many times larger than the text they hold.
    if limit <= 0:
        return LogConfig(type="json-file", config={})
    return LogConfig(
        type="json-file", config={"max-size": str(max(16 * limit, 8 * 2**20)), "max-file": "2"}
    )


def create_args(spec: LaunchSpec, node: str) -> tuple[dict, dict]:
    """Keyword arguments for ``APIClient.create_container`` and ``create_host_config``.

    The task's ``command`` replaces the image's entrypoint (as a Kubernetes ``command``
    does): it names the program, not arguments to a wrapper. The attempt directory is
    bind-mounted at :data:`MOUNT`; it is also the default working directory.

    Args:
        spec: The attempt to run.
        node: This agent's node name, recorded as a label so a restarted agent finds its own
            containers on an engine that other nodes' agents may share.

    Raises:
        RuntimeError_: The spec cannot be run in a container (no image, no command).
    """
    if not spec.image:
        raise RuntimeError_("the docker runtime needs an image: set the task's image", "image")
    if not spec.command:
        raise RuntimeError_("the task has no command")
    labels = {**spec.labels, MANAGED_LABEL: "true", NODE_LABEL: node}
    container = {
        "image": spec.image,
        "entrypoint": spec.command[:1],
        "command": spec.command[1:],
        "environment": dict(spec.env),
        "working_dir": spec.working_dir or str(MOUNT),
        "labels": labels,
        "name": container_name(spec),
        "stdin_open": False,
        "tty": False,
    }
    host = {
        "binds": {os.path.abspath(spec.attempt_dir): {"bind": str(MOUNT), "mode": "rw"}},
        # A tiny init as PID 1 forwards SIGTERM to the task (a program that is PID 1 itself
        # ignores it) and reaps zombies, so a cancel ends within the grace period.
        "init": True,
        "log_config": _log_config(spec.log_limit_bytes),
    }
    if spec.cpu > 0:
        host["nano_cpus"] = int(spec.cpu * 1e9)
    if spec.memory_bytes > 0:
        # The same limit for memory and memory+swap: no swap, so exceeding it is an OOM kill.
        host["mem_limit"] = spec.memory_bytes
        host["memswap_limit"] = spec.memory_bytes
    requests = device_requests(spec.gpu_indices)
    if requests:
        host["device_requests"] = requests
    return container, host
