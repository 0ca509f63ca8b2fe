"""Helpers shared by the container runtime tests (fixtures are in this folder's conftest)."""

from __future__ import annotations

import os
from pathlib import Path

import docker

from tether.agent import layout
from tether.agent.runtimes.base import LaunchSpec

BUSYBOX = "tether-test/busybox:latest"
PYTHON = "tether-test/python:latest"
# Docker tests name their nodes with this prefix; their containers are removed after each test.
NODE_PREFIX = "dt-"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def is_podman(api: docker.APIClient) -> bool:
    """Podman's Docker-compatible API (which ignores device requests, for one)."""
    components = api.version().get("Components") or []
    return any("podman" in c.get("Name", "").lower() for c in components)


def managed_containers(api: docker.APIClient, **labels: str) -> list[dict]:
    """Tether-managed containers (running or not) having these extra labels."""
    wanted = ["tether.managed=true", *(f"{k}={v}" for k, v in labels.items())]
    return api.containers(all=True, filters={"label": wanted})


def launch_spec(
    work_dir: Path,
    command: list[str],
    run: str = "r1",
    task: str = "t",
    attempt: int = 1,
    **kw,
) -> LaunchSpec:
    """A LaunchSpec laid out as the runner lays attempts out (the attempt dir is created)."""
    d = layout.attempt_dir(work_dir, run, task, attempt)
    d.mkdir(parents=True, exist_ok=True)
    kw.setdefault("image", BUSYBOX)
    kw.setdefault("env", {})
    return LaunchSpec(
        name=f"{run}-{task}-{attempt}",
        command=command,
        working_dir=kw.pop("working_dir", ""),
        attempt_dir=d,
        stdout_path=d / layout.STDOUT_FILE,
        stderr_path=d / layout.STDERR_FILE,
        labels={
            layout.RUN_LABEL: run,
            layout.TASK_LABEL: task,
            layout.ATTEMPT_LABEL: str(attempt),
            **kw.pop("labels", {}),
        },
        **kw,
    )
