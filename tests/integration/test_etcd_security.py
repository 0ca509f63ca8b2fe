"""The controller against a real etcd that demands TLS with client certificates, and against
one with user/password auth enabled: it works with the right settings and is refused, with a
clear message and at once, without them."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import PY, Mesh, R, assert_one_line_error, py, tether

from tether.controller.errors import StoreUnavailable
from tether.controller.etcd_connection import EtcdConnection, parse_endpoints
from tether.controller.etcd_process import find_etcd, free_port
from tether.controller.store import Store
from tether.sdk import Workflow

_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _ca(directory: Path, name: str):
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(directory / name, cert, key)
    return cert, key


def _leaf(directory: Path, name: str, ca, server: bool) -> None:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    _write(directory / name, builder.sign(ca_key, hashes.SHA256()), key)


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("etcd did not listen")


def _etcd(tmp: Path, scheme: str, extra: list[str]):
    port, peer = free_port(), free_port()
    client = f"{scheme}://127.0.0.1:{port}"
    log = tmp / "etcd.log"
    proc = subprocess.Popen(
        [
            find_etcd(),
            "--data-dir",
            str(tmp / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
            "--log-level",
            "warn",
            "--unsafe-no-fsync",
            *extra,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    _wait_port(port, proc, log)
    return proc, client


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ca = _ca(d, "ca")
    _leaf(d, "server", ca, server=True)
    _leaf(d, "client", ca, server=False)
    _leaf(d, "stranger", _ca(d, "other-ca"), server=False)
    return d


@pytest.fixture(scope="module")
def tls_etcd(certs, tmp_path_factory):
    """etcd serving only https and accepting only clients with a certificate from our CA."""
    proc, url = _etcd(
        tmp_path_factory.mktemp("etcd-tls"),
        "https",
        [
            "--cert-file",
            str(certs / "server.pem"),
            "--key-file",
            str(certs / "server.key"),
            "--trusted-ca-file",
            str(certs / "ca.pem"),
            "--client-cert-auth",
        ],
    )
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    """Plaintext etcd with auth enabled: user root, password from a file."""
    tmp = tmp_path_factory.mktemp("etcd-auth")
    proc, url = _etcd(tmp, "http", [])
    etcdctl = str(Path(find_etcd()).with_name("etcdctl"))
    for args in (["user", "add", "root:root-pw"], ["auth", "enable"]):
        subprocess.run([etcdctl, "--endpoints", url, *args], check=True, capture_output=True)
    (tmp / "password").write_text("root-pw\n")
    (tmp / "wrong").write_text("nope\n")
    yield url, tmp
    proc.terminate()
    proc.wait(10)


def _run_one_task(mesh: Mesh) -> None:
    mesh.add_agent("n1")
    wf = Workflow("secure-etcd")
    wf.task("hello", py("print('hi')"))
    run = mesh.client().submit(wf).wait(timeout=30)
    assert run.state == R.RUN_STATE_SUCCEEDED, run


def test_controller_runs_on_tls_etcd_with_client_certificate(tls_etcd, certs, prefix, tmp_path):
    mesh = Mesh(
        tls_etcd,
        prefix,
        tmp_path,
        etcd_ca=str(certs / "ca.pem"),
        etcd_cert=str(certs / "client.pem"),
        etcd_key=str(certs / "client.key"),
    )
    try:
        mesh.start_controller()
        _run_one_task(mesh)
    finally:
        mesh.close()


def _refusal(url: str, **kw) -> str:
    async def attempt() -> str:
        store = Store(EtcdConnection(parse_endpoints(url), **kw), "/refused")
        try:
            await store.connect()
            with pytest.raises(StoreUnavailable) as info:
                await store.wait_ready(deadline=1.0)
            return str(info.value)
        finally:
            await store.close()

    return asyncio.run(attempt())


@pytest.mark.parametrize(
    "case", ["no-client-cert", "cert-of-other-ca", "system-roots", "plaintext-to-tls"]
)
def test_tls_etcd_refuses_wrong_credentials(tls_etcd, certs, case):
    ca = str(certs / "ca.pem")
    kw = {
        "no-client-cert": {"ca_file": ca},
        "cert-of-other-ca": {
            "ca_file": ca,
            "cert_file": str(certs / "stranger.pem"),
            "key_file": str(certs / "stranger.key"),
        },
        "system-roots": {},
    }.get(case)
    url = tls_etcd if kw is not None else tls_etcd.replace("https://", "http://")
    message = _refusal(url, **(kw or {}))
    assert "etcd not reachable at" in message


def test_cli_controller_on_tls_etcd(tls_etcd, certs, prefix, tmp_path):
    port = free_port()
    log = tmp_path / "controller.log"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "tether.sdk.cli",
            "controller",
            "--etcd",
            tls_etcd,
            "--etcd-ca",
            str(certs / "ca.pem"),
            "--etcd-cert",
            str(certs / "client.pem"),
            "--etcd-key",
            str(certs / "client.key"),
            "--prefix",
            prefix,
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            res = tether("nodes", controller=f"127.0.0.1:{port}")
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert res.returncode == 0, res.stderr + log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_inconsistent_etcd_flags(certs):
    # A configuration error: one line naming the problem.
    res = tether("controller", "--etcd", "http://a:1,https://b:1")
    assert_one_line_error(res, "cannot mix http:// and https://")
    res = tether("controller", "--etcd", "http://127.0.0.1:1", "--etcd-ca", str(certs / "ca.pem"))
    assert_one_line_error(res, "use https://")


def test_controller_logs_in_to_etcd_with_auth(auth_etcd, prefix, tmp_path):
    url, tmp = auth_etcd
    mesh = Mesh(url, prefix, tmp_path, etcd_user="root", etcd_password_file=str(tmp / "password"))
    try:
        mesh.start_controller()
        _run_one_task(mesh)
    finally:
        mesh.close()


@pytest.mark.parametrize("case", ["wrong-password", "no-user"])
def test_auth_etcd_refuses_at_once(auth_etcd, case):
    url, tmp = auth_etcd
    kw = {"user": "root", "password_file": str(tmp / "wrong")} if case == "wrong-password" else {}
    started = time.monotonic()
    message = _refusal(url, **kw)
    assert "etcd refused" in message
    assert ("user 'root'" if kw else "--etcd-user") in message
    assert time.monotonic() - started < 1.0  # refused, not retried until the deadline


def test_cli_wrong_etcd_password_is_one_line(auth_etcd, prefix):
    url, tmp = auth_etcd
    res = tether(
        "controller",
        "--etcd",
        url,
        "--etcd-user",
        "root",
        "--etcd-password-file",
        str(tmp / "wrong"),
        "--prefix",
        prefix,
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert_one_line_error(res, "etcd refused user 'root'")


def test_a_user_limited_to_its_prefix_runs_the_mesh_and_compacts_etcd(auth_etcd, prefix, tmp_path):
    # etcd lets any authenticated user compact (the whole keyspace's history).
    url, _ = auth_etcd
    user, role = f"limited{prefix.replace('/', '-')}", f"rw{prefix.replace('/', '-')}"
    etcdctl = [str(Path(find_etcd()).with_name("etcdctl")), "--endpoints", url]
    for args in (
        ["user", "add", f"{user}:limited-pw"],
        ["role", "add", role],
        ["role", "grant-permission", role, "--prefix=true", "readwrite", prefix],
        ["user", "grant-role", user, role],
    ):
        subprocess.run([*etcdctl, "--user", "root:root-pw", *args], check=True, capture_output=True)
    password = tmp_path / "password"
    password.write_text("limited-pw\n")
    mesh = Mesh(url, prefix, tmp_path, etcd_user=user, etcd_password_file=str(password))
    try:
        controller = mesh.start_controller(etcd_compaction_interval=0.2)
        _run_one_task(mesh)
        compactor = controller.engine.compactor
        mesh.wait_for(lambda: compactor.compacted > 0, 10, "a compaction")
        again = Workflow("after-compaction")
        again.task("hello", py("print('hi')"))
        assert mesh.client().submit(again).wait(timeout=30).state == R.RUN_STATE_SUCCEEDED
    finally:
        mesh.close()
