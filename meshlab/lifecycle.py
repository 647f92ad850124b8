"""Bringing a cluster up and tearing it down.

``up`` records the cluster in its state file before it creates anything, and
on any failure tears down what it made, so a half-finished ``up`` leaves
nothing behind. ``down`` does not trust the state file alone: it sweeps every
network namespace, root link, iptables rule and process carrying the
cluster's prefix or marker, so it also cleans up after a crash of meshlab.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network
from pathlib import Path

from mesh.cluster import Cluster, Network, Node, Pod
from mesh.cluster.errors import StateFileError
from mesh.cluster.statefile import (
    TOKEN_FILE,
    cluster_dir,
    list_clusters,
    lock_path,
    locked,
    pod_token_path,
    read_state,
    state_path,
    write_state,
)
from meshlab import cgroups, cni, containers, mesh, names, netlink, procs, waypoints
from meshlab.errors import (
    ClusterExistsError,
    ClusterNotFoundError,
    MeshlabError,
    NotRootError,
)

Log = Callable[[str], None]
ETC_NETNS = Path("/etc/netns")
# Underlays are /24s picked from here unless the cluster file names one.
UNDERLAY_POOL = IPv4Network("172.30.0.0/16")
_ALLOCATION_LOCK = "_underlay"


def _quiet(_: str) -> None:
    pass


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(what)


def resolve_name(name: str | None) -> str:
    """The cluster a command acts on: the one named, or the only one running."""
    if name is not None:
        return names.validate_cluster_name(name)
    running = list_clusters()
    if len(running) == 1:
        return running[0]
    if not running:
        raise ClusterNotFoundError("no meshlab cluster is running; start one with `meshlab up`")
    raise ClusterNotFoundError(
        f"{len(running)} clusters are running ({', '.join(running)}); pick one with --name"
    )


def cluster_dirs(name: str) -> dict[str, Path]:
    root = cluster_dir(name)
    return {"root": root, "logs": root / "logs", "nodes": root / "nodes"}


def node_dir(name: str, node: str) -> Path:
    return cluster_dir(name) / "nodes" / node


def leftovers(name: str) -> list[str]:
    """What exists of cluster ``name`` on this host, described for a person."""
    pfx = names.prefix(name)
    found = [f"netns {n}" for n in netlink.list_netns() if n.startswith(pfx)]
    found += [f"link {n}" for n in netlink.list_links(pfx)]
    if state_path(name).exists():
        found.append(f"state {state_path(name)}")
    root = cgroups.cluster_root(name)
    if root is not None and root.exists():
        found.append(f"cgroup {root}")
    found += [f"bpf pins {d}" for d in names.bpf_dirs(name)]
    return found


# ------------------------------------------------------------------ up


def up(spec: Cluster, name: str, *, log: Log = _quiet, image: str | None = None) -> Cluster:
    """Create cluster ``name`` from ``spec``; return its running state. ``image``: the
    mesh's processes run from it in containers (``--image``)."""
    require_root("meshlab up")
    names.validate_cluster_name(name)
    if image is not None and not spec.mesh:
        raise MeshlabError("--image is the image of the mesh: give --mesh too")
    procs.require_tool("ip", "iproute2")
    cni_path = cni.find_cni_path()
    with locked(name):
        existing = leftovers(name)
        if existing:
            raise ClusterExistsError(
                f"cluster {name!r} already exists ({', '.join(existing[:4])}"
                f"{', ...' if len(existing) > 4 else ''}); "
                f"remove it first with `meshlab down --name {name}`"
            )
        try:
            with locked(_ALLOCATION_LOCK):
                state = _plan(spec, name)
                state = write_state(state)
                _build_underlay(state, log)
            state = _build_nodes(state, log)
            if state.mesh:
                _build_mesh(state, log, image)

            state = _build_pods(state, cni_path, log)
            state = write_state(replace(state, phase="Running"))
        except BaseException:
            log(f"cluster {name!r}: setup failed, removing what was created")
            _teardown(name, _quiet)
            lock_path(name).unlink(missing_ok=True)
            raise
    return state


