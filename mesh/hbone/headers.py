"""The request headers of an HBONE CONNECT and the ``:authority`` it targets.

``:authority`` is ``ip:port`` of the final destination (``[v6]:port`` for
IPv6); ``forwarded`` carries the original client as ``for="ip:port"``
(RFC 7239, quoted because of the colon); ``baggage`` (W3C) names the source
workload; ``traceparent`` (W3C trace context) continues or starts a trace.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Mapping


def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` -> (ip, port); raises ValueError saying what is wrong."""
    if not authority:
        raise ValueError("empty :authority")
    if authority.startswith("["):
        host, sep, port_text = authority[1:].partition("]:")
        family = socket.AF_INET6
        if not sep:
            raise ValueError(f":authority {authority!r} is not [ipv6]:port")
    else:
        host, sep, port_text = authority.rpartition(":")
        family = socket.AF_INET
        if not sep:
            raise ValueError(f":authority {authority!r} has no port")
    try:
        # inet_pton is strict (no "1.2.3", no leading zeros) and a C call:
        # this runs for every tunnelled connection.
        socket.inet_pton(family, host)
    except OSError:
        raise ValueError(f":authority {authority!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f":authority {authority!r}: {port_text!r} is not a port")
    if family == socket.AF_INET6:
        host = str(ipaddress.IPv6Address(host))  # one spelling of each address
    return host, int(port_text)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarded_for(host: str, port: int) -> str:
    return f'for="{format_authority(host, port)}"'


def new_traceparent() -> str:
    """A W3C ``traceparent`` starting a new, sampled-out trace."""
    # Trace ids need to be unique, not secret: no syscall per connection.
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00"


def baggage(fields: Mapping[str, str]) -> str:
    """W3C baggage: ``k=v`` pairs, comma separated (values already URL-safe)."""
    return ",".join(f"{k}={v}" for k, v in fields.items())


def connect_headers(
    *,
    client: tuple[str, int] | None,
    source_baggage: Mapping[str, str] | None = None,
    traceparent: str | None = None,
) -> list[tuple[str, str]]:
    """The extra request headers ztunnel sends with a CONNECT."""
    headers: list[tuple[str, str]] = []
    if source_baggage:
        headers.append(("baggage", baggage(source_baggage)))
    if client is not None:
        headers.append(("forwarded", forwarded_for(*client)))
    headers.append(("traceparent", traceparent or new_traceparent()))
    return headers
