"""The mesh on a meshlab cluster: meshd, and on each node the node agent and ztunnel.

``meshlab up --mesh`` (or ``mesh: true`` in the cluster file) runs, as a
Kubernetes install of Istio ambient would:

* meshd in the root namespace, listening on the underlay gateway address
  (xDS 15010, xDS and CA over TLS 15012, status 15014), following the
  cluster's state file;
* on each node, inside the node's namespace, ``ztunnel-node-agent`` and
  ``ztunnel`` (a DaemonSet's two pods), sharing the node's run directory;
* the node agent installs ``ztunnel-cni`` into its node's CNI as on
  Kubernetes (``--cni-conf-dir``/``--cni-bin-dir``: the node's ``cni/net.d``
  and ``cni/bin``, kind's ``/etc/cni/net.d`` and ``/opt/cni/bin``): the binary
  copied, its entry appended to the primary conflist and put back when that is
  rewritten; a node is ready once it is, so pods created afterwards pass
  through it.

Every process carries the cluster's marker, so ``meshlab down`` stops them
with the rest. Their pids are kept in ``mesh.json`` in the cluster's dir.

With ``--image IMAGE`` each of them (and each waypoint pod) runs from the
image in a container instead (:mod:`meshlab.containers`), with its manifest's
privileges; ``mesh.json`` records the image and those privileges, so whatever
(re)starts a mesh process later starts it the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ebpf.capture import cgroup2_mount, ensure_bpffs
from mesh.cluster.model import Cluster, Node, Pod
from mesh.cluster.statefile import cluster_dir, node_token_path, pod_token_path
from meshlab import cgroups, containers, names, procs
from meshlab.errors import MeshlabError

BPF_FS = names.BPF_FS
HOST_CGROUP = Path("/host/sys/fs/cgroup")  # where the eBPF overlay mounts the node's
XDS_PORT = 15010
XDS_TLS_PORT = 15012
STATUS_PORT = 15014
AGENT_SOCKET = "plugin.sock"
READY_TIMEOUT_S = 60.0

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def bin_dir() -> Path:
    """Where the project's commands are (the venv's bin, beside this Python)."""
    return Path(sys.executable).parent


def run_dir(name: str, node: str) -> Path:
    return cluster_dir(name) / "nodes" / node / "ztunnel"


def root_cert(name: str) -> Path:
    return cluster_dir(name) / "ca" / "root-cert.pem"


def _state_file(name: str) -> Path:
    return cluster_dir(name) / "mesh.json"


def cni_conf_dir(name: str, node: str) -> Path:
    """The node's CNI configuration dir (Kubernetes' ``/etc/cni/net.d``)."""
    return cluster_dir(name) / "nodes" / node / "cni" / "net.d"


def cni_bin_dir(name: str, node: str) -> Path:
    """The node's CNI plugin dir (Kubernetes' ``/opt/cni/bin``), first on ``CNI_PATH``."""
    return cluster_dir(name) / "nodes" / node / "cni" / "bin"


def _env(state: Cluster) -> dict[str, str]:
    assert state.name
    return {
        "PATH": os.pathsep.join([str(bin_dir()), os.environ.get("PATH", "/usr/sbin:/usr/bin")]),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        names.PROCESS_MARKER_ENV: state.name,
    }


def _logs(state: Cluster) -> Path:
    assert state.name
    logs = cluster_dir(state.name) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def _gateway(state: Cluster) -> str:
    assert state.network.gateway is not None
    return str(state.network.gateway)


def _record(name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    path = _state_file(name)
    data: dict[str, Any] = pids(name)
    change(data)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data


def pids(name: str) -> dict[str, Any]:
    """``{"meshd": pid, "nodes": {node: {"agent": pid, "ztunnel": pid}}}``, and with
    ``--image`` ``"image": {"name": IMAGE, "security": {role: ...}}``."""
    try:
        data = json.loads(_state_file(name).read_text())
    except (OSError, ValueError):
        return {"nodes": {}}
    if not isinstance(data, dict):
        return {"nodes": {}}
    return dict(data)


def image_of(name: str) -> tuple[str, dict[str, containers.Security]] | None:
    """The image the cluster's mesh runs from and each role's privileges, or None when
    its processes run on the host."""
    recorded = pids(name).get("image")
    if not isinstance(recorded, dict):
        return None
    security = {
        role: containers.Security.from_dict(data) for role, data in recorded["security"].items()
    }
    return str(recorded["name"]), security


def use_image(state: Cluster, image: str, log: Log = _quiet) -> None:
    """Record that the mesh runs from ``image``, with the manifests' privileges, and give
    the users the manifests name what they need of the cluster's dir: meshd writes the
    CA and reads the node tokens (group-readable by its group), ztunnel reads its
    node's token (its owner, root) and the root certificate."""
    assert state.name
    exists = subprocess.run(
        [containers.podman(), "image", "exists", image], capture_output=True, check=False
    )
    if exists.returncode != 0:
        raise MeshlabError(f"the image {image} is not in podman's store (`make image` builds it)")
    security = containers.manifest_security()
    meshd = security["meshd"]
    ca = root_cert(state.name).parent
    ca.mkdir(parents=True, exist_ok=True)
    os.chown(ca, _id(meshd.user), _id(meshd.group))
    for node in state.nodes:
        token = node_token_path(state.name, node.name)
        os.chown(token, -1, _id(meshd.group))
        token.chmod(0o640)
    _record(
        state.name,
        lambda d: d.__setitem__(
            "image", {"name": image, "security": {r: s.to_dict() for r, s in security.items()}}
        ),
    )
    log(f"mesh: from the image {image}, with the privileges of deploy/overlays/default")


