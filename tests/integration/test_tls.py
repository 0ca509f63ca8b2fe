"""TLS on the controller port and node identity, with real certificates and real processes.

Every refusal is checked three ways: the right gRPC status, one clear line from the CLI, and
nothing changed in etcd (a dump of the mesh's keys before and after).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from helpers import (
    ControllerProcess,
    Mesh,
    assert_one_line_error,
    etcd_dump,
    health,
    tether,
    wait_for,
)

from tether.agent.agent import Agent, AgentRefused
from tether.agent.config import AgentConfig
from tether.agent.identity import WorkDirBusy
from tether.api.v1 import agent_pb2, agent_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk import Workflow
from tether.sdk.certs import init_ca, issue_controller, issue_node
from tether.sdk.client import Client


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA with a controller certificate for 127.0.0.1 and nodes node-a and node-b."""
    d = tmp_path_factory.mktemp("pki")
    init_ca(d)
    issue_controller(d, ["127.0.0.1", "localhost"])
    issue_node(d, "node-a")
    issue_node(d, "node-b")
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """Another CA that also issued a certificate for node-a."""
    d = tmp_path_factory.mktemp("other-ca")
    init_ca(d, name="Someone else's CA")
    issue_node(d, "node-a")
    return d


@pytest.fixture
def tls_controller(etcd, prefix, pki, tmp_path):
    ctl = ControllerProcess(
        etcd.endpoint,
        prefix,
        tmp_path / "controller.log",
        extra_args=(
            "--tls-cert",
            str(pki / "controller.pem"),
            "--tls-key",
            str(pki / "controller-key.pem"),
            "--tls-ca",
            str(pki / "ca.pem"),
        ),
        tls_ca=str(pki / "ca.pem"),
    )
    ctl.start()
    # TLS turns auth on: the tests act as the mesh's first admin.
    with Client(ctl.address, timeout=5, tls_ca=str(pki / "ca.pem"), token="") as c:
        ctl.token, _ = c.bootstrap_acl()
    yield ctl
    ctl.stop()


def agent_args(controller: str, work_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tether.sdk.cli",
        "agent",
        "--controller",
        controller,
        "--work-dir",
        str(work_dir),
        "--cpu",
        "2",
        "--memory",
        "1Gi",
        "--log-level",
        "error",
        *args,
    ]


def run_agent(controller: str, work_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``tether agent`` until it exits (a refused agent exits at once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        agent_args(controller, work_dir, *args),
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "COLUMNS": "200"},
    )


def node_names(client: Client) -> list[str]:
    return sorted(n.name for n in client.nodes())


