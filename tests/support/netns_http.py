"""HTTP from the test process to a server on another network namespace's loopback.

A socket belongs to the namespace it was made in, so the connection is made
on a worker thread inside the namespace (:func:`ztunnel.netns.in_netns`) and
used from here: no ``ip netns exec curl`` per request, and the server never
has to listen beyond that namespace's 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from ztunnel.netns import in_netns

NETNS_DIR = Path("/run/netns")
T = TypeVar("T")


def run_in(netns: str, make: Callable[[], T]) -> T:
    """``make()`` on a worker thread inside the named namespace (``ip netns`` name)."""
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(in_netns, fd, make).result()
    finally:
        os.close(fd)


def free_port(netns: str) -> int:
    """A TCP port nobody listens on in ``netns``'s 127.0.0.1 (just now)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    return run_in(netns, pick)


def get(
    netns: str, port: int, path: str, params: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    """GET ``http://127.0.0.1:port/path?params`` inside ``netns``: (status, body)."""
    sock = run_in(netns, lambda: socket.create_connection(("127.0.0.1", port), timeout=timeout))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", f"{path}?{urlencode(params)}" if params else path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def get_json(netns: str, port: int, path: str, params: dict[str, str] | None = None) -> Any:
    status, body = get(netns, port, path, params)
    try:
        return json.loads(body)
    except ValueError:
        raise AssertionError(f"GET {path} answered {status}, not JSON: {body[:300]!r}") from None
