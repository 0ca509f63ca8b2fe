"""The ``docker`` runtime: each attempt is a container, through the Docker Engine API.

Works with Docker, and with Podman through its Docker-compatible socket. Every engine call
goes through the ``docker`` SDK's low-level client in a thread: short calls (create, start,
inspect, kill, remove) in the loop's executor, calls that last as long as a container (wait,
logs, pulls) in daemon threads of their own (see ``threads.py``).

A container is removed only after the controller has acknowledged its attempt's final report
(``TaskHandle.remove``): until then it is the durable record from which a restarted agent
recovers the result (``recover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePosixPath

import docker
import docker.errors
import requests

from tether.agent.config import AgentConfig
from tether.agent.layout import (
    ATTEMPT_LABEL,
    NODE_LABEL,
    RUN_LABEL,
    STDERR_FILE,
    STDOUT_FILE,
    TASK_LABEL,
    attempt_dir,
    attempt_relative,
)
from tether.agent.runtimes.acl import grant_default_acl
from tether.agent.runtimes.base import ExitStatus, LaunchSpec, RecoveredTask, RuntimeError_
from tether.agent.runtimes.containers import MANAGED_LABEL, MOUNT, create_args, pull_policy
from tether.agent.runtimes.docker_logs import LogFollower, follow_logs
from tether.agent.runtimes.threads import in_thread
from tether.sdk.telemetry import get_logger

__all__ = ["DockerRuntime"]

log = get_logger("agent.docker")

# Long-lived streams (a wait and two logs per container) each hold a pooled connection.
_POOL_SIZE = 64
_PROGRESS_EVERY = 2.0  # seconds between pull progress events
# remove_tree: how many recent images it may try, where it mounts the directory, the label
# that tells its containers from tasks', and how long one may take (seconds).
_CLEANUP_IMAGES = 4
_CLEANUP_MOUNT = "/gone"
_CLEANUP_LABEL = "tether.cleanup"
_CLEANUP_TIMEOUT = 300
# Exit codes of a cleanup container whose image has no usable ``rm`` (try the next).
_NO_RM = (126, 127)
# Beside an attempt's directory ("1.image"): the image it ran.
IMAGE_SUFFIX = ".image"
# What an engine call raises when the engine refuses it or cannot be reached.
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


def _explain(e: Exception) -> str:
    if isinstance(e, docker.errors.APIError):
        return str(e.explanation or e)
    return str(e)


def _status_code(e: Exception) -> int:
    return getattr(e, "status_code", 0) or 0


_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$")


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an engine timestamp (RFC 3339 with nanoseconds); 0 if none."""
    m = _STAMP.match(stamp or "")
    if m is None or stamp.startswith("0001-"):  # Go's zero time: never started
        return 0.0
    zone = m[3] if m[3] and m[3] != "Z" else "+00:00"
    return datetime.fromisoformat(m[1] + zone).timestamp() + float(m[2] or 0)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class _ContainerHandle:
    """A started (or recovered) container."""

    def __init__(
        self,
        api: docker.APIClient,
        container_id: str,
        logs: list[LogFollower],
        engine_reports_oom: bool = True,
    ) -> None:
        self.api = api
        self.id = container_id
        self._logs = logs
        self._engine_reports_oom = engine_reports_oom
        self._stopped = False
        self._exit: asyncio.Future | None = None
        self._result: ExitStatus | None = None
        self._removed = False

    def _exited(self) -> asyncio.Future:
        # One engine wait per container, shared by wait() and stop().
        if self._exit is None:
            self._exit = in_thread(self.api.wait, self.id, name=f"wait {self.id[:12]}")
        return self._exit

    async def wait(self) -> ExitStatus:
        if self._result is not None:
            return self._result
        try:
            waited = await asyncio.shield(self._exited())
        except asyncio.CancelledError:
            # The agent is letting go of this container (it stays running for the next
            # agent to adopt): stop writing its logs, which that agent rewrites.
            await self._close_logs()
            raise
        except _ENGINE_ERRORS as e:
            await self._close_logs()
            self._result = ExitStatus(-1, "runtime_error", f"lost the container: {_explain(e)}")
            return self._result
        await asyncio.gather(*(f.finish() for f in self._logs))
        try:
            info = await asyncio.to_thread(self.api.inspect_container, self.id)
        except docker.errors.DockerException:
            info = {}
        self._result = _exit_status(
            waited, info, guess_oom=not self._engine_reports_oom and not self._stopped
        )
        return self._result

    async def _close_logs(self) -> None:
        for f in self._logs:
            f.close()
        for f in self._logs:
            await f.join(1.0)

    def _kill(self, sig: signal.Signals) -> None:
        try:
            self.api.kill(self.id, signal=int(sig))
        except _ENGINE_ERRORS as e:
            # Mostly "not running any more" (409, or other codes on other engines); the wait
            # that follows says how the container ended either way.
            if _status_code(e) != 409:
                log.info("cannot signal container", container=self.id[:12], error=_explain(e))

    async def stop(self, grace: float) -> None:
        exited = self._exited()
        if exited.done():
            return
        self._stopped = True
        # Signals are sent by hand rather than with the engine's stop, whose timeout is whole
        # seconds: grace periods here may be fractions.
        await asyncio.to_thread(self._kill, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), grace)
            return
        except TimeoutError:
            pass
        except _ENGINE_ERRORS:
            return
        await asyncio.to_thread(self._kill, signal.SIGKILL)
        with contextlib.suppress(*_ENGINE_ERRORS):
            await asyncio.shield(exited)

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for f in self._logs:
            f.close()
        try:
            await asyncio.to_thread(self.api.remove_container, self.id, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if _status_code(e) != 409:  # 409: its removal is already in progress
                self._removed = False
                raise RuntimeError_(f"cannot remove container {self.id[:12]}: {_explain(e)}") from e


def _exit_status(waited: dict, info: dict, guess_oom: bool = False) -> ExitStatus:
    """The exit status from the engine's wait result and inspection.

    ``guess_oom``: the engine does not flag OOM kills (Podman on cgroup v1), so a SIGKILL
    that Tether did not send to a container with a memory limit is taken for one.
    """
    state = info.get("State") or {}
    code = waited.get("StatusCode", state.get("ExitCode", -1))
    limit = (info.get("HostConfig") or {}).get("Memory") or 0
    at = f" (limit {_mib(limit)})" if limit else ""
    if state.get("OOMKilled") and code != 0:
        return ExitStatus(code, "oom", f"killed: out of memory{at}")
    if guess_oom and limit and code == 128 + signal.SIGKILL:
        return ExitStatus(
            code, "oom", f"killed by SIGKILL at a memory limit{at}: most likely out of memory"
        )
    error = (waited.get("Error") or {}).get("Message") or state.get("Error") or ""
    if error:
        return ExitStatus(code, "runtime_error", error)
    return ExitStatus(code)


class DockerRuntime:
    """Runs tasks as containers through the Docker Engine API (Docker or Podman).

    Args:
        config: The agent's configuration: ``docker_host`` (else ``DOCKER_HOST`` or the
            default socket), ``node``, ``work_dir`` and ``log_limit_bytes`` (for the logs of
            recovered containers; started ones use their ``LaunchSpec.log_limit_bytes``).
        api: An engine client to use instead of connecting (tests, benchmarks).
    """

    name = "docker"

    def __init__(self, config: AgentConfig, api: docker.APIClient | None = None) -> None:
        self.config = config
        self._api = api
        self._connecting = asyncio.Lock()
        self._connected = False
        # Docker flags OOM kills in State.OOMKilled; Podman (on cgroup v1 at least) does not.
        self._engine_reports_oom = True
        self._pulls: dict[str, asyncio.Future] = {}
        # Whose files a container's are to stay deletable by (see acl.py): the agent's user,
        # unless it is root, who may delete anything anyway.
        self.owner_uid = os.geteuid()
        self._acls = True  # False once the work dir's file system turned ACLs down

    # The engine ---------------------------------------------------------------------------

    def _connect(self) -> docker.APIClient:
        kwargs = docker.utils.kwargs_from_env()
        if self.config.docker_host:
            kwargs["base_url"] = self.config.docker_host
        return docker.APIClient(version="auto", max_pool_size=_POOL_SIZE, **kwargs)

    async def api(self) -> docker.APIClient:
        """The engine client, connected on first use.

        Raises:
            RuntimeError_: The engine does not answer.
        """
        async with self._connecting:
            if not self._connected:
                try:
                    api = self._api or await asyncio.to_thread(self._connect)
                    version = await asyncio.to_thread(api.version)
                except docker.errors.DockerException as e:
                    host = self.config.docker_host or os.environ.get("DOCKER_HOST", "default")
                    raise RuntimeError_(f"docker engine ({host}) unavailable: {e}") from e
                components = {c.get("Name", "") for c in version.get("Components") or []}
                self._engine_reports_oom = not any("podman" in c.lower() for c in components)
                self._api = api
                self._connected = True
            return self._api

    def task_path(self, host_path: str | Path) -> str:
        relative = attempt_relative(self.config.work_dir, Path(host_path))
        return str(MOUNT / PurePosixPath(relative))

    # Images -------------------------------------------------------------------------------

    async def _ensure_image(self, api: docker.APIClient, spec: LaunchSpec) -> None:
        policy = pull_policy(spec)
        if policy != "always":
            try:
                await asyncio.to_thread(api.inspect_image, spec.image)
                return
            except docker.errors.ImageNotFound:
                if policy == "never":
                    raise RuntimeError_(
                        f"image {spec.image} is not on node {self.config.node} and its pull "
                        "policy is never",
                        reason="image",
                    ) from None
            except docker.errors.APIError as e:
                raise RuntimeError_(f"image {spec.image}: {_explain(e)}", "image") from e
        await self._pull(api, spec)

    async def _pull(self, api: docker.APIClient, spec: LaunchSpec) -> None:
        emit = spec.on_event or (lambda kind, message: None)
        pulling = self._pulls.get(spec.image)
        if pulling is None:
            emit("pulling", f"pulling image {spec.image}")
            pulling = in_thread(
                self._pull_blocking, api, spec.image, _threadsafe(emit), name="pull"
            )
            self._pulls[spec.image] = pulling
            pulling.add_done_callback(lambda _: self._pulls.pop(spec.image, None))
        else:
            emit("pulling", f"waiting for the pull of image {spec.image} already under way")
        started = time.monotonic()
        try:
            await asyncio.shield(pulling)
        except docker.errors.DockerException as e:
            raise RuntimeError_(f"pulling image {spec.image}: {_explain(e)}", "image") from e
        except RuntimeError_:
            raise
        emit("pulled", f"pulled image {spec.image} in {time.monotonic() - started:.1f}s")

    @staticmethod
    def _pull_blocking(api: docker.APIClient, image: str, emit: Callable[[str, str], None]) -> None:
        layers: dict[str, tuple[int, int]] = {}
        last = time.monotonic()
        for item in api.pull(image, stream=True, decode=True):
            if "error" in item:
                raise RuntimeError_(f"pulling image {image}: {item['error']}", "image")
            detail = item.get("progressDetail") or {}
            if item.get("id") and detail.get("total"):
                layers[item["id"]] = (detail.get("current", 0), detail["total"])
            if time.monotonic() - last >= _PROGRESS_EVERY and layers:
                last = time.monotonic()
                done = sum(c for c, _ in layers.values())
                total = sum(t for _, t in layers.values())
                emit("pulling", f"pulling image {image}: {_mib(done)} of {_mib(total)}")

    # Attempts -----------------------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> _ContainerHandle:
        try:
            return await self._start(spec)
        except requests.exceptions.RequestException as e:  # the engine went away
            raise RuntimeError_(f"docker engine unreachable: {e}") from e

    async def _start(self, spec: LaunchSpec) -> _ContainerHandle:
        container, host = create_args(spec, self.config.node)
        api = await self.api()
        with spec.phase("pull"):
            await self._ensure_image(api, spec)
        self._record_image(spec)
        # The image may run as a user other than root; it must still write its output file.
        os.chmod(spec.attempt_dir, 0o777)
        if self.owner_uid != 0 and self._acls:
            self._grant_acl(str(spec.attempt_dir))
        with spec.phase("create"):
            try:
                cid = await asyncio.to_thread(self._create, api, container, host)
            except docker.errors.ImageNotFound as e:
                raise RuntimeError_(f"image {spec.image}: {_explain(e)}", "image") from e
            except docker.errors.APIError as e:
                raise RuntimeError_(f"cannot create the container: {_explain(e)}") from e
        with spec.phase("start"):
            try:
                await asyncio.to_thread(api.start, cid)
            except docker.errors.APIError as e:
                with contextlib.suppress(docker.errors.DockerException):
                    await asyncio.to_thread(api.remove_container, cid, force=True)
                raise RuntimeError_(f"cannot start the container: {_explain(e)}") from e
        logs = follow_logs(
            api,
            cid,
            Path(spec.stdout_path),
            Path(spec.stderr_path),
            spec.log_limit_bytes,
            on_truncate=_truncation_reporter(spec),
        )
        return _ContainerHandle(api, cid, logs, self._engine_reports_oom)

    @staticmethod
    def _create(api: docker.APIClient, container: dict, host: dict) -> str:
        kwargs = dict(container, host_config=api.create_host_config(**host))
        try:
            return api.create_container(**kwargs)["Id"]
        except docker.errors.APIError as e:
            if _status_code(e) != 409:
                raise
        # A container of this very attempt is left from an earlier try to start it that
        # never reported (an agent that died between create and start): replace it.
        api.remove_container(container["name"], force=True)
        return api.create_container(**kwargs)["Id"]

    async def recover(self) -> list[RecoveredTask]:
        """The containers this node's agents made that were not removed yet.

        Their log files are rewritten from the engine's copy (followed to the end for running
        ones), so output written while no agent was watching is kept.
        """
        api = await self.api()
        await self._remove_stale_cleanups(api)
        found = await asyncio.to_thread(
            api.containers,
            all=True,
            filters={"label": [f"{MANAGED_LABEL}=true", f"{NODE_LABEL}={self.config.node}"]},
        )
        out = []
        for c in found:
            try:
                info = await asyncio.to_thread(api.inspect_container, c["Id"])
            except docker.errors.NotFound:
                continue  # removed meanwhile
            labels = (info.get("Config") or {}).get("Labels") or {}
            try:
                d = attempt_dir(
                    self.config.work_dir,
                    labels[RUN_LABEL],
                    labels[TASK_LABEL],
                    int(labels[ATTEMPT_LABEL]),
                )
            except (KeyError, ValueError):
                log.warning("container without attempt labels; left alone", container=c["Id"])
                continue
            state = info.get("State") or {}
            if state.get("Status") == "created":
                # Created, never started (the agent died in between): nothing ran, so there
                # is no result to report; the engine would report exit code 0. Removed and
                # left out, the controller runs the attempt again, as if never created.
                log.info("removing a container that never started", container=c["Id"])
                with contextlib.suppress(docker.errors.DockerException):
                    await asyncio.to_thread(api.remove_container, c["Id"], force=True)
                continue
            running = bool(state.get("Running") or state.get("Paused") or state.get("Restarting"))
            logs = follow_logs(
                api,
                c["Id"],
                d / STDOUT_FILE,
                d / STDERR_FILE,
                self.config.log_limit_bytes,
                follow=running,
            )
            out.append(
                RecoveredTask(
                    labels=dict(labels),
                    handle=_ContainerHandle(api, c["Id"], logs, self._engine_reports_oom),
                    running=running,
                    started_at=_epoch(state.get("StartedAt", "")),
                )
            )
        return out

    # Work dir cleanup ---------------------------------------------------------------------

    async def remove_tree(self, path: Path) -> bool:
        """Delete the entries of the run directory ``path`` as root, in a short-lived
        container that mounts it: what a task's root container left there with modes that
        keep this agent's user out (a tar archive's 0755 directories, say; ``acl.py`` covers
        the usual case). The container borrows ``rm`` from an image the run's own attempts
        ran (the latest first; one without ``rm`` is skipped), so no other submitter's image
        ever sees the run's files. Whether it worked; ``path`` itself stays.
        """
        if self.owner_uid == 0:
            return False  # root could delete it all: what failed is not a permission
        names, images = await in_thread(_run_entries, path, name="tether-cleanup-scan")
        if not names:
            return True
        if not images:
            log.warning(
                "no image of this run is recorded to delete its root-owned files with",
                path=str(path),
            )
            return False
        api = await self.api()
        targets = [f"{_CLEANUP_MOUNT}/{name}" for name in names]
        for image in images:
            code = await in_thread(
                self._remove_with, api, image, str(path), targets, name="tether-cleanup"
            )
            if code == 0:
                log.info("removed root-owned files with the engine", path=str(path), image=image)
                return True
            if code not in _NO_RM:
                break  # rm ran and failed, or the engine did: the next sweep tries again
        return False

    def _remove_with(self, api: docker.APIClient, image: str, path: str, targets: list[str]) -> int:
        """Run ``rm -rf targets`` as root in a container of ``image`` with ``path`` mounted;
        its exit code, 127 when ``rm`` could not be started, -1 when the engine failed. The
        container is labelled apart from tasks' (recovery removes it) and removed here."""
        cid = ""
        try:
            host = api.create_host_config(
                binds={path: {"bind": _CLEANUP_MOUNT, "mode": "rw"}}, network_mode="none"
            )
            cid = api.create_container(
                image,
                entrypoint=["rm", "-rf", "--"],
                command=targets,
                user="0:0",
                labels={_CLEANUP_LABEL: self.config.node},
                host_config=host,
            )["Id"]
            try:
                api.start(cid)
            except docker.errors.APIError as e:  # no rm in this image (or no such image)
                log.debug("cleanup container did not start", image=image, error=_explain(e))
                return 127
            return int(api.wait(cid, timeout=_CLEANUP_TIMEOUT).get("StatusCode", -1))
        except _ENGINE_ERRORS as e:
            log.warning("cleanup container failed", image=image, error=_explain(e))
            return -1
        finally:
            if cid:
                with contextlib.suppress(*_ENGINE_ERRORS):
                    api.remove_container(cid, v=True, force=True)

    async def _remove_stale_cleanups(self, api: docker.APIClient) -> None:
        """Remove cleanup containers an earlier agent of this node left (it died mid-way)."""
        found = await asyncio.to_thread(
            api.containers, all=True, filters={"label": f"{_CLEANUP_LABEL}={self.config.node}"}
        )
        for c in found:
            with contextlib.suppress(*_ENGINE_ERRORS):
                await asyncio.to_thread(api.remove_container, c["Id"], v=True, force=True)

    def _grant_acl(self, attempt_dir: str) -> None:
        """Put the default ACL on ``attempt_dir`` (see ``acl.py``). Only cleanup depends on
        it, so a failure is logged and the attempt goes on."""
        try:
            self._acls = grant_default_acl(attempt_dir, self.owner_uid)
        except OSError as e:
            log.warning("cannot set the attempt directory's ACL", path=attempt_dir, error=str(e))
            return
        if not self._acls:
            log.warning(
                "the work dir's file system has no ACLs: directories containers create as "
                "root there are deleted only through the engine",
                work_dir=str(self.config.work_dir),
            )

    @staticmethod
    def _record_image(spec: LaunchSpec) -> None:
        """Note the attempt's image beside its directory (in the task's, where its
        container cannot write), for :meth:`remove_tree`."""
        attempt = Path(spec.attempt_dir)  # a str from the runner
        record = attempt.with_name(attempt.name + IMAGE_SUFFIX)
        record.write_text(spec.image)


def _run_entries(path: Path) -> tuple[list[str], list[str]]:
    """The entries of the run directory ``path``, and the images its attempts ran, the
    latest first."""
    names = os.listdir(path)
    records = sorted(path.glob(f"*/*{IMAGE_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    images: list[str] = []
    for record in records:
        image = record.read_text().strip()
        if image and image not in images:
            images.append(image)
    return names, images[:_CLEANUP_IMAGES]


def _truncation_reporter(spec: LaunchSpec) -> Callable[[str], None] | None:
    if spec.on_event is None:
        return None
    emit = _threadsafe(spec.on_event)
    limit = spec.log_limit_bytes
    return lambda stream: emit(
        "log_truncated", f"{stream} reached the log limit of {limit} bytes; the rest was discarded"
    )


def _threadsafe(fn: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """``fn`` made callable from another thread: the call runs on the current loop."""
    loop = asyncio.get_running_loop()

    def call(kind: str, message: str) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, kind, message)

    return call
