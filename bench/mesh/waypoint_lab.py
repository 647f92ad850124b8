"""The waypoint bench's cluster: a Service behind our waypoint, behind Envoy, or neither.

Three nodes: the client pod on node1, the server pod (nginx) on node2, both
namespaces ambient throughout; the Service ``server/web`` (80 -> 8080,
``appProtocol: http``). Two waypoint Gateways in ``server``, both placed on
node3 (filler pods steer meshlab's scheduler there): ``waypoint`` runs our
waypoint as meshlab starts it; in ``envoy-waypoint`` the bench replaces our
process with Envoy 1.40 (:mod:`bench.mesh.envoy_waypoint`), fed the
resources meshd sent our ``waypoint`` (read from its ``/config_dump``, so
both proxies run the same routes and clusters) under ``envoy-waypoint``'s
own identity, signed by the cluster's CA. The placements are the Service's
``istio.io/use-waypoint`` label:

* ``l4``: no label: client ztunnel -> HBONE -> server ztunnel (the floor);
* ``ours``: ``waypoint``: client ztunnel -> our waypoint -> server ztunnel;
* ``envoy``: ``envoy-waypoint``: the same through Envoy.

Before a placement is measured the bench checks the path: a burst of
requests is counted by the waypoint meant to carry it (ours:
``istio_requests_total``; Envoy: its connection managers' ``downstream_rq_total``)
and by no other.

The configurations (:mod:`bench.mesh.waypoint_configs`) are applied with
``meshlab apply`` to ``waypoint`` and removed with ``meshlab delete``; after
each change Envoy is restarted with what meshd then sent ours
(:meth:`WaypointLab.refeed_envoy`). The tracing configurations' OTLP/gRPC
receiver (:mod:`bench.mesh.otlp_sink`) runs in the pod ``telemetry/collector``
(node1, a namespace out of the mesh: both waypoints dial it directly).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.mesh.envoy_pair import PodEnvoy, admin_get
from bench.mesh.envoy_waypoint import envoy_waypoint_config
from bench.mesh.lab import MeshLab
from bench.mesh.otlp_sink import read_counts
from bench.mesh.shell import BenchError, in_netns, venv_bin, wait_until
from bench.mesh.topology import CLIENT_POD, HTTP_PORT, SERVER_POD
from bench.mesh.waypoint_configs import COLLECTOR_NS, COLLECTOR_POD, COLLECTOR_PORT, applied

WAYPOINT_PLACEMENTS = ("l4", "ours", "envoy")
OURS, ENVOY = "waypoint", "envoy-waypoint"
SERVICE, VIP, SERVICE_PORT = "web", "10.96.0.50", 80
USE_WAYPOINT = "istio.io/use-waypoint"
WAYPOINT_NODE = "node3"
BURST = 20


def _filler(name: str, node: str) -> dict[str, Any]:
    return {"name": name, "namespace": "filler", "node": node, "command": ["sleep", "infinity"]}


CLUSTER: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}, {"name": WAYPOINT_NODE}],
    # Made ambient once ztunnels run with the pinned cipher (MeshLab.start).
    "namespaces": [
        {"name": "client"},
        {"name": "server"},
        {"name": "filler"},
        {"name": COLLECTOR_NS},  # never ambient: the tracing receiver, out of the mesh
    ],
    "pods": [
        {
            "name": "client",
            "namespace": "client",
            "node": "node1",
            "command": ["sleep", "infinity"],
        },
        {
            "name": "server",
            "namespace": "server",
            "node": "node2",
            "labels": {"app": "server"},
            "command": ["sleep", "infinity"],
        },
        {
            "name": COLLECTOR_POD,
            "namespace": COLLECTOR_NS,
            "node": "node1",
            "labels": {"app": COLLECTOR_POD},
            "command": ["sleep", "infinity"],
        },
        # meshlab puts a waypoint's pod on the node with the fewest pods: node3, twice.
        *(_filler(f"filler-{n}-{i}", n) for n in ("node1", "node2") for i in range(2)),
    ],
    "services": [
        {
            "name": SERVICE,
            "namespace": "server",
            "vip": VIP,
            "selector": {"app": "server"},
            "ports": [
                {
                    "name": "http",
                    "port": SERVICE_PORT,
                    "targetPort": HTTP_PORT,
                    "appProtocol": "http",
                }
            ],
        }
    ],
}


def _gateway(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": "server",
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


class WaypointLab(MeshLab):
    """The cluster, its pods and apps, both waypoints and the placements l4/ours/envoy."""

    @property
    def url(self) -> str:
        """What the client pod asks: the Service, by its VIP."""
        return f"http://{VIP}:{SERVICE_PORT}/"

    cluster_spec = CLUSTER
    collector: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from mesh.cluster.statefile import read_state

        super().start()
        gateways = self.dir / "gateways.yaml"
        gateways.write_text("\n---\n".join(json.dumps(_gateway(n)) for n in (OURS, ENVOY)))
        self.meshlab("apply", "--name", self.name, "-f", str(gateways))
        self.state = read_state(self.name)
        pods = {p.key: p for p in self.state.pods}
        self.wp_ns: dict[str, str] = {}
        for name in (OURS, ENVOY):
            pod = pods[f"server/{name}"]
            assert pod.netns and pod.ip
            if pod.node != WAYPOINT_NODE:
                raise BenchError(f"waypoint {name} landed on {pod.node}, not {WAYPOINT_NODE}")
            self.wp_ns[name] = pod.netns
        self.wp_ip = {name: str(pods[f"server/{name}"].ip) for name in (OURS, ENVOY)}
        collector = pods[f"{COLLECTOR_NS}/{COLLECTOR_POD}"]
        assert collector.netns and collector.ip
        self.collector_ns, self.collector_ip = collector.netns, str(collector.ip)
        client = pods[CLIENT_POD]  # its identity, as AuthorizationPolicy principals name it
        self.client_principal = f"cluster.local/ns/{client.namespace}/sa/{client.service_account}"
        self.log(f"waypoints {OURS} and {ENVOY} on {WAYPOINT_NODE}")
        wait_until("our waypoints ready", self._synced, 60)
        self._label(True)
        wait_until("pods captured", self._captured, 60)
        # The resources meshd sends a waypoint for the Service bound to it: Envoy's.
        self.meshlab(
            "label",
            "--name",
            self.name,
            "service",
            "-n",
            "server",
            SERVICE,
            f"{USE_WAYPOINT}={OURS}",
            "--overwrite",
        )
        wait_until("the Service's routes in our waypoint", self._routes_in_ours, 60)
        from meshlab import procs

        procs.terminate(self._waypoint_pids(ENVOY), grace_s=10.0)  # our process of it
        self.refeed_envoy()

    def _captured(self) -> str | None:
        enrolled = self.enrolled()
        if isinstance(enrolled, str):
            return enrolled
        missing = set(self.uids.values()) - enrolled
        return f"{len(missing)} pod(s) not enrolled" if missing else None

    def _dump(self) -> dict[str, Any]:
        url = "http://127.0.0.1:15000/config_dump?include_eds"
        return dict(json.loads(in_netns(self.wp_ns[OURS], ["curl", "-sf", url])))

    def _routes_in_ours(self) -> str | None:
        text = json.dumps(self._dump())
        name = f"inbound-vip|{SERVICE_PORT}|http|{SERVICE}.server.svc.cluster.local"
        return None if name in text and '"lb_endpoints"' in text else f"no {name} yet"

    def _synced(self) -> str | None:
        for name in (OURS, ENVOY):
            ready = in_netns(
                self.wp_ns[name],
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15021/healthz/ready",
                ],
                check=False,
            )
            if ready.strip() != "200":
                return f"waypoint {name} not ready ({ready.strip() or 'no answer'})"
        return None

    def _waypoint_pids(self, name: str) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.wp_ns[name]], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def refeed_envoy(self, config: str = "plain") -> None:
        """(Re)start Envoy as ``envoy-waypoint`` with what meshd sent ``waypoint`` now.

        Our process of ``envoy-waypoint`` is gone (:meth:`start`); the Envoy
        of a previous configuration is stopped first."""
        from mesh.cluster.statefile import cluster_dir
        from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr

        for old in self.envoys:
            old.stop()
        self.envoys = []
        self.mode = None  # the path is checked again, through the new Envoy
        dump = self._dump()
        (self.dir / f"ours-config-dump.{config}.json").write_text(json.dumps(dump, indent=1))
        if config == "plain":
            (self.dir / "ours-config-dump.json").write_text(json.dumps(dump, indent=1))
        ca = CertificateAuthority.load_or_create(cluster_dir(self.name) / "ca", "cluster.local")
        identity = SpiffeId.parse(f"spiffe://cluster.local/ns/server/sa/{ENVOY}")
        key, csr = generate_key_and_csr(identity)
        issued = ca.sign_csr(csr, identity, now=dt.datetime.now(dt.UTC))
        (self.dir / "envoy-waypoint.pem").write_bytes(issued.chain_pem)
        (self.dir / "envoy-waypoint.key").write_bytes(key)
        (self.dir / "mesh-root.pem").write_bytes(ca.root_pem)
        files = {
            "cert": self.dir / "envoy-waypoint.pem",
            "key": self.dir / "envoy-waypoint.key",
            "ca": self.dir / "mesh-root.pem",
        }
        node_id = f"waypoint~{self.wp_ip[ENVOY]}~{ENVOY}.server~server.svc.cluster.local"
        bootstrap = envoy_waypoint_config(
            dump, files, self.dir / "envoy-waypoint.admin", node_id=node_id
        )
        envoy = PodEnvoy(
            self.wp_ns[ENVOY],
            bootstrap,
            self.dir,
            "envoy-waypoint",
            self._env(),
            cgroup=self.pod_cgroup(self.wp_ns[ENVOY]),
        )
        self.envoys = [envoy]
        envoy.start()
        self.log(f"waypoint {ENVOY}: Envoy (pid {envoy.pid}) with {OURS}'s resources ({config})")

    # --------------------------------------------------------- configurations

    def apply(self, path: Path, config: str) -> None:
        """``meshlab apply -f path``; then, once ours shows ``config``, Envoy refed."""
        self._bind_to_ours()
        self.meshlab("apply", "--name", self.name, "-f", str(path))
        self.await_config(config)

    def delete(self, path: Path) -> None:
        """``meshlab delete -f path``: what :meth:`apply` applied, gone (ours back to plain)."""
        self._bind_to_ours()
        self.meshlab("delete", "--name", self.name, "-f", str(path))
        self.await_config("plain")

    def _bind_to_ours(self) -> None:
        """The Service to ``waypoint``: meshd sends ours the Service's resources only then."""
        self.meshlab(
            "label",
            "--name",
            self.name,
            "service",
            "-n",
            "server",
            SERVICE,
            f"{USE_WAYPOINT}={OURS}",
            "--overwrite",
        )
        self.mode = None  # the path is checked again by the next place()
        wait_until("the Service's routes in our waypoint", self._routes_in_ours, 60)

    def await_config(self, config: str) -> None:
        collector = f"{self.collector_ip}:{COLLECTOR_PORT}"

        def shown() -> str | None:
            return self._routes_in_ours() or applied(self._dump(), config, collector)

        wait_until(f"the {config} configuration in our waypoint", shown, 60)
        try:
            self.refeed_envoy(config)
        except ValueError as e:
            raise BenchError(f"Envoy with our waypoint's {config} resources: {e}") from e

    def reset_peak_rss(self) -> None:
        """Both waypoints' VmHWM back to their current RSS (``clear_refs`` 5)."""
        for pid in [*self._waypoint_pids(OURS), *(e.pid for e in self.envoys)]:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def start_collector(self) -> Path:
        """The OTLP receiver in ``telemetry/collector``; the file its counts go to."""
        out = self.dir / "spans.json"
        out.unlink(missing_ok=True)
        argv = [venv_bin("python"), "-m", "bench.mesh.otlp_sink", "--listen",
                f"0.0.0.0:{COLLECTOR_PORT}", "--out", str(out)]  # fmt: skip
        self.collector = self.spawn(self.collector_ns, argv, "otlp-sink")
        self._wait_listening(self.collector_ns, COLLECTOR_PORT, self.collector)
        self.spans_file = out
        return out

    def stop_collector(self) -> None:
        process, self.collector = self.collector, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def spans(self) -> dict[str, int]:
        """Spans the receiver has counted so far, per waypoint (ours, envoy, other)."""
        out = {"ours": 0, "envoy": 0, "other": 0}
        for owner, n in read_counts(self.spans_file).items():
            if f"~{ENVOY}." in owner:
                out["envoy"] += n
            elif f"~{OURS}." in owner:
                out["ours"] += n
            else:
                out["other"] += n
        return out

    def status(self, headers: tuple[str, ...] = (), method: str = "GET") -> str:
        """The status code of one request from the client pod to ``url``, with ``headers``."""
        argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
        argv += ["-X", method]
        for header in headers:
            argv += ["-H", header]
        return in_netns(self.client_ns, [*argv, self.url], 30, check=False).strip()

    def request(self) -> str | None:
        """One GET (with :attr:`headers`) from the client pod: None when it answered 200."""
        code = self.status(self.headers)
        return None if code == "200" else f"curl: {code or '-'}"

    # --------------------------------------------------------- observation

    def proxy_pids(self) -> list[int]:
        """The waypoint carrying the current placement's traffic (none for l4)."""
        if self.mode == "ours":
            return self._waypoint_pids(OURS)
        if self.mode == "envoy":
            return [self.envoys[0].pid]
        return []

    def peak_rss_mb(self, placement: str) -> float:
        """The waypoint's peak resident memory so far (VmHWM), MB."""
        pids = self._waypoint_pids(OURS) if placement == "ours" else [self.envoys[0].pid]
        total = 0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            total += int(found.group(1)) if found else 0
        return total / 1024

    def counted(self) -> dict[str, int]:
        """Requests each waypoint has served so far."""
        metrics = "http://127.0.0.1:15020/stats/prometheus"
        text = in_netns(self.wp_ns[OURS], ["curl", "-sf", metrics])
        ours = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("istio_requests_total{")
        )
        stats = self.envoys[0].stats()
        envoy = sum(
            v
            for k, v in stats.items()
            if k.startswith("http.")
            and k.endswith(".downstream_rq_total")
            and k.split(".")[1] not in ("connect_terminate", "status", "admin")
        )
        return {"ours": int(ours), "envoy": int(envoy)}

    # --------------------------------------------------------- placements

    def place(self, mode: str) -> None:
        if mode == self.mode:
            return
        self.log(f"-> {mode}")
        started = time.monotonic()
        edit = {"l4": f"{USE_WAYPOINT}-", "ours": f"{USE_WAYPOINT}={OURS}"}.get(
            mode, f"{USE_WAYPOINT}={ENVOY}"
        )
        self.meshlab(
            "label", "--name", self.name, "service", "-n", "server", SERVICE, edit, "--overwrite"
        )
        wait_until(f"the {mode} path", lambda: self._check_path(mode), 60)
        self.mode = mode
        self.log(f"   {mode} in place after {time.monotonic() - started:.1f} s")

    def _check_path(self, mode: str) -> str | None:
        if ":ISTIO_OUTPUT" not in self.nat(self.client_ns):
            return "the client pod is not captured"
        before = self.counted()
        for _ in range(BURST):
            wrong = self.request()
            if wrong is not None:
                return wrong
        after = self.counted()
        moved = {k: after[k] - before[k] for k in after}
        want = {"l4": (0, 0), "ours": (BURST, 0), "envoy": (0, BURST)}[mode]
        if (moved["ours"] >= want[0] if want[0] else moved["ours"] == 0) and (
            moved["envoy"] >= want[1] if want[1] else moved["envoy"] == 0
        ):
            return None
        return f"{BURST} requests counted by ours {moved['ours']}, by Envoy {moved['envoy']}"

    def envoy_cipher(self) -> str:
        from bench.envoy import negotiated_cipher

        # One suite per TLS context (downstream and upstream): the same one, said once.
        suites, _, groups = negotiated_cipher(self.envoys[0].stats()).partition(" / ")
        return " / ".join(",".join(dict.fromkeys(x.split(","))) for x in (suites, groups))

    def envoy_admin(self, path: str) -> str:
        return admin_get(self.envoys[0].admin, path)[1]


__all__ = ["CLIENT_POD", "SERVER_POD", "WAYPOINT_PLACEMENTS", "WaypointLab"]