def _id(value: int | None) -> int:
    return -1 if value is None else value


def _launch(
    state: Cluster,
    role: str,
    parts: tuple[str, ...],
    netns: str | None,
    argv: list[str],
    log_path: Path,
    binds: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> int:
    """Start one mesh process: on the host, or from the cluster's image when it has one."""
    assert state.name
    image = image_of(state.name)
    if image is None:
        # The host's /sys/fs (cgroup, bpf), as the DaemonSets' hostPath mounts give.
        return procs.spawn(netns, argv, env=env or _env(state), log_path=log_path, host_mounts=True)
    name, security = image
    container_env = {k: v for k, v in (env or _env(state)).items() if k not in ("PATH", "HOME")}
    if "MESHLAB_STATE_DIR" in os.environ:
        container_env["MESHLAB_STATE_DIR"] = os.environ["MESHLAB_STATE_DIR"]
    return containers.run(
        containers.Container(
            cluster=state.name,
            name=names.container_name(state.name, *parts),
            image=name,
            security=security[role],
            argv=(Path(argv[0]).name, *argv[1:]),
            netns=netns,
            log_path=log_path,
            env=container_env,
            binds=(*containers.default_binds(state.name), *binds),
        )
    )


def start_pod_process(
    state: Cluster, pod: Pod, env: dict[str, str], log_path: Path, *, waypoint: bool
) -> int:
    """A pod's process: a waypoint's from the image when the mesh has one (as the
    Deployment meshd would make: its token owned by the waypoint's user, readable by
    meshd's group), any other pod's on the host."""
    assert state.name and pod.netns
    image = image_of(state.name) if waypoint else None
    if image is None:
        cgroup = (
            cgroups.pod_dir(state.name, pod.node, pod.container_id) if pod.container_id else None
        )
        return procs.spawn(pod.netns, pod.command, env=env, log_path=log_path, cgroup=cgroup)
    security = image[1]
    token = pod_token_path(state.name, pod.namespace, pod.name)
    if token.exists():
        os.chown(token, _id(security["waypoint"].user), _id(security["meshd"].group))
        token.chmod(0o640)
    parts = ("pod", pod.namespace, pod.name)
    return _launch(state, "waypoint", parts, pod.netns, list(pod.command), log_path, env=env)


def stop_pod_process(name: str, pod: Pod) -> None:
    """Remove a pod's container, when it has one (its process is stopped already)."""
    if image_of(name) is not None:
        containers.remove(names.container_name(name, "pod", pod.namespace, pod.name))


def start_meshd(state: Cluster, log: Log = _quiet) -> int:
    assert state.name
    gw = _gateway(state)
    argv = [
        str(bin_dir() / "meshd"),
        "--source",
        f"meshlab:{state.name}",
        "--listen",
        f"{gw}:{XDS_PORT}",
        "--tls-listen",
        f"{gw}:{XDS_TLS_PORT}",
        "--status-listen",
        f"{gw}:{STATUS_PORT}",
    ]
    pid = _launch(state, "meshd", ("meshd",), None, argv, _logs(state) / "meshd.log")
    _record(state.name, lambda d: d.__setitem__("meshd", pid))
    log(f"meshd: pid {pid}, xDS {gw}:{XDS_PORT}, TLS {gw}:{XDS_TLS_PORT}")
    return pid


def wait_meshd(state: Cluster, timeout_s: float = READY_TIMEOUT_S) -> None:
    url = f"http://{_gateway(state)}:{STATUS_PORT}/ready"
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200 and root_cert(state.name or "").is_file():
                    return
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.1)
    raise MeshlabError(f"meshd did not become ready within {timeout_s:g} s ({url}: {last})")