def _plan(spec: Cluster, name: str) -> Cluster:
    """Fix the address plan: underlay, bridge, gateway and node IPs."""
    taken = netlink.root_networks()
    underlay = spec.network.underlay
    if underlay is None:
        underlay = next(
            (
                c
                for c in UNDERLAY_POOL.subnets(new_prefix=24)
                if not any(c.overlaps(t) for t in taken)
            ),
            None,
        )
        if underlay is None:
            raise MeshlabError(f"no free /24 left in {UNDERLAY_POOL} for the underlay")
    else:
        clash = [str(t) for t in taken if t.overlaps(underlay)]
        if clash:
            raise MeshlabError(
                f"underlay {underlay} overlaps networks already on this host ({', '.join(clash)}); "
                "pick another under network.underlay"
            )
    hosts = list(underlay.hosts())
    if len(hosts) < len(spec.nodes) + 1:
        raise MeshlabError(f"underlay {underlay} is too small for {len(spec.nodes)} nodes")
    gateway = hosts[0]
    nodes = tuple(
        replace(node, ip=hosts[1 + i], netns=names.node_netns(name, node.name))
        for i, node in enumerate(spec.nodes)
    )
    network = replace(
        spec.network, underlay=underlay, gateway=gateway, bridge=names.bridge_name(name)
    )
    pods = tuple(replace(p, netns=names.pod_netns(name, p.namespace, p.name)) for p in spec.pods)
    return replace(
        spec,
        name=name,
        network=network,
        nodes=nodes,
        pods=pods,
        phase="Creating",
        resource_version=0,
    )


def _build_underlay(state: Cluster, log: Log) -> None:
    net: Network = state.network
    assert state.name and net.bridge and net.gateway and net.underlay
    log(f"underlay: bridge {net.bridge} {net.gateway}/{net.underlay.prefixlen}")
    netlink.create_bridge(net.bridge, net.gateway, net.underlay)
    _allow_bridged_forwarding(state.name, net.bridge)


def _build_nodes(state: Cluster, log: Log) -> Cluster:
    assert state.name and state.network.bridge and state.network.underlay
    for i, node in enumerate(state.nodes):
        assert node.netns and node.ip
        log(f"node {node.name}: netns {node.netns}, ip {node.ip}, pods {node.pod_cidr}")
        netlink.create_netns(node.netns)
        netlink.attach_node(
            uplink=names.node_uplink_name(state.name, i),
            bridge=state.network.bridge,
            netns_name=node.netns,
            address=node.ip,
            network=state.network.underlay,
        )
        procs.sysctl(node.netns, "net.ipv4.ip_forward", "1")
        # Pods reach the control plane on the underlay gateway from the node's address,
        # as kindnet masquerades pod traffic leaving the pod network (waypoints talk
        # to meshd themselves; the host has no route back to pod addresses).
        assert state.network.gateway is not None
        procs.run_in(
            node.netns,
            [
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                str(node.pod_cidr),
                "-d",
                f"{state.network.gateway}/32",
                "-j",
                "MASQUERADE",
            ],
        )
        ndir = node_dir(state.name, node.name)
        issue_node_token(ndir)
        cni.write_conflist(
            mesh.cni_conf_dir(state.name, node.name),
            cni.node_conflist(node.pod_cidr, ndir / "cni" / "ipam"),
            cni.NETWORK_FILE,
        )
        mesh.cni_bin_dir(state.name, node.name).mkdir(parents=True, exist_ok=True)
    # As kindnet does: every node routes each other node's pod CIDR to that node.
    for node in state.nodes:
        for other in state.nodes:
            if other is not node:
                assert node.netns and other.ip
                netlink.add_route(node.netns, other.pod_cidr, other.ip)
    return state


def _build_mesh(state: Cluster, log: Log, image: str | None = None) -> None:
    """meshd and each node's agent (which installs ztunnel-cni into the node's CNI) and
    ztunnel."""
    mesh.start(state, log, image=image)


def issue_node_token(ndir: Path) -> str:
    """The node agent's credential for meshd's CA: a random token, readable by root only.

    meshd reads these files to know which token belongs to which node, the
    way the API server's TokenReview binds a Kubernetes token to a node.
    """
    ndir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path = ndir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def pod_env(state: Cluster, pod: Pod) -> dict[str, str]:
    """The environment of a pod's processes: the downward-API facts, our marker, PATH."""
    assert state.name
    # The venv's bin first, so `meshlab app ...` commands resolve in pods.
    path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]
    )
    return {
        "PATH": path,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": str(pod.ip) if pod.ip else "",
        "NODE_NAME": pod.node,
        "SERVICE_ACCOUNT": pod.service_account,
        names.PROCESS_MARKER_ENV: state.name,
    }


def _sandbox(pod: Pod) -> cni.PodSandbox:
    assert pod.container_id and pod.netns
    return cni.PodSandbox(
        container_id=pod.container_id,
        netns_path=str(procs.NETNS_DIR / pod.netns),
        namespace=pod.namespace,
        name=pod.name,
        pod_uid=cgroups.pod_uid(pod.container_id),
    )


def _runtime(state: Cluster, node: Node, cni_path: str) -> cni.CniRuntime:
    assert state.name and node.netns
    # The node's own plugin dir first (where the node agent installs ztunnel-cni), as
    # kind's /opt/cni/bin; then the reference plugins of the host.
    cni_path = os.pathsep.join([str(mesh.cni_bin_dir(state.name, node.name)), cni_path])
    return cni.CniRuntime(
        host_netns=node.netns,
        cni_path=cni_path,
        cache_dir=node_dir(state.name, node.name) / "cni" / "results",
    )


