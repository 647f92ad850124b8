"""``ztunnel-ctl`` against an admin server: ``--admin URL``, ``--node`` (in a netns), errors.

The server here is a small stand-in speaking the contract written in
:mod:`ztunnel.ctl` (and, with ``istio=True``, Istio ztunnel's variations:
``405`` on ``GET /logging``, no ``/connections``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mesh.cluster.parse import parse_spec
from mesh.cluster.statefile import write_state
from tests.unit.ztunnel.test_ctl_fixture import DUMP, dump_copy, saved
from ztunnel.ctl.cli import main
from ztunnel.ctl.document import Dump
from ztunnel.netns import in_netns


class Admin:
    def __init__(self, dump: dict[str, Any], *, istio: bool = False, prefix: str = "") -> None:
        self.dump = dump
        self.istio = istio
        self.prefix = prefix
        self.level = "info"
        self.seen: list[str] = []
        self.dump_status = 200

    def answer(self, method: str, target: str) -> tuple[int, str, bytes]:
        self.seen.append(f"{method} {target}")
        parts = urlsplit(target)
        path = parts.path.removeprefix(self.prefix)
        if method == "GET" and path == "/config_dump":
            return self.dump_status, "application/json", json.dumps(self.dump).encode()
        if method == "GET" and path == "/connections" and not self.istio:
            conns = Dump(self.dump, "admin").connections()
            return 200, "application/json", json.dumps({"connections": conns}).encode()
        if path == "/logging":
            if method == "GET" and self.istio:
                return 405, "text/plain", b"Invalid HTTP method\n"
            level = parse_qs(parts.query).get("level", [""])[0]
            if method == "POST" and level:
                if level not in ("debug", "info", "warn", "error"):
                    return 400, "text/plain", f"unknown level {level!r}\n".encode()
                self.level = level
            return 200, "text/plain", f"current log level is {self.level}\n".encode()
        return 404, "text/plain", b"not found\n"


@contextmanager
def serving(admin: Admin, sock: socket.socket | None = None) -> Iterator[str]:
    """``admin`` on a loopback port (or on ``sock``, already listening); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            status, kind, body = admin.answer(self.command, self.path)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    if sock is None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    else:
        server = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_url_shows_what_the_saved_dump_shows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    admin = Admin(DUMP)
    with serving(admin) as url:
        for command in ("workloads", "services", "policies", "certificates", "all"):
            code, live, _ = ctl(capsys, "--admin", url, command)
            assert code == 0
            assert ctl(capsys, "-f", saved(tmp_path), command)[1] == live
        code, out, _ = ctl(capsys, "--admin", url.removeprefix("http://"), "config-dump")
    assert code == 0 and json.loads(out) == DUMP
    assert "GET /config_dump" in admin.seen


def test_log_reads_and_sets_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    admin = Admin(DUMP)
    with serving(admin) as url:
        assert ctl(capsys, "--admin", url, "log")[:2] == (0, "current log level is info\n")
        assert ctl(capsys, "--admin", url, "log", "--level", "debug")[:2] == (
            0,
            "current log level is debug\n",
        )
        code, out, _ = ctl(capsys, "--admin", url, "log", "--level", "warning", "-o", "json")
        assert json.loads(out) == {"level": "warn", "message": "current log level is warn"}
        code, _, err = ctl(capsys, "--admin", url, "log", "--level", "trace")
    assert code == 3 and "/logging answered 400: unknown level 'trace'" in err
    assert admin.seen[:3] == [
        "GET /logging",
        "POST /logging?level=debug",
        "POST /logging?level=warn",
    ]