def start_agent(state: Cluster, node: Node, log: Log = _quiet) -> int:
    assert state.name and node.netns
    rdir = run_dir(state.name, node.name)
    rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [
        str(bin_dir() / "ztunnel-node-agent"),
        "--source",
        f"meshlab:{state.name}",
        "--node",
        node.name,
        "--run-dir",
        str(rdir),
        "--cni-conf-dir",
        str(cni_conf_dir(state.name, node.name)),
        "--cni-bin-dir",
        str(cni_bin_dir(state.name, node.name)),
        "--capture",
        node.capture,
        "--bpf-dir",
        str(names.bpf_dir(state.name, node.name)),
    ]
    binds: tuple[str, ...] = (containers.NETNS_BIND,)
    cgroup_root = cgroups.node_root(state.name, node.name)
    if cgroup_root is not None:
        cgroup_root.mkdir(parents=True, exist_ok=True)
        mount = cgroup2_mount()
        if node.capture == "ebpf" and image_of(state.name) is not None and mount is not None:
            # As the eBPF overlay's hostPaths: the node's bpffs, and its cgroup v2
            # tree at /host/sys/fs/cgroup (the container's own /sys/fs/cgroup is
            # its cgroup namespace's).
            binds += (f"{BPF_FS}:{BPF_FS}", f"{mount}:{HOST_CGROUP}")
            cgroup_root = HOST_CGROUP / cgroup_root.relative_to(mount)
        argv += ["--cgroup-root", str(cgroup_root)]
    if node.capture == "ebpf":
        ensure_bpffs(BPF_FS)  # the node's, which a container cannot mount for the host
    log_path = _logs(state) / f"node-agent.{node.name}.log"
    where = ("node-agent", node.name)
    pid = _launch(state, "agent", where, node.netns, argv, log_path, binds)
    _record(
        state.name,
        lambda d: d.setdefault("nodes", {}).setdefault(node.name, {}).__setitem__("agent", pid),
    )
    log(f"node {node.name}: node agent pid {pid}")
    return pid


def start_ztunnel(state: Cluster, node: Node, log: Log = _quiet) -> int:
    assert state.name and node.netns
    rdir = run_dir(state.name, node.name)
    argv = [
        str(bin_dir() / "ztunnel"),
        "--node",
        node.name,
        "--xds-address",
        f"{_gateway(state)}:{XDS_TLS_PORT}",
        "--root-cert",
        str(root_cert(state.name)),
        "--token-file",
        str(node_token_path(state.name, node.name)),
        "--zds-socket",
        str(rdir / "zds.sock"),
        "--bpf-dir",
        str(names.bpf_dir(state.name, node.name)),
    ]
    log_path = _logs(state) / f"ztunnel.{node.name}.log"
    binds = (f"{BPF_FS}:{BPF_FS}",) if node.capture == "ebpf" else ()
    pid = _launch(state, "ztunnel", ("ztunnel", node.name), node.netns, argv, log_path, binds)
    _record(
        state.name,
        lambda d: d.setdefault("nodes", {}).setdefault(node.name, {}).__setitem__("ztunnel", pid),
    )
    log(f"node {node.name}: ztunnel pid {pid}")
    return pid


def agent_status(name: str, node: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The node agent's ``status`` answer (raises OSError/ValueError when unreachable).

    The agent's socket speaks one JSON line each way (``ztunnel.nodeagent``);
    meshlab runs the agent as a program and so talks to it on the wire only.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(run_dir(name, node) / AGENT_SOCKET))
        s.sendall(b'{"cmd": "status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"null")
    if not isinstance(answer, dict):
        raise ValueError(f"the node agent answered {data[:200]!r}")
    return answer


def wait_node(state: Cluster, node: Node, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the node's agent is ready (ztunnel-cni installed among the rest) and its
    ztunnel is connected to it."""
    assert state.name
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = agent_status(state.name, node.name, timeout_s=1.0)
        except (OSError, ValueError) as e:
            last = f"node agent: {e}"
        else:
            ready, why = status.get("ready") or (False, "the agent does not say it is ready")
            if not ready:
                last = f"node agent: {why}"
            elif status.get("ztunnel"):
                return
            else:
                last = "ztunnel is not connected to the node agent"
        time.sleep(0.1)
    raise MeshlabError(f"node {node.name}: the mesh is not ready after {timeout_s:g} s: {last}")


def start(state: Cluster, log: Log = _quiet, *, image: str | None = None) -> None:
    """meshd, then every node's agent and ztunnel; returns when all are ready. With
    ``image``, each runs from it in a container (:func:`use_image` first)."""
    assert state.name
    if image is not None:
        use_image(state, image, log)
    start_meshd(state, log)
    wait_meshd(state)
    for node in state.nodes:
        start_agent(state, node, log)
        start_ztunnel(state, node, log)
    for node in state.nodes:
        wait_node(state, node)


def restart_ztunnel(state: Cluster, node: Node, *, kill: bool = True, log: Log = _quiet) -> int:
    """Stop the node's ztunnel (SIGKILL, or SIGTERM with ``kill=False``) and start another."""
    assert state.name
    old = pids(state.name).get("nodes", {}).get(node.name, {}).get("ztunnel")
    if isinstance(old, int) and node.netns and procs.is_running_in(old, node.netns):
        os.kill(old, signal.SIGKILL if kill else signal.SIGTERM)
        procs.terminate([old], grace_s=10.0)
    pid = start_ztunnel(state, node, log)
    wait_node(state, node)
    return pid


def remove_files(name: str) -> None:
    _state_file(name).unlink(missing_ok=True)
