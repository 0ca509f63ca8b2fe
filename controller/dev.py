"""``tether dev``: a whole mesh on this machine — etcd, a controller and N agents.

etcd runs from the installed binary with a data directory (so state survives a restart of
``tether dev``), the controller runs in this process, and each agent is a subprocess, as it
would be on a real node. Ctrl-C stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click
from pydantic import ValidationError

from tether.controller.config import ControllerConfig
from tether.controller.etcd_process import EtcdInUse, EtcdProcess, free_port
from tether.controller.secretbox import generate_key_file
from tether.controller.server import ControllerServer
from tether.sdk.cli_globals import log_level_option
from tether.sdk.constants import DEFAULT_CONTROLLER
from tether.sdk.quantities import parse_duration
from tether.sdk.telemetry import setup_logging
from tether.sdk.terminal import key_values


def metrics_addresses(listen: str, agents: int) -> list[str]:
    """Where the controller (first) and each agent serve metrics under ``--metrics-listen
    HOST:PORT``: PORT, PORT+1, ... (free ports when PORT is 0)."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not host:
        raise click.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--metrics-listen")
    first = int(port)
    ports = [first + i for i in range(agents + 1)] if first else []
    if not first:
        ports = [free_port() for _ in range(agents + 1)]
    return [f"{host}:{p}" for p in ports]


# The ControllerConfig fields that tether dev's flags set, so a refusal names the flag.
_FLAGS = {"listen": "--listen", "lease_ttl": "--lease-ttl", "metrics_listen": "--metrics-listen"}


def dev_config(**fields) -> ControllerConfig:
    """The controller's configuration, checked before anything starts.

    Raises:
        click.BadParameter: a flag's value is refused (naming the flag).
        click.ClickException: another setting is refused.
    """
    try:
        return ControllerConfig(**fields)
    except ValueError as e:  # pydantic's ValidationError is one
        errors = e.errors() if isinstance(e, ValidationError) else [{"msg": str(e), "loc": ()}]
        first = errors[0]
        msg = first["msg"].removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        if first["loc"]:
            field, rest = str(first["loc"][0]), msg
        elif not sep:
            field = ""
        if field in _FLAGS:
            raise click.BadParameter(rest, param_hint=_FLAGS[field]) from None
        raise click.ClickException(msg) from None


def _spawn_agent(
    i: int,
    address: str,
    data_dir: Path,
    log_level: str,
    metrics_listen: str = "",
    drain_grace: float = 0.0,
) -> subprocess.Popen:
    name = f"dev-{i}"
    log = open(data_dir / f"agent-{name}.log", "ab")
    metrics = ["--metrics-listen", metrics_listen] if metrics_listen else []
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tether.sdk.cli",
            "agent",
            "--controller",
            address,
            "--name",
            name,
            "--label",
            f"dev.index={i}",
            "--label",
            "zone=local",
            "--work-dir",
            str(data_dir / "agents" / name),
            "--log-level",
            log_level,
            "--drain-grace",
            f"{drain_grace:f}s",
            *metrics,
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        # A terminal's Ctrl-C goes to its whole foreground process group: the agent would
        # take dev's SIGTERM that follows for a second signal and cut its drain short.
        process_group=0,
        # dev is plaintext on loopback: a user's TLS settings are for their real cluster.
        # Nor the controller's metrics address, which the agents would all try to take.
        env={
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith("TETHER_TLS_") and k != "TETHER_METRICS_LISTEN"
            },
            "TETHER_LOG_FORMAT": "json",
        },
    )


