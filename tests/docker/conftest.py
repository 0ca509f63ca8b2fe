"""Fixtures for the container runtime tests: a real engine and small local images.

The engine is whatever ``DOCKER_HOST`` (or the default socket) points at; ``.ci/run`` starts
Debian's dockerd. Images are built from Debian packages by ``build_images.sh``, since no
registry is reachable. Without an engine these tests skip, saying why — except under CI
(``CI=true``), where a missing engine is a failure: CI installs one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dockerutil import BUSYBOX, NODE_PREFIX, PYTHON, in_ci, managed_containers

HERE = Path(__file__).parent


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI must provide a container engine: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_api() -> docker.APIClient:
    """An engine client; skips (fails under CI=true) when no engine answers."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        api.ping()
    except Exception as e:
        _unavailable(f"no Docker engine answers at {host}: {e}")
    yield api
    api.close()


def _build(image: str) -> str:
    res = subprocess.run(
        ["bash", str(HERE / "build_images.sh"), image],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return "" if res.returncode == 0 else (res.stdout + res.stderr)[-2000:]


@pytest.fixture(scope="session")
def busybox_image(docker_api) -> str:
    """``tether-test/busybox:latest``, built from Debian's busybox-static if missing."""
    error = _build("busybox")
    if error:
        _unavailable(f"cannot build {BUSYBOX} with tests/docker/build_images.sh: {error}")
    return BUSYBOX


@pytest.fixture(scope="session")
def python_image(docker_api) -> str:
    """``tether-test/python:latest`` (Debian's python3.11-minimal and stdlib); skips if the
    packages cannot be had."""
    error = _build("python")
    if error:
        pytest.skip(f"cannot build {PYTHON} from Debian packages: {error}")
    return PYTHON


@pytest.fixture(autouse=True)
def _remove_test_containers(request):
    yield
    if "docker_api" not in request.fixturenames:
        return
    api = request.getfixturevalue("docker_api")
    for c in managed_containers(api):
        if c["Labels"].get("tether.node", "").startswith(NODE_PREFIX):
            try:
                api.remove_container(c["Id"], force=True)
            except docker.errors.NotFound:
                pass
