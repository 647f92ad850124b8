"""The meshlab cluster of the bench, its pods and apps, and the placements floor/ours/ebpf/envoy."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import time
from pathlib import Path

from bench.envoy import negotiated_cipher
from bench.hbone_bench import OPENSSL_CONF, nginx_config
from bench.mesh.envoy_pair import (
    PodEnvoy,
    envoy_client_config,
    envoy_server_config,
)
from bench.mesh.shell import BenchError, Log, in_netns, in_pod, pod_argv, run, venv_bin, wait_until
from bench.mesh.topology import (
    AMBIENT,
    BENCH_CHAIN,
    CLIENT_POD,
    CLIENT_SAN,
    CLUSTER,
    ENVOY_MARK,
    HBONE_PORT,
    HTTP_PORT,
    IPERF_PORT,
    MARK_MASK,
    MESH_CAPTURE,
    OUTBOUND_PORT,
    POD_IFACE,
    SERVER_POD,
    SERVER_SAN,
    TC_PROGRAM,
    ZTUNNEL_PORTS,
)

TIME_WAIT_S = 60.0  # Linux's TCP_TIMEWAIT_LEN
_TIMEWAIT = re.compile(r"timer:\(timewait,([^,]*),")  # ss -o: "timer:(timewait,51sec,0)"
_DURATION = re.compile(r"([\d.]+)(min|sec|ms)")
_UNIT_S = {"min": 60.0, "sec": 1.0, "ms": 0.001}


class MeshLab:
    """The cluster, its two pods, the apps in the server pod and the placements.

    Every process the lab starts in a pod runs in the pod's cgroup too (:meth:`pod_cgroup`),
    as a container's would: the eBPF capture only sees the sockets of those."""

    cluster_spec = CLUSTER  # the meshlab cluster file, as a dict
    headers: tuple[str, ...] = ()  # sent with every wrk request (the waypoint's: a token)

    def __init__(self, workdir: Path, log: Log, *, pin_cipher: bool = True) -> None:
        self.dir = workdir
        self.log = log
        self.pin_cipher = pin_cipher
        self.name = "mb" + "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6)
        )
        self.up = False
        self.processes: list[subprocess.Popen[bytes]] = []
        self.envoys: list[PodEnvoy] = []
        self.iperf: subprocess.Popen[bytes] | None = None
        self.mode: str | None = None
        self.ciphers: dict[str, str] = {}
        (self.dir / "openssl.cnf").write_text(OPENSSL_CONF)
        self._certs()

    # --------------------------------------------------------- setup

    def _certs(self) -> None:
        from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr

        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.create("cluster.local", now=now)
        (self.dir / "ca.pem").write_bytes(ca.root_pem)
        for name, san in (("server", SERVER_SAN), ("client", CLIENT_SAN)):
            identity = SpiffeId.parse(san)
            key, csr = generate_key_and_csr(identity)
            issued = ca.sign_csr(csr, identity, now=now)
            (self.dir / f"{name}.pem").write_bytes(issued.chain_pem)
            (self.dir / f"{name}.key").write_bytes(key)

    def files(self, name: str) -> dict[str, Path]:
        return {
            "cert": self.dir / f"{name}.pem",
            "key": self.dir / f"{name}.key",
            "ca": self.dir / "ca.pem",
        }

    def meshlab(self, *args: str, timeout_s: float = 180) -> str:
        return run([venv_bin("meshlab"), *args], timeout_s)

    def start(self) -> None:
        from mesh.cluster.statefile import read_state

        spec = self.dir / "cluster.yaml"
        spec.write_text(json.dumps(self.cluster_spec, indent=1) + "\n")  # JSON is YAML
        self.up = True  # from here on, `meshlab down` in any case
        self.log(f"cluster {self.name}: meshlab up --mesh (2 nodes, 2 pods)")
        self.meshlab("up", "-f", str(spec), "--name", self.name, "--mesh")
        self.state = read_state(self.name)
        pods = {p.key: p for p in self.state.pods}
        client, server = pods[CLIENT_POD], pods[SERVER_POD]
        assert client.netns and server.netns and client.ip and server.ip
        assert client.container_id and server.container_id
        if client.node == server.node:
            raise BenchError("the client and server pods must be on different nodes")
        self.client_ns, self.server_ns = client.netns, server.netns
        self.client_ip, self.server_ip = str(client.ip), str(server.ip)
        self.client_node, self.server_node = client.node, server.node
        self.uids = {CLIENT_POD: client.container_id, SERVER_POD: server.container_id}
        self.log(
            f"pods: {CLIENT_POD} {self.client_ip} on {client.node}, "
            f"{SERVER_POD} {self.server_ip} on {server.node}"
        )
        if self.pin_cipher:
            for node in self.state.nodes:
                self._pin_ztunnel(node.name)
        self._start_apps()

    def _env(self) -> dict[str, str]:
        """For the processes started in the pods: ours, marked as the cluster's."""
        return {**os.environ, "MESHLAB_CLUSTER": self.name}

    def pod_cgroup(self, netns: str) -> Path | None:
        """The cgroup (v2) directory of the pod whose network namespace is ``netns``; None
        when it is no pod's or has none (a host without cgroup v2)."""
        from meshlab import cgroups

        pod = next((p for p in self.state.pods if p.netns == netns), None)
        if pod is None or pod.container_id is None:
            return None
        path = cgroups.pod_dir(self.name, pod.node, pod.container_id)
        return path if path is not None and path.is_dir() else None

    def in_pod(self, netns: str, argv: list[str], timeout_s: float = 60, check: bool = True) -> str:
        """Run ``argv`` as a process of the pod of ``netns`` (its netns and cgroup)."""
        return in_pod(netns, self.pod_cgroup(netns), argv, timeout_s, check)

    def proxy_pids(self) -> list[int]:
        """The proxies carrying the current placement's traffic: both ends."""
        if self.mode in MESH_CAPTURE:
            return [self.ztunnel_pid(self.client_node), self.ztunnel_pid(self.server_node)]
        if self.mode == "envoy":
            return [envoy.pid for envoy in self.envoys]
        return []

    def ztunnel_pid(self, node: str) -> int:
        from meshlab import mesh

        return int(mesh.pids(self.name)["nodes"][node]["ztunnel"])

    def _pin_ztunnel(self, node_name: str) -> None:
        """Restart the node's ztunnel as it was started, plus OPENSSL_CONF (no pod enrolled yet)."""
        from mesh.cluster.statefile import cluster_dir
        from meshlab import mesh, procs

        node = self.state.node(node_name)
        assert node.netns
        old = self.ztunnel_pid(node_name)
        argv = [a.decode() for a in Path(f"/proc/{old}/cmdline").read_bytes().split(b"\0")[:-1]]
        env = dict(
            entry.decode().split("=", 1)
            for entry in Path(f"/proc/{old}/environ").read_bytes().split(b"\0")
            if b"=" in entry
        )
        # A console script runs as `python .../ztunnel ARGS`: start the script itself.
        script = next((i for i, a in enumerate(argv) if Path(a).name == "ztunnel"), None)
        if script is None:
            raise BenchError(f"ztunnel of {node_name}: unexpected command line {argv}")
        argv = argv[script:]
        env["OPENSSL_CONF"] = str(self.dir / "openssl.cnf")
        procs.terminate([old], grace_s=10.0)
        log_path = cluster_dir(self.name) / "logs" / f"ztunnel.{node_name}.log"
        # As meshlab starts it: only the netns entered, the host's /sys/fs (bpf, cgroup) seen.
        pid = procs.spawn(node.netns, argv, env=env, log_path=log_path, host_mounts=True)
        path = cluster_dir(self.name) / "mesh.json"
        data = json.loads(path.read_text())
        data["nodes"][node_name]["ztunnel"] = pid
        path.write_text(json.dumps(data, indent=2) + "\n")
        mesh.wait_node(self.state, node)
        self.log(f"node {node_name}: ztunnel restarted as pid {pid} with TLS_AES_128_GCM_SHA256")

    def spawn(self, netns: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                pod_argv(netns, self.pod_cgroup(netns), argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
        self.processes.append(process)
        return process

    def _start_apps(self) -> None:
        self.start_iperf()
        conf = nginx_config(self.dir / "nginx", f"0.0.0.0:{HTTP_PORT}")
        nginx = self.spawn(
            self.server_ns, ["nginx", "-c", str(conf), "-p", str(conf.parent)], "nginx"
        )
        self._wait_listening(self.server_ns, HTTP_PORT, nginx)
        self.log(f"server pod: iperf3 -s on {IPERF_PORT}, nginx on {HTTP_PORT}")

    def start_iperf(self) -> None:
        if self.iperf is not None and self.iperf.poll() is None:
            self.iperf.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.iperf.wait(5)
            if self.iperf.poll() is None:
                self.iperf.kill()
        self.iperf = self.spawn(self.server_ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3")
        self._wait_listening(self.server_ns, IPERF_PORT, self.iperf)

    def _wait_listening(self, netns: str, port: int, process: subprocess.Popen[bytes]) -> None:
        def check() -> str | None:
            if process.poll() is not None:
                raise BenchError(f"{process.args!r} exited {process.returncode}")
            return None if port in self.listening(netns) else f"nothing listens on {port}"

        wait_until(f"port {port} in {netns}", check, 15)

    # --------------------------------------------------------- observation

    def listening(self, netns: str) -> set[int]:
        out = in_netns(netns, ["ss", "-ltnH"])
        return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line}

    def client_time_waits(self, younger_than_s: float) -> int:
        """TIME_WAITs in the client pod toward nginx that began in the last
        ``younger_than_s`` seconds: connections the client (wrk) closed first. Each
        holds one of the pod's ephemeral ports toward the server for 60 s; its timer
        tells its age. (With the eBPF capture the client's sockets are connected to
        the pod's own 15001: connect4 rewrote the address, and nothing restores it
        for getpeername.)"""
        toward = f"( dst {self.server_ip}:{HTTP_PORT} or dst {self.client_ip}:{OUTBOUND_PORT} )"
        out = in_netns(self.client_ns, ["ss", "-tanoH", "state", "time-wait", toward], check=False)
        young = 0
        for timer in _TIMEWAIT.findall(out):
            left = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(timer))
            young += left >= TIME_WAIT_S - younger_than_s
        return young

    def nat(self, netns: str) -> str:
        return in_netns(netns, ["iptables-save", "-t", "nat"])

    def tc_ingress(self, netns: str) -> str:
        """The tc filters on the pod's eth0 ingress (the eBPF capture's ``zt_ingress``)."""
        return in_netns(netns, ["tc", "filter", "show", "dev", POD_IFACE, "ingress"], check=False)

    def capture_wrong(self, backend: str) -> str | None:
        """Whether both nodes' agents capture with ``backend``: None, or what they say.

        An agent that was asked for eBPF and refused it (it stays on iptables) raises
        :class:`BenchError` with its reason: waiting would not change it."""
        from meshlab import mesh

        for node in (self.client_node, self.server_node):
            try:
                capture = mesh.agent_status(self.name, node).get("capture") or {}
            except (OSError, ValueError) as e:
                return f"node agent of {node}: {e}"
            if capture.get("backend") == backend:
                continue
            if capture.get("refused"):
                raise BenchError(
                    f"node {node}: the node agent refused the {capture.get('requested')} "
                    f"capture and runs {capture.get('backend')}: {capture['refused']}"
                )
            return f"node agent of {node}: capture {capture or '?'}, not {backend}"
        return None

    def enrolled(self) -> set[str] | str:
        """The pods (uids) the node agents enrolled, or why they did not answer."""
        from meshlab import mesh

        found: set[str] = set()
        for node in (self.client_node, self.server_node):
            try:
                found |= set(mesh.agent_status(self.name, node)["enrolled"])
            except (OSError, ValueError, KeyError) as e:
                return f"node agent of {node}: {e}"
        return found

    @property
    def url(self) -> str:
        """What the client pod asks: nginx in the server pod, by its IP."""
        return f"http://{self.server_ip}:{HTTP_PORT}/"

    def request(self) -> str | None:
        """One GET from the client pod to ``url``: None when it answered 200."""
        argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
        done = subprocess.run(
            pod_argv(self.client_ns, self.pod_cgroup(self.client_ns), [*argv, self.url]),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.stdout.strip() == "200":
            return None
        return f"curl: {done.stdout.strip() or '-'} {done.stderr.strip()}"

    def tunnel_holders(self) -> list[str]:
        """The processes (``users:`` of ss) holding connections to the server pod's 15008."""
        out = in_netns(
            self.client_ns,
            ["ss", "-tnpH", "state", "established", "dst", f"{self.server_ip}:{HBONE_PORT}"],
        )
        return [line.split("users:", 1)[1] for line in out.splitlines() if "users:" in line]

    # --------------------------------------------------------- placements

    def place(self, mode: str) -> None:
        """Put the pods in placement ``mode`` and check the traffic's path."""
        if mode == self.mode:
            return
        self.log(f"-> {mode}")
        started = time.monotonic()
        # Envoy's listeners hold 15001/15008 in the pods: gone before ztunnel's come or are
        # looked for.
        self._stop_envoys()
        self._redirect(False)
        # Every change passes through the floor: the pods released (not ambient, not
        # captured, not enrolled), so a node agent can change its backend holding no pod.
        self._label(False)
        backend = MESH_CAPTURE.get(mode)
        if backend is not None:
            self._use_backend(backend)
            self._label(True)
            self._check_ours(backend)
        elif mode == "envoy":
            self._start_envoys()
            self._check_envoy()
        else:
            self._check_floor()
        self.mode = mode
        self.log(f"   {mode} in place after {time.monotonic() - started:.1f} s")

    def _use_backend(self, backend: str) -> None:
        """Both nodes' agents on the capture ``backend``: each one that runs another is
        stopped, its node's ``capture`` changed in the cluster's state and started again
        (no pod is enrolled: :meth:`place` released them)."""
        from mesh.cluster.statefile import locked, read_state, write_state
        from meshlab import mesh, procs

        nodes = (self.client_node, self.server_node)
        change = [n for n in nodes if read_state(self.name).node(n).capture != backend]
        if not change:
            return
        started = time.monotonic()
        agents = mesh.pids(self.name)["nodes"]
        procs.terminate([int(agents[n]["agent"]) for n in change], grace_s=10.0)
        with locked(self.name):
            state = read_state(self.name)
            state = write_state(
                dataclasses.replace(
                    state,
                    nodes=tuple(
                        dataclasses.replace(n, capture=backend) if n.name in change else n
                        for n in state.nodes
                    ),
                )
            )
        self.state = state
        for name in change:
            mesh.start_agent(state, state.node(name))
        for name in change:
            mesh.wait_node(state, state.node(name))
        wait_until(f"the node agents on {backend}", lambda: self.capture_wrong(backend), 15)
        self.log(
            f"   node agents of {', '.join(change)} restarted with --capture {backend} "
            f"({time.monotonic() - started:.1f} s)"
        )

    def _label(self, ambient: bool) -> None:
        edit = f"{AMBIENT}=ambient" if ambient else f"{AMBIENT}-"
        for ns in ("client", "server"):
            self.meshlab("label", "--name", self.name, "namespace", ns, edit, "--overwrite")
        if ambient:
            return

        def released() -> str | None:
            for netns in (self.client_ns, self.server_ns):
                if ":ISTIO_OUTPUT" in self.nat(netns):
                    return f"{netns} still captured"
                if TC_PROGRAM in self.tc_ingress(netns):
                    return f"{netns} still captured (tc filter {TC_PROGRAM})"
                left = self.listening(netns) & set(ZTUNNEL_PORTS)
                if left:
                    return f"{netns} still has ztunnel's listeners {sorted(left)}"
            enrolled = self.enrolled()
            if isinstance(enrolled, str):
                return enrolled
            if enrolled & set(self.uids.values()):
                return "a pod is still enrolled"
            return None

        wait_until("pods released from the mesh", released)

    def _check_ours(self, backend: str = "iptables") -> None:
        """The pods captured by our ztunnels through ``backend`` (and not the other), and a
        request through the client node's ztunnel."""
        if backend == "ebpf":
            for netns in (self.client_ns, self.server_ns):
                if self.pod_cgroup(netns) is None:
                    raise BenchError(f"the pod of {netns} has no cgroup: eBPF cannot capture it")

        def captured() -> str | None:
            wrong = self.capture_wrong(backend)
            if wrong is not None:
                return wrong
            for netns in (self.client_ns, self.server_ns):
                rules = ":ISTIO_OUTPUT" in self.nat(netns)
                tc = TC_PROGRAM in self.tc_ingress(netns)
                if backend == "ebpf" and rules:
                    return f"{netns} holds iptables capture rules with the eBPF backend"
                if backend != "ebpf" and tc:
                    return f"{netns} has the tc filter {TC_PROGRAM} with the iptables backend"
                if not (tc if backend == "ebpf" else rules):
                    return f"{netns} not captured ({backend})"
                missing = set(ZTUNNEL_PORTS) - self.listening(netns)
                if missing:
                    return f"{netns}: no listener on {sorted(missing)}"
            enrolled = self.enrolled()
            if isinstance(enrolled, str):
                return enrolled
            missing_uids = set(self.uids.values()) - enrolled
            if missing_uids:
                return f"{len(missing_uids)} pod(s) not enrolled"
            return None

        wait_until(f"pods captured ({backend})", captured)
        ztunnel = self.ztunnel_pid(self.client_node)
        self._check_tunnel(f"pid={ztunnel},", f"the client node's ztunnel (pid {ztunnel})")
        if "ours" not in self.ciphers:
            self.ciphers["ours"] = self._probe_cipher()

    def _check_envoy(self) -> None:
        nat = self.nat(self.client_ns)
        if ":ISTIO_OUTPUT" in nat or f":{BENCH_CHAIN}" not in nat:
            raise BenchError(f"client pod's nat table is not the Envoy placement's:\n{nat}")
        client = next(e for e in self.envoys if e.name == "envoy-client")
        self._check_tunnel(f"pid={client.pid},", f"the client pod's Envoy (pid {client.pid})")

    def _check_floor(self) -> None:
        for netns in (self.client_ns, self.server_ns):
            nat = self.nat(netns)
            if ":ISTIO_" in nat or BENCH_CHAIN in nat:
                raise BenchError(f"{netns} still redirects traffic:\n{nat}")
            left = self.listening(netns) & set(ZTUNNEL_PORTS)
            if left:
                raise BenchError(f"{netns} still listens on {sorted(left)}")
        wait_until("a direct request", self.request, 15)

    def _check_tunnel(self, holder: str, who: str) -> None:
        def through() -> str | None:
            wrong = self.request()
            if wrong is not None:
                return wrong
            holders = self.tunnel_holders()
            if not any(holder in h for h in holders):
                return f"no connection to {self.server_ip}:{HBONE_PORT} held by {who}: {holders}"
            return None

        wait_until(f"a request through {who}", through)

    def _probe_cipher(self) -> str:
        """The suite the server pod's ztunnel picks from OpenSSL's default offer.

        From the client node (outside any pod, so nothing is captured); the
        handshake then fails for want of a client certificate, which the
        server's ztunnel logs as a warning.
        """
        node = self.state.node(self.client_node)
        assert node.netns
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                "openssl",
                "s_client",
                "-connect",
                f"{self.server_ip}:{HBONE_PORT}",
                "-alpn",
                "h2",
                "-brief",
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        text = done.stdout + done.stderr
        suite = re.search(r"Ciphersuite: (\S+)", text)
        group = re.search(r"(?:Server Temp Key|Negotiated TLS1.3 group): ([^\s,]+)", text)
        return f"{suite.group(1) if suite else 'unknown'} / {group.group(1) if group else '?'}"

    def _redirect(self, on: bool) -> None:
        """The client pod's outbound TCP to the Envoy on 15001, except Envoy's own."""
        nat = self.nat(self.client_ns)
        if on == (f":{BENCH_CHAIN}" in nat):
            return
        mark = f"0x{ENVOY_MARK:x}/0x{MARK_MASK:x}"
        if on:
            rules = [
                "*nat",
                f":{BENCH_CHAIN} - [0:0]",
                f"-A OUTPUT -j {BENCH_CHAIN}",
                f"-A {BENCH_CHAIN} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
                f"-A {BENCH_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {mark} "
                f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
                "COMMIT",
            ]
        else:
            rules = [
                "*nat",
                f"-D OUTPUT -j {BENCH_CHAIN}",
                f"-F {BENCH_CHAIN}",
                f"-X {BENCH_CHAIN}",
                "COMMIT",
            ]
        done = subprocess.run(
            ["ip", "netns", "exec", self.client_ns, "iptables-restore", "--noflush"],
            input="\n".join(rules) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"iptables-restore in {self.client_ns}: {done.stderr.strip()}")

    def _start_envoys(self) -> None:
        self._stop_envoys()
        for netns in (self.client_ns, self.server_ns):
            clash = self.listening(netns) & {OUTBOUND_PORT, HBONE_PORT}
            if clash:
                raise BenchError(f"{netns} already listens on {sorted(clash)}")
        server = PodEnvoy(
            self.server_ns,
            envoy_server_config(
                self.files("server"),
                self.dir / "envoy-server.admin",
                self.server_ip,
                (IPERF_PORT, HTTP_PORT),
            ),
            self.dir,
            "envoy-server",
            self._env(),
            cgroup=self.pod_cgroup(self.server_ns),
        )
        client = PodEnvoy(
            self.client_ns,
            envoy_client_config(
                self.files("client"), self.dir / "envoy-client.admin", self.server_ip
            ),
            self.dir,
            "envoy-client",
            self._env(),
            cgroup=self.pod_cgroup(self.client_ns),
        )
        self.envoys = [server, client]
        server.start()
        client.start()
        self._redirect(True)

    def _stop_envoys(self) -> None:
        if self.envoys and "envoy" not in self.ciphers:
            with contextlib.suppress(OSError, http.client.HTTPException, StopIteration):
                self.ciphers["envoy"] = negotiated_cipher(self.envoys[0].stats())
        for envoy in self.envoys:
            envoy.stop()
        self.envoys = []

    # --------------------------------------------------------- teardown

    def ztunnel_logs(self) -> dict[str, Path]:
        from mesh.cluster.statefile import cluster_dir

        logs = cluster_dir(self.name) / "logs"
        return {p.name: p for p in sorted(logs.glob("*.log"))} if logs.is_dir() else {}

    def close(self, keep_logs: Path | None) -> None:
        """Stop our processes, keep the cluster's logs, `meshlab down`."""
        with contextlib.suppress(Exception):
            self._stop_envoys()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not self.up:
            return
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for name, path in self.ztunnel_logs().items():
                with contextlib.suppress(OSError):
                    shutil.copy(path, keep_logs / name)
        done = subprocess.run(
            [venv_bin("meshlab"), "down", "--name", self.name],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            self.log(f"meshlab down --name {self.name} failed: {done.stderr.strip()}")
        else:
            self.log(f"cluster {self.name}: down")
