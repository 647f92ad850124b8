"""The request headers of an HBONE CONNECT and the ``:authority`` it targets.

``:authority`` is ``ip:port`` of the final destination (``[v6]:port`` for
IPv6); ``forwarded`` carries the original client as ``for="ip:port"``
(RFC 7239, quoted because of the colon); ``baggage`` (W3C) names the source
workload; ``traceparent`` (W3C trace context) continues or starts a trace.

``baggage`` is W3C Baggage: ``key=value`` list members, comma separated, each
optionally followed by ``;property`` parts, with optional whitespace around
each part. Keys are RFC 7230 tokens. :func:`baggage` percent-encodes every
value octet outside RFC 3986's unreserved set (UTF-8 first), which is always
inside the W3C ``baggage-octet`` range; :func:`parse_baggage` decodes any
percent-encoding, drops properties, skips members it cannot read and ignores
a header that is too big (W3C's 8192 bytes, or more than
:data:`MAX_BAGGAGE_MEMBERS` members) rather than raise: it reads what a peer
sent.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import socket
from collections.abc import Mapping
from urllib.parse import quote, unquote_to_bytes


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


MAX_BAGGAGE_BYTES = 8192  # W3C Baggage: the whole header
MAX_BAGGAGE_MEMBERS = 64  # fewer than W3C's 180: ours carries eight at most

# RFC 7230 tchar; W3C baggage-octet (no CTLs, space, '"', ',', ';', '\\').
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_OWS = " \t"


def baggage(fields: Mapping[str, str]) -> str:
    """W3C baggage from ``key -> value``: values percent-encoded (RFC 3986 unreserved
    characters pass, every other UTF-8 octet is ``%XX``). Raises ValueError for a key
    that is not a token: keys are ours, a bad one is a bug."""
    members = []
    for key, value in fields.items():
        if not _TOKEN.fullmatch(key):
            raise ValueError(f"baggage key {key!r} is not a token")
        members.append(f"{key}={quote(value, safe='')}")
    return ",".join(members)


def parse_baggage(header: str | None) -> dict[str, str]:
    """The ``key -> value`` members of a W3C ``baggage`` header, values decoded.

    Never raises. A header over :data:`MAX_BAGGAGE_BYTES` or with more than
    :data:`MAX_BAGGAGE_MEMBERS` members yields nothing; a member that is not
    ``token=baggage-octets`` (or whose value does not decode to UTF-8) is skipped;
    properties (``;...``) are dropped; of a key given twice the first counts.
    Several ``baggage`` headers are one list joined by commas (as the HBONE server
    joins repeated headers).
    """
    if not header:
        return {}
    size = len(header) if header.isascii() else len(header.encode("utf-8", "surrogatepass"))
    if size > MAX_BAGGAGE_BYTES or header.count(",") >= MAX_BAGGAGE_MEMBERS:
        return {}
    return dict(_parse_baggage(header))


@functools.lru_cache(maxsize=512)
def _parse_baggage(header: str) -> tuple[tuple[str, str], ...]:
    """:func:`parse_baggage`'s work, once per distinct header (a source's header is
    the same for all its connections). Only headers within the size limit get here:
    at most 512 of at most 8 KiB are kept."""
    fields: dict[str, str] = {}
    for member in header.split(","):
        key, eq, rest = member.partition("=")
        key = key.strip(_OWS)
        value = rest.partition(";")[0].strip(_OWS)
        if not eq or key in fields or not _TOKEN.fullmatch(key):
            continue
        if not _VALUE.fullmatch(value) or _BAD_ESCAPE.search(value):
            continue
        try:
            fields[key] = unquote_to_bytes(value).decode("utf-8") if "%" in value else value
        except UnicodeDecodeError:
            continue
    return tuple(fields.items())


def connect_headers(
    *,
    client: tuple[str, int] | None,
    source_baggage: Mapping[str, str] | str | None = None,
    traceparent: str | None = None,
) -> list[tuple[str, str]]:
    """The extra request headers ztunnel sends with a CONNECT. ``source_baggage`` is
    the members to encode, or a header value :func:`baggage` already encoded."""
    headers: list[tuple[str, str]] = []
    if source_baggage:
        encoded = source_baggage if isinstance(source_baggage, str) else baggage(source_baggage)
        headers.append(("baggage", encoded))
    if client is not None:
        headers.append(("forwarded", forwarded_for(*client)))
    headers.append(("traceparent", traceparent or new_traceparent()))
    return headers
