"""What the CLI shows and accepts: human units, controller addresses."""

from __future__ import annotations

import pytest

from tether.sdk.address import check_address, split_addresses
from tether.sdk.quantities import format_memory, parse_memory


def test_memory_reads_as_people_write_it():
    assert format_memory(24683568 * 1024) == "23.5Gi"  # was 24683568Ki
    assert [format_memory(n) for n in (0, 1000, 1536, 64 * 2**20, 2**30 - 1)] == [
        "0",
        "1000",
        "1.5Ki",
        "64Mi",
        "1Gi",
    ]
    for exact in ("64Mi", "2Gi", "3Ki", "1Ti"):  # whole units print exactly and parse back
        assert format_memory(parse_memory(exact)) == exact


def test_controller_addresses_need_a_port():
    assert split_addresses("a:1, b:2") == ["a:1", "b:2"]
    assert check_address("[::1]:7070") == "[::1]:7070"
    assert check_address("unix:/run/tether.sock") == "unix:/run/tether.sock"
    with pytest.raises(
        ValueError,
        match=r"controller: '127\.0\.0\.1' has no port; write host:port, e\.g\. 127\.0\.0\.1:7070",
    ):
        split_addresses("127.0.0.1")
    with pytest.raises(ValueError, match="has no port"):
        split_addresses("a:1,b")
    with pytest.raises(ValueError, match="out of range"):
        check_address("h:70000")
    with pytest.raises(
        ValueError,
        match=r"the port 'web' of 'h:web' is not a number; write host:port, e\.g\. h:7070",
    ):
        check_address("h:web")
    with pytest.raises(ValueError, match="':7070' has no host"):
        check_address(":7070")
    assert check_address("0.0.0.0:0", "listen", any_port=True) == "0.0.0.0:0"
    with pytest.raises(ValueError, match="out of range"):
        check_address("h:0")


def test_client_refuses_an_address_without_a_port():
    from tether.sdk import Client

    with pytest.raises(ValueError, match="has no port"):
        Client("127.0.0.1")
