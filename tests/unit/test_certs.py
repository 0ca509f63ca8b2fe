"""Certificates from ``tether certs``: names, key modes, and who may pose as a node."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tether.controller.config import ControllerConfig, is_loopback
from tether.sdk.certs import (
    CertError,
    init_ca,
    issue_controller,
    issue_node,
    node_name_of,
    sign_challenge,
    verify_node,
)


@pytest.fixture
def ca(tmp_path):
    init_ca(tmp_path)
    return tmp_path


def test_keys_are_private_and_certs_readable(ca):
    issued = issue_node(ca, "gpu-1")
    for key in (ca / "ca-key.pem", issued.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(issued.cert.stat().st_mode) == 0o644


def test_a_leftover_temporary_file_does_not_leave_a_key_readable(ca):
    leftover = ca / "node-gpu-2-key.pem.tmp"
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    issued = issue_node(ca, "gpu-2")
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    assert not leftover.exists()


@pytest.mark.parametrize("host", ["a b", "ctl_1.example.com", "-ctl", "x" * 254, ""])
def test_a_host_that_is_no_name_nor_address_is_refused(ca, host):
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        issue_controller(ca, ["ctl.example.com", host])
    assert not (ca / "controller.pem").exists()


def test_controller_certificate_names_hosts_and_ips(ca):
    issued = issue_controller(ca, ["ctl.example.com", "10.0.0.5", "::1"])
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ctl.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert issued.cert.name == "controller.pem" and issued.key.name == "controller-key.pem"


def test_node_certificate_carries_its_name(ca):
    issued = issue_node(ca, "node-a")
    assert issued.cert.name == "node-node-a.pem" and issued.key.name == "node-node-a-key.pem"
    assert node_name_of(issued.cert.read_bytes()) == "node-a"


def test_a_signed_challenge_proves_the_node(ca):
    issued = issue_node(ca, "node-a")
    sig = sign_challenge(issued.key.read_bytes(), b"c" * 32, "node-a")
    ca_pem = (ca / "ca.pem").read_bytes()
    assert verify_node(ca_pem, issued.cert.read_bytes(), b"c" * 32, "node-a", sig) == "node-a"
    with pytest.raises(CertError, match="does not match"):  # another challenge
        verify_node(ca_pem, issued.cert.read_bytes(), b"d" * 32, "node-a", sig)
    with pytest.raises(CertError, match="does not match"):  # bound to the claimed node
        verify_node(ca_pem, issued.cert.read_bytes(), b"c" * 32, "node-b", sig)


def test_only_the_cas_node_certificates_are_accepted(ca, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    init_ca(other)
    foreign = issue_node(other, "node-a")
    sig = sign_challenge(foreign.key.read_bytes(), b"x", "node-a")
    ca_pem = (ca / "ca.pem").read_bytes()
    with pytest.raises(CertError, match="not accepted"):
        verify_node(ca_pem, foreign.cert.read_bytes(), b"x", "node-a", sig)
    # The controller's own certificate is for servers, not a node identity.
    ctl = issue_controller(ca, ["127.0.0.1"])
    sig = sign_challenge(ctl.key.read_bytes(), b"x", "node-a")
    with pytest.raises(CertError, match="EKU"):
        verify_node(ca_pem, ctl.cert.read_bytes(), b"x", "node-a", sig)
    with pytest.raises(CertError, match="no node certificate"):
        verify_node(ca_pem, b"", b"x", "node-a", sig)


def test_init_does_not_replace_a_ca_by_accident(ca):
    with pytest.raises(CertError, match="already has a CA"):
        init_ca(ca)
    before = (ca / "ca.pem").read_bytes()
    init_ca(ca, force=True)
    assert (ca / "ca.pem").read_bytes() != before


def test_issue_needs_a_ca(tmp_path):
    with pytest.raises(CertError, match="tether certs init"):
        issue_node(tmp_path / "none", "n1")


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:7070", True),
        ("[::1]:7070", True),
        ("localhost:7070", True),
        ("0.0.0.0:7070", False),
        ("[::]:7070", False),
        (":7070", False),
        ("10.1.2.3:7070", False),
        ("ctl.example.com:7070", False),
    ],
)
def test_loopback_addresses(listen, loopback):
    assert is_loopback(listen) is loopback


def test_plaintext_on_a_network_address_needs_insecure():
    with pytest.raises(ValueError, match="--insecure"):
        ControllerConfig(listen="0.0.0.0:7070")
    assert ControllerConfig(listen="0.0.0.0:7070", insecure=True).listen == "0.0.0.0:7070"
    tls = ControllerConfig(listen="0.0.0.0:7070", tls_cert="c.pem", tls_key="k.pem")
    assert tls.tls
    with pytest.raises(ValueError, match="tls_key"):
        ControllerConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="tls_ca"):
        ControllerConfig(tls_ca="ca.pem")