def test_agent_with_its_node_certificate_runs_a_task_over_tls(tls_controller, pki, tmp_path):
    ca = str(pki / "ca.pem")
    proc = subprocess.Popen(
        agent_args(
            tls_controller.address,
            tmp_path / "a",
            "--tls-cert",
            str(pki / "node-node-a.pem"),
            "--tls-key",
            str(pki / "node-node-a-key.pem"),
            "--tls-ca",
            ca,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(
            tls_controller.address, timeout=5, tls_ca=ca, token=tls_controller.token
        ) as client:
            # No --name: the node is the one its certificate names.
            wait_for(lambda: node_names(client) == ["node-a"], 20, "node-a registered")
            wf = Workflow("over-tls")
            wf.task("hello", [sys.executable, "-c", "print('hi over tls')"])
            run = client.submit(wf).wait(timeout=30)
            assert run.state == t.RunState.RUN_STATE_SUCCEEDED
            assert run.tasks[0].node == "node-a"
        listed = tether(
            "--tls-ca",
            ca,
            "--token",
            tls_controller.token,
            "nodes",
            controller=tls_controller.address,
        )
        assert listed.returncode == 0, listed.stderr
        assert "node-a" in listed.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_plaintext_client_is_refused_by_a_tls_controller(tls_controller, etcd, prefix):
    before = etcd_dump(etcd.endpoint, prefix)
    res = tether("nodes", controller=tls_controller.address, timeout=60)
    assert_one_line_error(res, "controller unavailable", "pass --tls-ca")
    with pytest.raises(grpc.RpcError) as e:
        health(tls_controller.address, "")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert etcd_dump(etcd.endpoint, prefix) == before


def test_a_tls_client_of_a_plaintext_controller_is_told_so(mesh: Mesh, pki):
    res = tether("nodes", "--tls-ca", str(pki / "ca.pem"), controller=mesh.address, timeout=60)
    assert_one_line_error(res, "controller unavailable", "serves plaintext")


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("no certificate", ["refused node node-a", "no node certificate", "--tls-cert"]),
        ("another CA", ["refused node node-a", "node certificate not accepted"]),
        ("another node", ["PERMISSION_DENIED", "'node-a'", "'node-b'"]),
    ],
)
def test_agent_without_a_valid_node_certificate_is_refused(
    case, needles, tls_controller, pki, other_ca, etcd, prefix, tmp_path
):
    ca = str(pki / "ca.pem")
    args = {
        "no certificate": ["--name", "node-a", "--tls-ca", ca],
        "another CA": [
            "--tls-cert",
            str(other_ca / "node-node-a.pem"),
            "--tls-key",
            str(other_ca / "node-node-a-key.pem"),
            "--tls-ca",
            ca,
        ],
        "another node": [
            "--name",
            "node-a",
            "--tls-cert",
            str(pki / "node-node-b.pem"),
            "--tls-key",
            str(pki / "node-node-b-key.pem"),
            "--tls-ca",
            ca,
        ],
    }[case]
    before = etcd_dump(etcd.endpoint, prefix)
    res = run_agent(tls_controller.address, tmp_path / "w", *args)
    assert_one_line_error(res, *needles)
    assert etcd_dump(etcd.endpoint, prefix) == before
    with Client(tls_controller.address, timeout=5, tls_ca=ca, token=tls_controller.token) as client:
        assert node_names(client) == []


def test_agent_refusal_codes_over_raw_grpc(tls_controller, pki, other_ca):
    """The statuses themselves: UNAUTHENTICATED for a missing or foreign certificate,
    PERMISSION_DENIED for another node's."""

    async def connect(node: str, cert_dir: Path | None, cert_node: str) -> grpc.StatusCode:
        from tether.sdk.certs import sign_challenge

        creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        cert = (cert_dir / f"node-{cert_node}.pem").read_bytes() if cert_dir else b""
        key = (cert_dir / f"node-{cert_node}-key.pem").read_bytes() if cert_dir else b""
        out: asyncio.Queue = asyncio.Queue()
        out.put_nowait(
            agent_pb2.AgentMessage(register=agent_pb2.Register(node=node, certificate=cert))
        )

        async def requests():
            while (msg := await out.get()) is not None:
                yield msg

        async with grpc.aio.secure_channel(tls_controller.address, creds) as ch:
            call = agent_pb2_grpc.AgentServiceStub(ch).Connect(requests())
            try:
                async for msg in call:
                    if msg.WhichOneof("msg") == "challenge" and key:
                        sig = sign_challenge(key, msg.challenge.challenge, node)
                        out.put_nowait(
                            agent_pb2.AgentMessage(proof=agent_pb2.NodeProof(signature=sig))
                        )
                    elif msg.WhichOneof("msg") == "registered":
                        out.put_nowait(None)
                        return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.UNKNOWN

    cases = [
        ("node-a", None, "node-a", grpc.StatusCode.UNAUTHENTICATED),
        ("node-a", other_ca, "node-a", grpc.StatusCode.UNAUTHENTICATED),
        ("node-a", pki, "node-b", grpc.StatusCode.PERMISSION_DENIED),
        ("node-b", pki, "node-b", grpc.StatusCode.OK),
    ]
    for node, cert_dir, cert_node, want in cases:
        assert asyncio.run(connect(node, cert_dir, cert_node)) == want, (node, cert_node)


