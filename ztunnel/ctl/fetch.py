"""Where the answers come from: ztunnel's admin port in a node's netns, a URL, or a file.

``--node`` makes the TCP socket *inside* the node's network namespace (with
:func:`ztunnel.netns.in_netns`, as ztunnel makes its in-pod sockets), since
the admin server listens on that namespace's loopback only; HTTP/1.1 then
runs over the connected socket with :mod:`http.client`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from mesh.cluster.errors import StateFileError
from mesh.cluster.statefile import cluster_dir, list_clusters, read_state
from ztunnel.ctl.document import Dump, Entry
from ztunnel.ctl.errors import CtlError
from ztunnel.netns import in_netns

ADMIN_PORT = 15000
DEFAULT_ADMIN_URL = f"http://127.0.0.1:{ADMIN_PORT}"
NETNS_DIR = Path("/run/netns")
TIMEOUT_S = 5.0


class Source(Protocol):
    what: str  # for messages: "ztunnel on node node1 (cluster demo)"
    live: bool  # a running ztunnel (False: a saved dump)

    def config_dump(self) -> Dump: ...

    def request(self, method: str, path: str) -> tuple[int, bytes]: ...


@dataclass
class FileSource:
    """A saved ``/config_dump`` (``-`` for standard input)."""

    path: str
    what: str = ""
    live: bool = False

    def __post_init__(self) -> None:
        self.what = "standard input" if self.path == "-" else self.path

    def config_dump(self) -> Dump:
        try:
            text = sys.stdin.read() if self.path == "-" else Path(self.path).read_text()
            raw = json.loads(text)
        except OSError as e:
            raise CtlError(f"cannot read the dump {self.what}: {e.strerror or e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CtlError(f"{self.what} is not JSON: {e}") from e
        return Dump.parse(raw, self.what)

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        raise CtlError(
            f"{method} {path} needs a running ztunnel, and {self.what} is a saved dump",
            "use --node NODE or --admin URL instead of -f",
        )


@dataclass
class HttpSource:
    """ztunnel's admin server, reached through ``connect``."""

    connect: Callable[[], socket.socket]
    what: str
    host: str  # for the Host header
    hint: str
    base_path: str = ""
    live: bool = True
    netns: Path | None = None  # the node's, when reached in it (--node)

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        try:
            sock = self.connect()
        except TimeoutError as e:
            raise self._unreachable(f"timed out after {TIMEOUT_S:g} s") from e
        except OSError as e:
            raise self._unreachable(e.strerror or str(e)) from e
        conn = http.client.HTTPConnection(self.host, timeout=TIMEOUT_S)
        conn.sock = sock  # already connected (perhaps in another netns): no connect()
        try:
            conn.request(method, self.base_path + path, headers={"Accept": "*/*"})
            response = conn.getresponse()
            return response.status, response.read()
        except TimeoutError as e:
            raise self._unreachable(f"no answer within {TIMEOUT_S:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(f"the HTTP exchange failed: {e!r}") from e
        finally:
            conn.close()

    def config_dump(self) -> Dump:
        status, body = self.request("GET", "/config_dump")
        if status != 200:
            raise CtlError(f"{self.what}: GET /config_dump answered {status}: {_text(body)}")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CtlError(f"{self.what}: /config_dump is not JSON: {e}") from e
        return Dump.parse(raw, self.what)

    def _unreachable(self, why: str) -> CtlError:
        return CtlError(f"cannot reach {self.what}: {why}", self.hint)


def admin_source(url: str) -> HttpSource:
    """``http://host[:port][/prefix]`` (``host:port`` alone is taken as http)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise CtlError(
            f"--admin {url!r}: expected http://HOST[:PORT]", "the admin API is plain HTTP"
        )
    host, port = parts.hostname, parts.port or ADMIN_PORT
    shown = f"ztunnel's admin server at http://{_hostport(host, port)}"
    return HttpSource(
        connect=lambda: socket.create_connection((host, port), timeout=TIMEOUT_S),
        what=shown,
        host=_hostport(host, port),
        hint="is ztunnel running and its admin server listening there? "
        "On a meshlab cluster, use --node NODE",
        base_path=parts.path.rstrip("/"),
    )


def node_source(node: str, cluster: str | None = None) -> HttpSource:
    """ztunnel's admin port on ``127.0.0.1:15000`` in meshlab node ``node``'s netns."""
    name = cluster or only_cluster()
    try:
        state = read_state(name)
    except StateFileError as e:
        raise CtlError(str(e), "meshlab status lists the running clusters") from e
    found = next((n for n in state.nodes if n.name == node), None)
    if found is None:
        nodes = ", ".join(n.name for n in state.nodes) or "none"
        raise CtlError(f"cluster {name!r} has no node {node!r} (its nodes: {nodes})")
    netns = NETNS_DIR / (found.netns or f"{name}-node-{node}")
    what = f"ztunnel's admin port 127.0.0.1:{ADMIN_PORT} in node {node}'s netns ({netns})"

    def connect() -> socket.socket:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise CtlError(
                f"cannot reach {what}: the namespace does not exist",
                f"is cluster {name!r} up? meshlab status --name {name}",
            ) from e
        except PermissionError as e:
            raise CtlError(f"cannot open {netns}", "--node needs root: run as root") from e
        try:
            return in_netns(
                fd, lambda: socket.create_connection(("127.0.0.1", ADMIN_PORT), TIMEOUT_S)
            )
        except PermissionError as e:
            raise CtlError(f"cannot enter {netns}", "--node needs root: run as root") from e
        finally:
            os.close(fd)

    return HttpSource(
        connect=connect,
        what=what,
        host=f"127.0.0.1:{ADMIN_PORT}",
        hint=f"is ztunnel running on {node}? meshlab status --name {name}; "
        f"its log is under {cluster_dir(name) / 'logs'}",
        netns=netns,
    )


def only_cluster() -> str:
    clusters = list_clusters()
    if not clusters:
        raise CtlError("no meshlab cluster is running", "meshlab up, or pass --admin URL or -f")
    if len(clusters) > 1:
        raise CtlError(
            f"several meshlab clusters are running ({', '.join(clusters)})", "pass --cluster NAME"
        )
    return clusters[0]


# ztunnel's level names; istioctl maps its own the same way before asking.
LEVELS = ("trace", "debug", "info", "warn", "error", "off")
_LEVEL_ALIASES = {"warning": "warn", "critical": "error"}


def log_level(source: Source, level: str | None = None) -> str:
    """The current log level line (after setting ``level``, if given)."""
    if level is None:
        status, body = source.request("GET", "/logging")
        if status == 405:  # Istio's ztunnel answers the listing on POST only
            status, body = source.request("POST", "/logging")
    else:
        level = _LEVEL_ALIASES.get(level, level)
        status, body = source.request("POST", f"/logging?level={quote(level)}")
    if status != 200:
        raise CtlError(f"{source.what}: /logging answered {status}: {_text(body)}")
    return _text(body)


def connections(source: Source) -> tuple[list[Entry], Dump | None]:
    """Live connections (``GET /connections``), else those the dump's ``workloadState``
    holds; with the dump, when it had to be fetched."""
    if source.live:
        status, body = source.request("GET", "/connections")
        if status == 200:
            try:
                doc: Any = json.loads(body)
                conns = doc["connections"]
                if isinstance(conns, list):
                    return [c for c in conns if isinstance(c, dict)], None
            except (ValueError, KeyError, TypeError):
                pass
            raise CtlError(f"{source.what}: /connections is not {{'connections': [...]}}")
        if status != 404:  # 404: Istio's ztunnel has no such path
            raise CtlError(f"{source.what}: GET /connections answered {status}: {_text(body)}")
    dump = source.config_dump()
    return dump.connections(), dump


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
