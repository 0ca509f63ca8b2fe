"""Controller addresses as users write them: ``host:port``, several comma-separated.

gRPC reads a bare ``127.0.0.1`` as a DNS name and quietly dials port 443; a missing port is
refused here instead, with a message that says what to write.
"""

from __future__ import annotations

__all__ = ["check_address", "split_addresses"]

# gRPC targets with a scheme name their own form (unix sockets, resolvers): passed through.
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "xds:")


def check_address(address: str, what: str = "controller", any_port: bool = False) -> str:
    """Return ``address`` if it names a port (``host:port``, ``[v6]:port``, or a scheme).

    ``any_port`` also accepts port 0 (a listen address: the system picks a free port).

    Raises:
        ValueError: the port is missing or not a number, naming ``what``.
    """
    address = address.strip()
    if address.startswith(_SCHEMES):
        return address
    host, sep, port = address.rpartition(":")
    if address.startswith("[") and not host.endswith("]"):  # "[::1]" alone
        sep = ""
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        example = f"{address}:7070" if address and ":" not in address else "HOST:7070"
        if not sep:
            why = f"{address!r} has no port"
        elif not host:
            why = f"{address!r} has no host"
        elif not port.isdigit():
            why = f"the port {port!r} of {address!r} is not a number"
            example = f"{host}:7070"
        else:
            raise ValueError(f"{what}: port {port} of {address!r} is out of range")
        raise ValueError(f"{what}: {why}; write host:port, e.g. {example}")
    return address


def split_addresses(text: str, what: str = "controller") -> list[str]:
    """The comma-separated addresses in ``text``, each checked by :func:`check_address`."""
    out = [check_address(a, what) for a in text.split(",") if a.strip()]
    if not out:
        raise ValueError(f"{what}: no address given")
    return out
