"""deploy/Dockerfile and .dockerignore, checked without building (no base image can be pulled
here): two stages, a non-root user, ``ENTRYPOINT ["tether"]``, a health check on the gRPC
health service, and a build context that holds what ``pip install .`` needs and nothing of a
checkout's local state (.venv, .tether-dev, .git). The context is computed with docker-py's
own .dockerignore matcher, and the package is then really built from it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import DEPLOY, ROOT
from docker.utils.build import exclude_paths

DOCKERFILE = DEPLOY / "Dockerfile"
LOCAL_STATE = (".venv", ".tether-dev", ".git")


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            result.append([])
        if result:
            result[-1].append((word, rest))
    return result


def final() -> dict[str, list[str]]:
    d: dict[str, list[str]] = {}
    for word, rest in stages()[-1]:
        d.setdefault(word, []).append(rest)
    return d


def test_two_stages_and_the_runtime_stage_copies_only_the_built_venv():
    s = stages()
    assert len(s) >= 2
    assert s[0][0][1].lower().endswith(" as build")
    copies = final()["COPY"]
    assert copies and all(c.startswith("--from=build ") for c in copies), copies
    for word, rest in instructions():
        if word == "COPY":
            assert not rest.startswith(". "), "COPY . would take the whole checkout"


def test_runs_as_a_non_root_user():
    (user,) = final()["USER"]
    name = user.split(":")[0]
    assert name not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can tell without reading /etc/passwd.
    assert name.isdigit()


def test_entrypoint_is_tether():
    (entrypoint,) = final()["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tether"]


def test_health_check_asks_the_grpc_health_service():
    (healthcheck,) = final()["HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert all(o.startswith("--") for o in shlex.split(options))
    argv = json.loads(command)
    assert argv == ["python", "-m", "tether.controller.healthcheck"]
    res = subprocess.run(
        [sys.executable, "-m", "tether.controller.healthcheck", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0 and "gRPC health service" in res.stdout, res.stderr


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> tuple[set[str], Path]:
    """The files `docker build .` would send: the repository's tracked files plus a
    checkout's local state, filtered by .dockerignore as docker-py filters it."""
    root = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    junk = [
        ".venv/bin/python",
        ".venv/lib/python3.12/site-packages/grpc/__init__.py",
        ".tether-dev/etcd/member/snap/db",
        ".git/HEAD",
        "sdk/__pycache__/cli.cpython-312.pyc",
        "tether.egg-info/PKG-INFO",
        "controller/.venv/bin/python",
    ]
    for name in [*tracked, *junk]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        source = ROOT / name
        path.write_bytes(source.read_bytes() if name in tracked and source.is_file() else b"")
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in patterns if p.strip() and not p.startswith("#")]
    included = exclude_paths(str(root), patterns, dockerfile="deploy/Dockerfile")
    return {p for p in included if (root / p).is_file()}, root


def test_dockerignore_keeps_local_state_out(context):
    files, _ = context
    for f in files:
        parts = Path(f).parts
        assert not set(parts) & set(LOCAL_STATE), f
        assert "__pycache__" not in parts and ".egg-info" not in f, f
        assert parts[0] != "tests", f


def test_context_holds_every_copy_source(context):
    files, _ = context
    for word, rest in stages()[0]:
        if word != "COPY":
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in files), (
                f"COPY {source}: not in the build context"
            )


def test_package_builds_from_the_context_alone(context, tmp_path):
    files, root = context
    only = tmp_path / "context"
    for f in files:
        (only / f).parent.mkdir(parents=True, exist_ok=True)
        (only / f).write_bytes((root / f).read_bytes())
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    res = subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path / "dist"), str(only)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "dist").glob("tether-*.whl"))
