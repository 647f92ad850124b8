"""The Envoy pair in the pods: their HBONE configs, :class:`PodEnvoy`, its unix-socket admin."""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.envoy import (
    client_config,
    envoy_argv,
    envoy_binary,
    parse_stats,
    server_config,
)
from bench.mesh.shell import BenchError, pod_argv
from bench.mesh.topology import (
    CLIENT_SAN,
    ENVOY_MARK,
    HBONE_PORT,
    OUTBOUND_PORT,
    SERVER_SAN,
    SO_MARK,
    SOL_SOCKET,
)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: Envoy's admin, reachable from any network namespace."""

    def __init__(self, path: Path, timeout: float = 2.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


def admin_get(path: Path, url: str) -> tuple[int, str]:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", url)
        answer = conn.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        conn.close()


def envoy_client_config(files: dict[str, Path], admin: Path, server_ip: str) -> dict[str, Any]:
    """bench.envoy's HBONE client, as a pod's outbound capture would use it.

    The listener takes REDIRECTed connections (``original_dst`` restores their
    destination), CONNECTs to that destination (``%DOWNSTREAM_LOCAL_ADDRESS%``)
    through an ORIGINAL_DST cluster whose port is overridden to 15008; the
    upstream sockets carry the mark the REDIRECT rule leaves alone.
    """
    config = client_config(
        listen_port=OUTBOUND_PORT,
        admin_port=0,
        peer=(server_ip, HBONE_PORT),
        authority="%DOWNSTREAM_LOCAL_ADDRESS%",
        peer_sans=[SERVER_SAN],
        **files,
    )
    config["admin"] = {"address": {"pipe": {"path": str(admin)}}}
    listener = config["static_resources"]["listeners"][0]
    listener["name"] = "outbound"
    listener["address"]["socket_address"]["address"] = "0.0.0.0"
    # A clash with a listener left behind (ztunnel's) must fail, not share the port.
    listener["enable_reuse_port"] = False
    listener["listener_filters"] = [
        {
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
            },
        }
    ]
    cluster = config["static_resources"]["clusters"][0]
    del cluster["load_assignment"]
    cluster["type"] = "ORIGINAL_DST"
    cluster["lb_policy"] = "CLUSTER_PROVIDED"
    cluster["original_dst_lb_config"] = {"upstream_port_override": HBONE_PORT}
    cluster["upstream_bind_config"] = {
        "socket_options": [
            {
                "description": "SO_MARK",
                "level": SOL_SOCKET,
                "name": SO_MARK,
                "int_value": ENVOY_MARK,
                "state": "STATE_PREBIND",
            }
        ]
    }
    return config


def envoy_server_config(
    files: dict[str, Path], admin: Path, server_ip: str, ports: tuple[int, ...]
) -> dict[str, Any]:
    """bench.envoy's HBONE server on the pod's 15008, one route per app port."""
    config = server_config(
        listen_port=HBONE_PORT,
        admin_port=0,
        upstream=(server_ip, ports[0]),
        peer_sans=[CLIENT_SAN],
        **files,
    )
    config["admin"] = {"address": {"pipe": {"path": str(admin)}}}
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["address"] = "0.0.0.0"
    listener["enable_reuse_port"] = False
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    template = hcm["route_config"]["virtual_hosts"][0]
    upstream = config["static_resources"]["clusters"][0]
    hosts, clusters = [], []
    for port in ports:
        host = copy.deepcopy(template)
        host["name"] = f"app-{port}"
        host["domains"] = [f"{server_ip}:{port}"]
        host["routes"][0]["route"]["cluster"] = f"app-{port}"
        hosts.append(host)
        cluster = copy.deepcopy(upstream)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"app-{port}"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
        clusters.append(cluster)
    hcm["route_config"]["virtual_hosts"] = hosts
    config["static_resources"]["clusters"] = clusters
    return config


class PodEnvoy:
    """One Envoy inside a pod's network namespace (and its cgroup, when given), its admin on a
    unix socket."""

    def __init__(
        self,
        netns: str,
        config: dict[str, Any],
        workdir: Path,
        name: str,
        env: dict[str, str],
        *,
        cgroup: Path | None = None,
    ) -> None:
        binary = envoy_binary()
        if binary is None:
            raise FileNotFoundError("envoy is not installed (`make envoy` installs it)")
        self.binary, self.netns, self.config = binary, netns, config
        self.workdir, self.name, self.env = workdir, name, env
        self.cgroup = cgroup
        self.admin = Path(config["admin"]["address"]["pipe"]["path"])
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 20) -> PodEnvoy:
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(self.config, indent=1))
        self.admin.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            # The cgroup's shell and `ip netns exec` exec Envoy: the pid is Envoy's.
            self.process = subprocess.Popen(
                pod_argv(
                    self.netns,
                    self.cgroup,
                    envoy_argv(self.binary, path, self.workdir / f"{self.name}.baseid", 1),
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"envoy {self.name} exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if admin_get(self.admin, "/ready")[0] == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"envoy {self.name} not ready after {timeout_s:g} s")

    def stats(self) -> dict[str, int]:
        return parse_stats(admin_get(self.admin, "/stats")[1])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
