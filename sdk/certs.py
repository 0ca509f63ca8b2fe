"""Certificates for a Tether mesh: a CA, the controller's server certificate, node certificates.

A node certificate names its node twice: as the subject's common name and as the URI SAN
``spiffe://tether/node/NAME`` (the SAN is what the controller reads). It is good for client
authentication only, so a stolen node key cannot pose as a controller. The controller's
certificate carries its host names and IPs as SANs and is good for server authentication.

Agents prove their node with the certificate's key: the controller sends a random challenge on
the agent's stream and the agent signs it (:func:`sign_challenge`, :func:`verify_node`). This is
done in the application rather than by TLS client certificates because grpcio can ask for
client certificates only by requiring them on the whole port, and users' clients (CLI, SDK)
carry tokens, not certificates, on the same port.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

__all__ = [
    "NODE_URI_PREFIX",
    "CertError",
    "Issued",
    "challenge_payload",
    "init_ca",
    "issue_controller",
    "issue_node",
    "node_name_of",
    "sign_challenge",
    "verify_node",
]

NODE_URI_PREFIX = "spiffe://tether/node/"
_CA_DAYS = 3650
_LEAF_DAYS = 365
# Domain separation: a signature over a Tether challenge can never be replayed as anything else.
_CHALLENGE_CONTEXT = b"tether-node-auth-v1\x00"


class CertError(ValueError):
    """A certificate, key or certificate directory is missing or unusable."""


@dataclass(frozen=True)
class Issued:
    """Files written by an issue command."""

    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Created 0600 from the start: a key must never be readable by others, not even briefly
    # (a leftover .tmp is removed first: opened again, it would keep its own mode).
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(directory: Path, name: str = "Tether CA", force: bool = False) -> Issued:
    """Create a CA in ``directory``: ``ca.pem`` and ``ca-key.pem`` (mode 0600).

    Raises:
        CertError: The directory already has a CA and ``force`` is False (a new CA would
            orphan every certificate issued by the old one).
    """
    directory = Path(directory)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if not force and (cert_path.exists() or key_path.exists()):
        raise CertError(f"{directory} already has a CA ({cert_path.name}); use --force to replace")
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return Issued(cert_path, key_path)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key(
            (directory / "ca-key.pem").read_bytes(), password=None
        )
    except FileNotFoundError as e:
        raise CertError(f"no CA in {directory}: run 'tether certs init --dir {directory}'") from e
    except ValueError as e:
        raise CertError(f"cannot read the CA in {directory}: {e}") from e
    return cert, key  # type: ignore[return-value]


def _leaf(
    directory: Path,
    stem: str,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: list[x509.ObjectIdentifier],
    days: int,
) -> Issued:
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory = Path(directory)
    issued = Issued(directory / f"{stem}.pem", directory / f"{stem}-key.pem")
    _write(issued.key, _key_pem(key), private=True)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return issued


# A DNS name a certificate may hold: labels of letters, digits and hyphens, a leading
# wildcard label allowed.
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.match(host):
        raise CertError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def issue_controller(directory: Path, hosts: list[str], days: int = _LEAF_DAYS) -> Issued:
    """Write ``controller.pem`` and ``controller-key.pem``, valid for ``hosts``.

    Args:
        directory: The CA's directory (from :func:`init_ca`).
        hosts: Names and IP addresses clients and agents dial; IPs become IP SANs.
    """
    if not hosts:
        raise CertError("give at least one --host the controller is reached by")
    return _leaf(
        directory,
        "controller",
        hosts[0],
        [_host_name(h) for h in dict.fromkeys(hosts)],
        [ExtendedKeyUsageOID.SERVER_AUTH],
        days,
    )


def issue_node(directory: Path, name: str, days: int = _LEAF_DAYS) -> Issued:
    """Write ``node-NAME.pem`` and ``node-NAME-key.pem``: the identity of node ``name``."""
    if not name or "/" in name:
        raise CertError(f"invalid node name {name!r}")
    return _leaf(
        directory,
        f"node-{name}",
        name,
        [x509.UniformResourceIdentifier(NODE_URI_PREFIX + name)],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        days,
    )


def node_name_of(cert_pem: bytes) -> str:
    """The node a node certificate names (its ``spiffe://tether/node/`` URI SAN)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as e:
        raise CertError(f"not a node certificate: {e}") from None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_URI_PREFIX):
            return uri[len(NODE_URI_PREFIX) :]
    raise CertError("not a node certificate: it has no spiffe://tether/node/ name")


def challenge_payload(challenge: bytes, node: str) -> bytes:
    """What an agent signs: the controller's challenge bound to the node it registers as."""
    return _CHALLENGE_CONTEXT + challenge + b"\x00" + node.encode()


def sign_challenge(key_pem: bytes, challenge: bytes, node: str) -> bytes:
    """Sign a controller's challenge with a node key (ECDSA P-256 / SHA-256)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("node keys must be EC keys (as 'tether certs issue' writes them)")
    return key.sign(challenge_payload(challenge, node), ec.ECDSA(hashes.SHA256()))


def verify_node(
    ca_pem: bytes, cert_pem: bytes, challenge: bytes, node: str, signature: bytes
) -> str:
    """Check that ``cert_pem`` is a node certificate of the CA and signed ``challenge``.

    Returns:
        The node name the certificate carries (the caller compares it with the claimed one).

    Raises:
        CertError: No certificate, not issued by the CA, expired, not for client
            authentication, or the signature does not match its key.
    """
    if not cert_pem:
        raise CertError("no node certificate: start the agent with --tls-cert and --tls-key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        raise CertError(f"unreadable node certificate: {e}") from None
    verifier = PolicyBuilder().store(Store(roots)).time(_now()).build_client_verifier()
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as e:
        raise CertError(f"node certificate not accepted: {e}") from None
    name = node_name_of(chain[0].public_bytes(serialization.Encoding.PEM))
    public = chain[0].public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertError("node certificate has no EC key")
    try:
        public.verify(signature, challenge_payload(challenge, node), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CertError("proof of the node key does not match the certificate") from None
    return name
