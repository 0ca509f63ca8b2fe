"""How the controller reaches etcd: endpoint URLs, TLS and user/password authentication.

``--etcd`` takes what etcdctl's ``--endpoints`` takes: ``http://h:2379``, ``https://h:2379``
or a bare ``h:2379``, comma-separated. An ``https://`` endpoint, or a bare one with any of
``--etcd-ca``/``--etcd-cert``/``--etcd-key``, is reached over TLS. One connection carries all
endpoints, so they must agree: plaintext and TLS endpoints cannot be mixed (silently falling
back to plaintext for some members would leak what the TLS ones protect).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from etcd3aio.connections import ConnectionManager

__all__ = ["EtcdConnection", "EtcdEndpoint", "parse_endpoints"]

_SCHEMES = {"http": False, "https": True}
# The largest answer taken from etcd: a range page of 1,000 records at the spec limits.
MAX_ETCD_RESPONSE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EtcdEndpoint:
    """One etcd member: where it is and whether its URL asked for TLS (None: bare)."""

    host: str
    port: int
    tls: bool | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(text: str | Sequence[str]) -> tuple[EtcdEndpoint, ...]:
    """Parse etcd endpoints the way etcdctl's ``--endpoints`` takes them.

    Args:
        text: ``"http://h:2379,https://h2:2379"``, ``"h:2379"``, or a sequence of such items.

    Raises:
        ValueError: an endpoint is malformed, naming it.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [_parse_one(item.strip()) for item in items if item.strip()]
    if not out:
        raise ValueError("etcd: at least one endpoint is needed")
    return tuple(out)


def _parse_one(item: str) -> EtcdEndpoint:
    shown = item if len(item) <= 100 else item[:100] + "..."
    tls: bool | None = None
    rest = item
    if "://" in item:
        scheme, rest = item.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise ValueError(f"etcd: {shown!r}: scheme must be http or https")
        tls = _SCHEMES[scheme.lower()]
        rest = rest.rstrip("/")
        if "/" in rest:
            raise ValueError(f"etcd: {shown!r}: an endpoint URL has no path")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"etcd: {shown!r}: use [IPv6]:PORT")
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            if tls is None:
                raise ValueError(f"etcd: {shown!r}: use host:port or a URL")
            host, port_text = rest, "2379"
    if not host or ("[" in host or "]" in host):
        raise ValueError(f"etcd: {shown!r}: no host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"etcd: {shown!r}: port must be 1-65535")
    return EtcdEndpoint(host, int(port_text), tls)


@dataclass(frozen=True)
class EtcdConnection:
    """Everything needed to open the controller's connection to etcd.

    Attributes:
        endpoints: The etcd members.
        ca_file: PEM file of the CA that signed etcd's server certificates; empty with TLS
            uses the system's roots.
        cert_file: PEM client certificate, for etcd's ``--client-cert-auth``.
        key_file: PEM key of ``cert_file``.
        user: etcd user name; empty when etcd's auth is off.
        password_file: File whose first line is ``user``'s password (never a flag value, which
            would show in ``ps``).
    """

    endpoints: tuple[EtcdEndpoint, ...]
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    user: str = ""
    password_file: str = ""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("etcd-cert and etcd-key: give both or neither")
        if bool(self.user) != bool(self.password_file):
            raise ValueError("etcd-user and etcd-password-file: give both or neither")
        schemes = {e.tls for e in self.endpoints if e.tls is not None}
        if len(schemes) > 1:
            raise ValueError("etcd: cannot mix http:// and https:// endpoints in one connection")
        tls_flags = bool(self.ca_file or self.cert_file)
        if schemes == {False} and tls_flags:
            raise ValueError("etcd: TLS files given for http:// endpoints; use https://")

    @classmethod
    def from_config(cls, config) -> EtcdConnection:
        """The connection a :class:`~tether.controller.config.ControllerConfig` describes."""
        return cls(
            parse_endpoints(config.etcd_endpoints),
            ca_file=config.etcd_ca,
            cert_file=config.etcd_cert,
            key_file=config.etcd_key,
            user=config.etcd_user,
            password_file=config.etcd_password_file,
        )

    @property
    def tls(self) -> bool:
        return any(e.tls for e in self.endpoints) or bool(self.ca_file or self.cert_file)

    def password(self) -> str:
        """The password from ``password_file`` (its first line).

        Raises:
            ValueError: the file cannot be read or is empty, naming it.
        """
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"etcd-password-file: cannot read {self.password_file}: {e}") from e
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ValueError(f"etcd-password-file: {self.password_file} is empty")
        return lines[0]

    def describe(self) -> str:
        """The endpoints as URLs, for messages (no secrets)."""
        scheme = "https" if self.tls else "http"
        return ",".join(f"{scheme}://{e.address}" for e in self.endpoints)

    def channel_manager(self) -> _Channels:
        """What :class:`etcd3aio.Etcd3Client` builds its gRPC channel with."""
        return _Channels(self)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from e


class _Channels(ConnectionManager):
    """etcd3aio's channel factory, taught hostnames, IPv6, URLs and TLS with system roots.

    etcd3aio targets ``ipv4:a,b`` (IP literals only): one endpoint is dialled by name instead,
    so DNS and certificate host checks work as for any gRPC client; several are resolved once
    to their IPv4 addresses for round-robin, and TLS then checks the first endpoint's host
    name against every member's certificate.
    """

    def __init__(self, connection: EtcdConnection) -> None:
        super().__init__([e.address for e in connection.endpoints])
        # gRPC's default reconnect backoff grows to 120 s: after etcd was away for a few
        # seconds the channel would sit out its backoff well past etcd's return, and the
        # controller would serve again seconds late. etcd is a few local members: redial often.
        self.grpc_options = [
            *self.grpc_options,
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # A page of 1,000 records can pass gRPC's default 4 MiB (a task's spec may be
            # 256 KiB): refused, a new leader could not load the runs and would never lead.
            ("grpc.max_receive_message_length", MAX_ETCD_RESPONSE_BYTES),
        ]
        self._connection = connection
        eps = connection.endpoints
        self._server_name: str | None = None
        if len(eps) == 1:
            self.target = f"dns:///{eps[0].address}"
        else:
            self.target = "ipv4:" + ",".join(_ipv4(e) for e in eps)
            self._server_name = eps[0].host

    def get_channel(self, **_ignored) -> grpc.aio.Channel:
        c = self._connection
        if not c.tls:
            return grpc.aio.insecure_channel(self.target, options=self.grpc_options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(c.ca_file, "etcd-ca") if c.ca_file else None,
            private_key=_read(c.key_file, "etcd-key") if c.key_file else None,
            certificate_chain=_read(c.cert_file, "etcd-cert") if c.cert_file else None,
        )
        options = list(self.grpc_options)
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return grpc.aio.secure_channel(self.target, credentials, options=options)


def _ipv4(e: EtcdEndpoint) -> str:
    try:
        ip = ipaddress.ip_address(e.host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(e.host, e.port, socket.AF_INET)[0][4][0])
        except OSError as err:
            raise ValueError(f"etcd: cannot resolve {e.host}: {err}") from err
    if ip.version != 4:
        raise ValueError(f"etcd: {e.address}: several endpoints must be IPv4; give one for IPv6")
    return f"{ip}:{e.port}"