def test_istios_ztunnel_variations_are_handled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = Admin(DUMP, istio=True)
    with serving(admin) as url:
        assert ctl(capsys, "--admin", url, "log")[:2] == (0, "current log level is info\n")
        code, out, _ = ctl(capsys, "--admin", url, "connections", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 2  # flattened from workloadState
    assert admin.seen == [
        "GET /logging",
        "POST /logging",
        "GET /connections",
        "GET /config_dump",
    ]


def test_live_connections_come_from_the_connections_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = dump_copy()
    admin = Admin(doc)
    with serving(admin) as url:
        code, out, err = ctl(capsys, "--admin", url, "connections", "-n", "client")
    assert code == 0 and err == ""
    assert out.splitlines()[1].split()[:4] == [
        "sleep.client",
        "Outbound",
        "sleep.client:40000",
        "echo-1.server:15008",
    ]
    assert admin.seen == ["GET /connections", "GET /config_dump"]


def test_a_url_prefix_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    admin = Admin(DUMP, prefix="/ztunnel")
    with serving(admin) as url:
        code, _, _ = ctl(capsys, "--admin", f"{url}/ztunnel/", "policies")
    assert code == 0 and admin.seen == ["GET /ztunnel/config_dump"]


def test_an_admin_error_is_reported_with_its_status(capsys: pytest.CaptureFixture[str]) -> None:
    admin = Admin(DUMP)
    admin.dump_status = 503
    with serving(admin) as url:
        code, out, err = ctl(capsys, "--admin", url, "workloads")
    assert code == 3 and out == ""
    assert err.startswith("ztunnel-ctl: ztunnel's admin server at http://127.0.0.1:")
    assert ": GET /config_dump answered 503:" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_an_unreachable_admin_port_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    code, out, err = ctl(capsys, "--admin", f"http://127.0.0.1:{port}", "workloads")
    assert code == 3 and out == ""
    assert err == (
        f"ztunnel-ctl: cannot reach ztunnel's admin server at http://127.0.0.1:{port}: "
        "Connection refused (is ztunnel running and its admin server listening there? "
        "On a meshlab cluster, use --node NODE)\n"
    )


def test_without_a_source_the_local_admin_port_is_tried(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = ctl(capsys, "workloads")
    if code == 0:  # a ztunnel listens here: nothing to show
        pytest.skip("something answers on 127.0.0.1:15000")
    assert code == 3 and "http://127.0.0.1:15000" in err


# --- --node ------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESHLAB_STATE_DIR", str(tmp_path / "meshlab"))
    return tmp_path / "meshlab"


def _cluster(name: str, netns: str) -> None:
    write_state(parse_spec({"name": name, "nodes": [{"name": "node1", "netns": netns}]}))


def test_node_needs_a_running_cluster_and_that_node(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    code, _, err = ctl(capsys, "--node", "node1", "workloads")
    assert code == 3 and "no meshlab cluster is running" in err
    _cluster("za", "za-node-node1")
    _cluster("zb", "zb-node-node1")
    code, _, err = ctl(capsys, "--node", "node1", "workloads")
    assert code == 3 and "several meshlab clusters are running (za, zb)" in err
    assert "--cluster NAME" in err
    code, _, err = ctl(capsys, "--node", "node9", "--cluster", "za", "workloads")
    assert code == 3 and "cluster 'za' has no node 'node9' (its nodes: node1)" in err
    code, _, err = ctl(capsys, "--node", "node1", "--cluster", "zc", "workloads")
    assert code == 3 and "no cluster named 'zc' is running" in err


def test_node_whose_netns_is_gone(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    _cluster("za", f"za-node-gone-{uuid.uuid4().hex[:8]}")
    code, _, err = ctl(capsys, "--node", "node1", "workloads")
    assert code == 3
    assert "in node node1's netns (/run/netns/za-node-gone-" in err
    assert "the namespace does not exist (is cluster 'za' up?" in err


@pytest.fixture
def node_netns() -> Iterator[str]:
    """A scratch network namespace standing in for a meshlab node (root only)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"zctl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_node_reaches_the_admin_port_inside_the_nodes_netns(
    capsys: pytest.CaptureFixture[str], state_dir: Path, node_netns: str
) -> None:
    _cluster("za", node_netns)
    code, _, err = ctl(capsys, "--node", "node1", "workloads")
    assert code == 3
    assert (
        f"ztunnel's admin port 127.0.0.1:15000 in node node1's netns (/run/netns/{node_netns})"
        in err
    )
    assert "Connection refused (is ztunnel running on node1? meshlab status --name za" in err

    # The port is the netns's own: listening there, and only there, answers.
    fd = os.open(f"/run/netns/{node_netns}", os.O_RDONLY)
    try:
        sock = in_netns(fd, lambda: socket.create_server(("127.0.0.1", 15000)))
    finally:
        os.close(fd)
    admin = Admin(DUMP)
    with serving(admin, sock):
        code, out, _ = ctl(capsys, "--node", "node1", "policies", "-o", "json")
        assert ctl(capsys, "--node", "node1", "log")[1] == "current log level is info\n"
    assert code == 0 and json.loads(out) == sorted(
        DUMP["policies"], key=lambda p: (p["namespace"], p["name"])
    )
    assert admin.seen == ["GET /config_dump", "GET /logging"]