def test_controller_refuses_plaintext_on_a_network_address(etcd, prefix):
    res = tether("controller", "--etcd", etcd.endpoint, "--prefix", prefix, "--listen", "0.0.0.0:0")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "--insecure" in res.stderr and "TLS" in res.stderr


def test_insecure_controller_on_a_network_address_says_so_loudly(etcd, prefix, tmp_path):
    ctl = ControllerProcess(etcd.endpoint, prefix, tmp_path / "c.log", extra_args=("--insecure",))
    ctl.args[ctl.args.index("--listen") + 1] = f"0.0.0.0:{ctl.port}"
    ctl.start(leader=False)
    try:
        deadline = time.monotonic() + 10
        while "plaintext" not in (tmp_path / "c.log").read_text().lower():
            assert time.monotonic() < deadline, "no plaintext warning"
            time.sleep(0.1)
        assert "WARNING: serving plaintext" in (tmp_path / "c.log").read_text()
    finally:
        ctl.stop()


# Without TLS (dev): node ids keep a second agent from taking a connected node.


def test_second_agent_claiming_a_connected_node_is_refused(mesh: Mesh, etcd, prefix, tmp_path):
    first = mesh.add_agent("n1", labels={"team": "ml"})
    before = etcd_dump(etcd.endpoint, prefix)
    res = run_agent(mesh.address, tmp_path / "evil", "--name", "n1", "--label", "evil=yes")
    assert_one_line_error(res, "ALREADY_EXISTS", "is connected from another agent")
    assert "refused node n1" in res.stderr
    time.sleep(0.5)  # no flapping: the first agent stays registered, once
    assert first.connected.is_set() and first.registrations == 1
    assert etcd_dump(etcd.endpoint, prefix) == before
    node = mesh.client().nodes()[0]
    assert dict(node.labels) == {"team": "ml"}


def test_refusal_status_is_already_exists(mesh: Mesh, tmp_path):
    mesh.add_agent("n1")
    second = Agent(AgentConfig(controller=mesh.address, node="n1", work_dir=tmp_path / "b"))
    with pytest.raises(AgentRefused, match="is connected from another agent"):
        mesh.call(second.run(), timeout=20)
    mesh.call(second.stop())


def test_same_agent_coming_back_replaces_its_old_stream(mesh: Mesh):
    """A reconnect with the same node id wins over the controller's stale stream; another
    node id is refused while that stream lives."""

    async def scenario():
        async with grpc.aio.insecure_channel(mesh.address) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            streams = []

            async def register(node_id: str):
                out: asyncio.Queue = asyncio.Queue()
                out.put_nowait(
                    agent_pb2.AgentMessage(
                        register=agent_pb2.Register(
                            node="n9", node_id=node_id, capacity=t.Resources(cpu=1)
                        )
                    )
                )

                async def requests():
                    while (msg := await out.get()) is not None:
                        yield msg

                call = stub.Connect(requests())
                streams.append((call, out))
                first = await call.read()
                return call, first

            old, first = await register("same-node")
            assert first.WhichOneof("msg") == "registered"
            _new, first = await register("same-node")
            assert first.WhichOneof("msg") == "registered"
            # The old stream is closed by the controller: it ends without an error.
            assert await asyncio.wait_for(old.read(), 5) is grpc.aio.EOF
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await register("another-node")
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "n9" in e.value.details()
            for call, out in streams:
                out.put_nowait(None)
                call.cancel()

    mesh.call(scenario(), timeout=20)


def test_one_work_dir_serves_one_agent(mesh: Mesh):
    first = mesh.add_agent("n1")
    twin = Agent(AgentConfig(controller=mesh.address, node="n1", work_dir=first.config.work_dir))
    with pytest.raises(WorkDirBusy, match="another agent"):
        mesh.call(twin.run(), timeout=10)
    node_id = (first.config.work_dir / "node-id").read_text().strip()
    assert node_id == first.node_id and len(node_id) == 32
    # The node id survives a restart of the agent: it is the same node coming back.
    mesh.stop_agent("n1")
    again = mesh.add_agent("n1")
    assert again.node_id == node_id