# The children have process groups of their own, so a closed terminal's SIGHUP reaches only
# dev, which stops them.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_dev(
    agents: int,
    data_dir: Path,
    listen: str,
    etcd_port: int,
    run_file: str | None,
    log_level: str,
    lease_ttl: int,
    metrics_listen: str = "",
    params: dict[str, str] | None = None,
    drain_grace: float = 0.0,
) -> int:
    """Bring the mesh up; with ``run_file``, run that workflow (with ``params``) to
    completion and stop.

    With ``metrics_listen`` (``HOST:PORT``) the controller serves metrics on PORT and agent
    i on PORT+i (see :func:`metrics_addresses`). On a signal, the agents' running tasks
    may finish within ``drain_grace`` seconds; what still runs then is stopped.
    """
    metrics = metrics_addresses(metrics_listen, agents) if metrics_listen else []
    data_dir = data_dir.resolve()
    # Stopped by dev after the agents: a Ctrl-C must not end it while they drain.
    etcd = EtcdProcess(data_dir / "etcd", etcd_port, own_process_group=True)
    # Kept with the data dir, so secrets set in one session decrypt in the next.
    key_path = data_dir / "secrets.key"
    # Checked before etcd starts: a bad flag must not leave an etcd running on the data dir.
    config = dev_config(
        etcd_endpoints=(etcd.endpoint,),
        listen=listen,
        lease_ttl=lease_ttl,
        secrets_key_file=str(key_path),
        metrics_listen=metrics[0] if metrics else "",
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(log_level, json=True, stream=open(data_dir / "controller.log", "a"))
    procs: list[subprocess.Popen] = []
    server: ControllerServer | None = None
    started = False
    code = 0
    try:
        try:
            etcd.start()
        except EtcdInUse as e:
            raise click.ClickException(
                f"{e}: a tether dev still running, or one left behind; stop it, or pass "
                "another --data-dir"
            ) from None
        except (RuntimeError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
        started = True
        generate_key_file(key_path)
        server = ControllerServer(config)
        await server.start()
        address = server.address
        procs = [
            _spawn_agent(
                i + 1,
                address,
                data_dir,
                log_level,
                metrics[i + 1] if metrics else "",
                drain_grace,
            )
            for i in range(agents)
        ]
        click.echo(
            f"tether dev: etcd {etcd.endpoint}, controller {address}, "
            f"{agents} agents; logs in {data_dir}/",
            err=True,
        )
        names = ["controller"] + [f"dev-{i + 1}" for i in range(agents)]
        for who, where in zip(names, metrics, strict=False):
            click.echo(f"tether dev: metrics of {who} at http://{where}/metrics", err=True)
        click.echo(
            f"tether dev: plaintext gRPC on loopback {address}, no TLS and no tokens "
            "(development only; see 'Running a real cluster' in the README)",
            err=True,
        )
        from tether.sdk.client import Client

        client = Client(address, tls_ca="")
        await _wait_for_nodes(client, agents)
        click.echo(f"tether dev: {agents} nodes registered", err=True)
        if run_file:
            # A signal ends the run's wait here, and the finally below stops the mesh (by
            # default SIGTERM would end the process there and then, leaving etcd and the
            # agents running). The wait runs in a daemon thread: one still asking a stopped
            # controller must not hold up the exit.
            main = asyncio.current_task()
            signalled: list[int] = []
            loop = asyncio.get_running_loop()
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, lambda s=sig: (signalled.append(s), main.cancel()))
            try:
                code = await _in_daemon_thread(_run_workflow, client, run_file, params or {})
            except asyncio.CancelledError:
                if not signalled:
                    raise
                click.echo("tether dev: stopping", err=True)
                code = 128 + signalled[0]
                # The thread may be starting a call on the client's channel: closing it from
                # here then crashes the process (gRPC). Left open, the thread stops with the
                # interpreter.
                client = None
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            click.echo("tether dev: ready — Ctrl-C to stop", err=True)
            await stop.wait()
        if client is not None:
            client.close()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                # The drain, then the tasks' stop (SIGTERM, a grace, SIGKILL) and the
                # agent's own exit.
                await asyncio.to_thread(p.wait, drain_grace + 15)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            if server is not None:
                await server.stop()
        finally:
            etcd.stop()  # whatever failed above, the etcd this started goes too
        if started:
            click.echo("tether dev: stopped", err=True)
    return code


async def _in_daemon_thread(fn, *args):
    """``fn(*args)`` in a daemon thread; its result (or exception) once it returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if done.done():
            return  # no longer waited for (cancelled)
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as e:
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, daemon=True, name="tether-dev-run").start()
    return await done


async def _wait_for_nodes(client, n: int, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if len(await asyncio.to_thread(client.nodes)) >= n:
                return
        except Exception:  # not up yet
            pass
        await asyncio.sleep(0.2)
    raise click.ClickException(f"agents did not register within {timeout:.0f}s; see the logs")


def _run_workflow(client, run_file: str, params: dict[str, str]) -> int:
    from tether.api.v1 import types_pb2 as t
    from tether.sdk.spec import load_workflow
    from tether.sdk.terminal import console, follow_run, print_results

    wf = load_workflow(run_file)
    run = client.submit(wf, params=params)
    console.print(f"run [bold]{run.id}[/] ({wf.name})", highlight=False)
    final = follow_run(client, run.id)
    print_results(final)
    return 0 if final.state == t.RunState.RUN_STATE_SUCCEEDED else 1


@click.command("dev")
@click.option("--agents", default=2, show_default=True, help="Number of local agents.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path(".tether-dev"),
    show_default=True,
    help="etcd data, agent work dirs and logs.",
)
@click.option("--listen", default=DEFAULT_CONTROLLER, show_default=True, help="Controller address.")
@click.option("--etcd-port", default=0, help="etcd client port [default: a free port].")
@click.option(
    "--run",
    "run_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run this workflow to completion, print its results, then stop.",
)
@click.option(
    "--param",
    "-p",
    multiple=True,
    help="Parameter KEY=VALUE of the --run workflow (repeatable), as for 'tether submit'.",
)
@click.option("--lease-ttl", default=10, show_default=True, help="Node lease TTL, seconds.")
@log_level_option(envvar=None)
@click.option(
    "--drain-grace",
    default="0s",
    show_default=True,
    help="On Ctrl-C, how long the agents' running tasks may finish before they are stopped "
    "(they run again when a mesh next starts on this data dir), e.g. 30s.",
)
@click.option(
    "--metrics-listen",
    default="",
    help="Serve Prometheus metrics: the controller's at http://HOST:PORT/metrics, agent i's "
    "on PORT+i (PORT 0: free ports, printed).",
)
def dev_command(
    agents,
    data_dir,
    listen,
    etcd_port,
    run_file,
    param,
    log_level,
    lease_ttl,
    drain_grace,
    metrics_listen,
):
    """Run a local mesh: etcd, a controller and AGENTS agents, in the foreground."""
    if agents < 1:
        raise click.BadParameter("at least one agent", param_hint="--agents")
    try:
        grace = parse_duration(drain_grace)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--drain-grace") from None
    if param and not run_file:
        raise click.UsageError("--param is for the workflow of --run")
    params = key_values(param, "--param")
    if metrics_listen:
        metrics_addresses(metrics_listen, agents)  # a bad address fails before anything starts
    code = asyncio.run(
        run_dev(
            agents,
            data_dir,
            listen,
            etcd_port,
            run_file,
            log_level,
            lease_ttl,
            metrics_listen,
            params,
            grace,
        )
    )
    sys.exit(code)
