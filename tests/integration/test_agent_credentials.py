"""Who may be an agent: on a controller that checks tokens but no node certificates
(``--auth``, or TLS without ``--tls-ca``), a stream with no token and no certificate is
refused, so that no one who merely reaches the port registers a node and is sent the
decrypted secrets of the tasks placed on it."""

from __future__ import annotations

import base64
import os
import queue
import threading
import uuid

import grpc
import pytest
from helpers import Mesh, py

from tether.api.v1 import agent_pb2, agent_pb2_grpc
from tether.api.v1 import types_pb2 as t
from tether.sdk import Secret, Workflow
from tether.sdk.certs import init_ca, issue_controller
from tether.sdk.client import Client


class RogueAgent:
    """A bare gRPC client with no token and no certificate speaking the agent protocol."""

    def __init__(self, address: str, tls_ca: str = "") -> None:
        if tls_ca:
            creds = grpc.ssl_channel_credentials(open(tls_ca, "rb").read())
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.out: queue.Queue = queue.Queue()
        self.received: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.out.put(
            agent_pb2.AgentMessage(
                register=agent_pb2.Register(
                    node="rogue",
                    node_id=uuid.uuid4().hex,
                    capacity=t.Resources(cpu=64, memory_bytes=256 * 2**30),
                    runtime="process",
                )
            )
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _requests(self):
        seq = 0
        while True:
            try:
                msg = self.out.get(timeout=0.3)
            except queue.Empty:
                seq += 1
                msg = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq))
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        try:
            for msg in agent_pb2_grpc.AgentServiceStub(self.channel).Connect(self._requests()):
                self.received.put(msg)
        except grpc.RpcError as e:
            self.error = e
        self.received.put(None)

    def next_of(self, kind: str, timeout: float):
        while True:
            msg = self.received.get(timeout=timeout)
            if msg is None:
                return None
            if msg.WhichOneof("msg") == kind:
                return msg
            for one in msg.batch.messages if msg.WhichOneof("msg") == "batch" else ():
                if one.WhichOneof("msg") == kind:
                    return one

    def close(self) -> None:
        self.out.put(None)
        self.channel.close()


@pytest.mark.parametrize("mode", ["auth", "tls-without-node-ca"])
def test_agent_stream_without_credentials_is_refused(etcd, prefix, tmp_path, mode):
    key = tmp_path / "secrets.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    kw: dict = {"secrets_key_file": str(key), "lease_ttl": 10}
    ca = ""
    if mode == "auth":
        kw["auth"] = True
    else:
        pki = tmp_path / "pki"
        init_ca(pki)
        issue_controller(pki, ["127.0.0.1"])
        kw.update(tls_cert=str(pki / "controller.pem"), tls_key=str(pki / "controller-key.pem"))
        ca = str(pki / "ca.pem")
    mesh = Mesh(etcd.endpoint, prefix, tmp_path / "agents", **kw)
    rogue = None
    try:
        mesh.start_controller()
        with Client(mesh.address, timeout=10, tls_ca=ca, token="") as c:
            admin, _ = c.bootstrap_acl()
        with Client(mesh.address, timeout=10, tls_ca=ca, token=admin) as c:
            c.set_secret("api-key", value := f"s3cr3t-{uuid.uuid4().hex}")
            ci, _ = c.create_token("ci", "submitter")

        rogue = RogueAgent(mesh.address, ca)
        registered = rogue.next_of("registered", 10)
        if registered is None:  # refused: what should happen
            assert rogue.error is not None
            assert rogue.error.code() == grpc.StatusCode.UNAUTHENTICATED
            return
        # A user's CI submits a task that uses the secret; the only node is the rogue.
        with Client(mesh.address, timeout=10, tls_ca=ca, token=ci) as c:
            wf = Workflow("uses-secret")
            wf.task("call", py("pass"), env={"API_KEY": Secret("api-key")}, cpu=0.1)
            c.submit(wf)
        assign = rogue.next_of("assign", 15)
        got = dict(assign.assign.secret_env) if assign is not None else {}
        pytest.fail(
            f"[{mode}] an agent with no token and no node certificate registered as node "
            f"'rogue' and was sent the task's secrets: {got} (value set: {value!r})"
        )
    finally:
        if rogue is not None:
            rogue.close()
        mesh.close()