def write_resolv_conf(state: Cluster, pod: Pod) -> Path:
    """The pod's /etc/resolv.conf, as kubelet writes it (ClusterFirst): the cluster DNS
    address, the namespace's search domains, ndots 5. ``ip netns exec`` mounts
    /etc/netns/<netns>/resolv.conf over /etc/resolv.conf for the pod's processes."""
    assert pod.netns
    directory = ETC_NETNS / pod.netns
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "resolv.conf"
    path.write_text(
        f"search {pod.namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
        f"nameserver {state.network.dns_ip}\n"
        "options ndots:5\n"
    )
    return path


def _build_pods(state: Cluster, cni_path: str, log: Log) -> Cluster:
    name = state.name
    assert name
    cluster_dirs(name)["logs"].mkdir(parents=True, exist_ok=True)
    for planned in state.pods:
        state = start_pod(state, planned, cni_path, log)
    return state


def start_pod(state: Cluster, planned: Pod, cni_path: str, log: Log = _quiet) -> Cluster:
    """Create one planned pod as a runtime would: netns, CNI ADD (loopback, then the node's
    chain), resolv.conf, its process. The caller holds the cluster's lock."""
    name = state.name
    assert name
    logs = cluster_dirs(name)["logs"]
    logs.mkdir(parents=True, exist_ok=True)
    netns = planned.netns or names.pod_netns(name, planned.namespace, planned.name)
    node = state.node(planned.node)
    pod = replace(planned, netns=netns, container_id=secrets.token_hex(32))
    # Record the container id before CNI runs, so down can DEL a pod whose ADD was
    # interrupted (and so the node agent, asked by ztunnel-cni, knows the pod).
    state = write_state(
        state.with_pod(pod)
        if any(p.key == pod.key for p in state.pods)
        else replace(state, pods=(*state.pods, pod))
    )
    netlink.create_netns(netns)
    assert pod.container_id
    cgroups.create(name, node.name, pod.container_id)  # as kubelet: before the sandbox
    runtime = _runtime(state, node, cni_path)
    runtime.add(cni.LOOPBACK_CONFLIST, replace(_sandbox(pod), ifname="lo"))
    conflist = cni.load_conflist(mesh.cni_conf_dir(name, node.name))
    result = runtime.add(conflist, _sandbox(pod))
    pod = replace(pod, ip=cni.pod_address(result))
    write_resolv_conf(state, pod)
    if pod.command:
        log_path = logs / f"{pod.namespace}.{pod.name}.log"
        waypoint = pod.labels.get(waypoints.MANAGED) == waypoints.MANAGED_VALUE
        pid = mesh.start_pod_process(state, pod, pod_env(state, pod), log_path, waypoint=waypoint)
        pod = replace(pod, pid=pid)
    log(
        f"pod {pod.key}: node {pod.node}, ip {pod.ip}"
        + (f", running {shlex.join(pod.command)}" if pod.command else "")
    )
    return write_state(state.with_pod(pod))


def stop_pod(state: Cluster, pod: Pod) -> None:
    """Remove one pod's process and network, as a runtime does when a pod goes (CNI DEL).
    The caller takes it out of the state."""
    assert state.name
    if pod.pid is not None and pod.netns and procs.is_running_in(pod.pid, pod.netns):
        procs.terminate([pod.pid], grace_s=5.0)
    mesh.stop_pod_process(state.name, pod)
    if pod.container_id and pod.netns:
        node = state.node(pod.node)
        runtime = _runtime(state, node, cni.find_cni_path())
        conflist = cni.load_conflist(mesh.cni_conf_dir(state.name, node.name))
        with contextlib.suppress(MeshlabError):
            runtime.delete(conflist, _sandbox(pod))
            runtime.delete(cni.LOOPBACK_CONFLIST, replace(_sandbox(pod), ifname="lo"))
    if pod.netns:
        netlink.delete_netns(pod.netns)
        shutil.rmtree(ETC_NETNS / pod.netns, ignore_errors=True)
    if pod.container_id:
        cgroups.remove_pod(state.name, pod.node, pod.container_id)


def issue_pod_token(name: str, pod: Pod) -> Path:
    """A CA token for a pod that asks for its own identity (a waypoint), readable by root."""
    path = pod_token_path(name, pod.namespace, pod.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


# ------------------------------------------------------------------ down


@dataclass
class DownReport:
    processes: int = 0
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    rules: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.links or self.rules)


def down(name: str, *, log: Log = _quiet) -> DownReport:
    """Remove everything cluster ``name`` made; safe after a crash and when run twice."""
    require_root("meshlab down")
    names.validate_cluster_name(name)
    with locked(name):
        report = _teardown(name, log)
    lock_path(name).unlink(missing_ok=True)
    return report


