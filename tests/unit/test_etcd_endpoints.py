"""Parsing of ``--etcd`` endpoints (as etcdctl takes them) and the TLS/auth checks on them."""

from __future__ import annotations

import pytest

from tether.controller.config import ControllerConfig
from tether.controller.etcd_connection import EtcdConnection, EtcdEndpoint, parse_endpoints


def test_urls_and_bare_endpoints():
    assert parse_endpoints("http://h:2379, https://h2:2380") == (
        EtcdEndpoint("h", 2379, False),
        EtcdEndpoint("h2", 2380, True),
    )
    assert parse_endpoints("10.0.0.1:2379") == (EtcdEndpoint("10.0.0.1", 2379, None),)
    assert parse_endpoints(["HTTPS://etcd.example/"]) == (EtcdEndpoint("etcd.example", 2379, True),)
    ipv6 = parse_endpoints("https://[::1]:2379")[0]
    assert ipv6 == EtcdEndpoint("::1", 2379, True)
    assert ipv6.address == "[::1]:2379"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "at least one endpoint"),
        ("unix://sock:1", "scheme must be http or https"),
        ("h", "use host:port or a URL"),
        ("h:0", "port must be 1-65535"),
        ("h:99999", "port must be 1-65535"),
        ("http://h:2379/v3", "has no path"),
        (":2379", "no host"),
        ("[::1", r"use \[IPv6\]:PORT"),
    ],
)
def test_malformed_endpoints_are_named(text, error):
    with pytest.raises(ValueError, match=error):
        parse_endpoints(text)


def test_tls_follows_scheme_and_flags():
    def conn(text, **kw):
        return EtcdConnection(parse_endpoints(text), **kw)

    assert not conn("h:1").tls
    assert not conn("http://h:1").tls
    assert conn("https://h:1").tls
    assert conn("h:1", ca_file="ca.pem").tls
    assert conn("h:1,https://h2:1").tls


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"etcd_endpoints": ("http://a:1", "https://b:1")}, "cannot mix"),
        ({"etcd_endpoints": ("http://a:1",), "etcd_ca": "ca.pem"}, "use https://"),
        ({"etcd_cert": "c.pem"}, "give both or neither"),
        ({"etcd_user": "root"}, "give both or neither"),
        ({"etcd_endpoints": ("a:b",)}, "port must be"),
    ],
)
def test_config_refuses_inconsistent_etcd_settings(kw, error):
    with pytest.raises(ValueError, match=error):
        ControllerConfig(**kw)


def test_config_accepts_urls():
    cfg = ControllerConfig(etcd_endpoints=("https://a:2379", "b:2379"), etcd_ca="ca.pem")
    assert EtcdConnection.from_config(cfg).describe() == "https://a:2379,https://b:2379"


def test_password_file_first_line(tmp_path):
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    c = EtcdConnection(parse_endpoints("h:1"), user="root", password_file=str(f))
    assert c.password() == "s3cret"
    f.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        c.password()