def _teardown(name: str, log: Log) -> DownReport:
    report = DownReport()
    pfx = names.prefix(name)
    state: Cluster | None = None
    with contextlib.suppress(StateFileError):
        state = read_state(name)
    ours = [n for n in netlink.list_netns() if n.startswith(pfx)]

    # The containers first (their processes with them), then what is left.
    removed = containers.remove_all(name)
    if removed:
        log(f"removed {len(removed)} containers")
    pids = procs.cluster_pids(name, ours)
    report.processes = len(procs.terminate(pids))
    if pids:
        log(f"stopped {len(pids)} processes")

    if state is not None:
        _cni_delete_all(state, report)
    busy = cgroups.remove_all(name)
    if busy:
        report.warnings.append(f"cgroups still in use: {', '.join(busy)}")
    for pins in names.bpf_dirs(name):
        # The nodes' eBPF programs and maps (their pods' attachments went with the
        # pods' cgroups and namespaces).
        shutil.rmtree(pins, ignore_errors=True)

    # Pods before nodes: a pod's veth peer lives in its node's namespace.
    node_ns = {n.netns for n in state.nodes} if state else set()
    for ns in sorted(ours, key=lambda n: (n in node_ns or "-node-" in n, n)):
        netlink.delete_netns(ns)
        report.namespaces.append(ns)
    for link in sorted(netlink.list_links(pfx), key=lambda n: n == names.bridge_name(name)):
        netlink.delete_link(link)
        report.links.append(link)
    report.rules = _remove_iptables_rules(name)
    for d in ETC_NETNS.glob(f"{pfx}*") if ETC_NETNS.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(cluster_dir(name), ignore_errors=True)
    if report.namespaces or report.links:
        log(f"removed {len(report.namespaces)} namespaces, {len(report.links)} links")
    return report


def _cni_delete_all(state: Cluster, report: DownReport) -> None:
    """Release each pod's network through CNI DEL, as a runtime does when a pod goes."""
    try:
        cni_path = cni.find_cni_path()
    except MeshlabError as e:
        report.warnings.append(str(e))
        return
    present = set(netlink.list_netns())
    for pod in state.pods:
        if not pod.container_id or not pod.netns:
            continue
        node = state.node(pod.node)
        if node.netns not in present:
            continue  # the node and everything in it are gone already
        assert state.name
        try:
            conflist = cni.load_conflist(mesh.cni_conf_dir(state.name, node.name))
            runtime = _runtime(state, node, cni_path)
            runtime.delete(conflist, _sandbox(pod))
            runtime.delete(cni.LOOPBACK_CONFLIST, replace(_sandbox(pod), ifname="lo"))
        except MeshlabError as e:
            report.warnings.append(f"pod {pod.key}: {e}")


# ------------------------------------------------------------------ iptables


def _bridge_netfilter_on() -> bool:
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False


def _allow_bridged_forwarding(name: str, bridge: str) -> None:
    """Let node-to-node frames cross the underlay bridge past the host firewall.

    With br_netfilter loaded, bridged IPv4 frames traverse the root
    namespace's FORWARD chain, whose policy is DROP on hosts running Docker;
    without this rule nodes could not reach each other there.
    """
    if not _bridge_netfilter_on():
        return
    iptables = shutil.which("iptables")
    if iptables is None:
        return
    subprocess.run(
        [
            iptables,
            "-w",
            "-I",
            "FORWARD",
            "-i",
            bridge,
            "-o",
            bridge,
            "-m",
            "comment",
            "--comment",
            names.iptables_comment(name),
            "-j",
            "ACCEPT",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _remove_iptables_rules(name: str) -> int:
    iptables = shutil.which("iptables")
    if iptables is None:
        return 0
    done = subprocess.run(
        [iptables, "-w", "-S"], capture_output=True, text=True, timeout=30, check=False
    )
    pattern = re.compile(rf'--comment "?{re.escape(names.iptables_comment(name))}"?(\s|$)')
    removed = 0
    for line in done.stdout.splitlines():
        if line.startswith("-A ") and pattern.search(line):
            args = shlex.split(line)
            args[0] = "-D"
            subprocess.run([iptables, "-w", *args], capture_output=True, timeout=30, check=False)
            removed += 1
    return removed


# ------------------------------------------------------------------ queries


def pod_phase(pod: Pod) -> str:
    """Running, Exited (the app process ended) or Missing (the namespace is gone)."""
    if pod.netns is None or procs.netns_inode(pod.netns) is None:
        return "Missing"
    if pod.pid is None:
        return "Running" if not pod.command else "Pending"
    return "Running" if procs.is_running_in(pod.pid, pod.netns) else "Exited"
