"""Finding mesh pods that ztunnel-cni never saw: cgroups, a /proc tree, the agent's pass.

The /proc tree is a directory of the same shape (``PID/cgroup``, ``PID/comm``,
``PID/ns/net``): the finder reads files and compares inodes, so hard links
stand in for processes sharing a network namespace. The real namespaces are
covered by tests/integration/test_mesh_meshlab.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import MappingProxyType

from tests.unit.ztunnel.test_nodeagent import FixedView
from ztunnel.nodeagent import kube
from ztunnel.nodeagent.discover import Found, ProcFinder, cgroup_ids, record_for, unrecorded
from ztunnel.nodeagent.records import PodRecord
from ztunnel.nodeagent.service import NodeAgent
from ztunnel.nodeagent.view import ClusterView, PodFacts

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
UID_A = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
UID_B = "11111111-2222-3333-4444-555555555555"
UID_C = "99999999-8888-7777-6666-555555555555"
PAUSE = "a" * 64
APP = "b" * 64


def test_cgroup_paths_name_the_pod_and_container_under_both_drivers() -> None:
    systemd = (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        f"{UID_A.replace('-', '_')}.slice/cri-containerd-{PAUSE}.scope\n"
    )
    assert cgroup_ids(systemd) == (UID_A, PAUSE)
    cgroupfs = f"12:pids:/kubepods/burstable/pod{UID_B}/{APP}\n11:memory:/kubepods/x\n"
    assert cgroup_ids(cgroupfs) == (UID_B, APP)
    assert cgroup_ids(f"0::/kubepods/pod{UID_B}\n") == (UID_B, None)
    assert cgroup_ids("0::/system.slice/containerd.service\n") is None
    assert cgroup_ids("") is None


def process(proc: Path, pid: int, cgroup: str, comm: str, net: Path) -> None:
    base = proc / str(pid)
    (base / "ns").mkdir(parents=True)
    (base / "cgroup").write_text(cgroup)
    (base / "comm").write_text(comm + "\n")
    os.link(net, base / "ns" / "net")  # the same inode: the same network namespace


def tree(tmp_path: Path) -> tuple[Path, Path]:
    proc, netns_dir, spaces = tmp_path / "proc", tmp_path / "netns", tmp_path / "spaces"
    for d in (proc, netns_dir, spaces):
        d.mkdir(parents=True)
    host, pod_a, pod_c = spaces / "host", spaces / "a", spaces / "c"
    for ns in (host, pod_a, pod_c):
        ns.write_text("")
    os.link(pod_a, netns_dir / "cni-1234")  # the runtime pins pod A's namespace
    process(proc, 1, "0::/init.scope\n", "systemd", host)
    # Pod A: its app first in /proc, then its pause process (the sandbox).
    process(proc, 40, f"0::/kubepods/pod{UID_A}/{APP}\n", "python3", pod_a)
    process(proc, 41, f"0::/kubepods/pod{UID_A}/{PAUSE}\n", "pause", pod_a)
    # Pod B runs on the host's network: never recorded.
    process(proc, 50, f"0::/kubepods/pod{UID_B}/{PAUSE}\n", "pause", host)
    # Pod C: no pause process seen, nothing pinned.
    process(proc, 60, f"0::/kubepods/pod{UID_C}/{APP}\n", "sleep", pod_c)
    (proc / "self").mkdir()  # not a pid: skipped
    return proc, netns_dir


def test_the_finder_names_each_pods_namespace_and_sandbox_and_skips_the_hosts(
    tmp_path: Path,
) -> None:
    proc, netns_dir = tree(tmp_path)
    found = ProcFinder(proc, netns_dir).find([UID_A, UID_B, UID_C, "no-such-pod"])
    assert found == {
        UID_A: Found(str(netns_dir / "cni-1234"), PAUSE),
        UID_C: Found(str(proc / "60" / "ns" / "net"), None),
    }
    assert ProcFinder(proc, netns_dir).find([]) == {}
    assert ProcFinder(tmp_path / "absent", netns_dir).find([UID_A]) == {}


def facts(name: str, labels: dict[str, str] | None = None, **extra: object) -> PodFacts:
    return PodFacts("shop", name, "node1", "web", labels or {}, **extra)  # type: ignore[arg-type]


def test_only_pods_with_an_address_and_no_record_are_looked_for() -> None:
    pods = {
        ("shop", "a"): facts("a", uid=UID_A, ips=("10.244.1.5",)),
        ("shop", "starting"): facts("starting", uid=UID_B),  # its ADD is not done yet
        ("shop", "seen"): facts("seen", uid=UID_C, ips=("10.244.1.6",)),
    }
    view = ClusterView(1, MappingProxyType({"shop": AMBIENT}), MappingProxyType(pods))
    records = {"x": PodRecord("x", "shop", "seen", "/run/netns/x", ())}
    wanted = [("shop", "a"), ("shop", "starting"), ("shop", "seen"), ("shop", "gone")]
    assert [f.name for f in unrecorded(view, records, wanted)] == ["a"]


def test_a_record_is_what_ztunnel_cni_would_have_written() -> None:
    a = facts("a", uid=UID_A, ips=("10.244.1.5",))
    made = record_for(a, Found("/var/run/netns/cni-1", PAUSE))
    assert made == PodRecord(
        PAUSE, "shop", "a", "/var/run/netns/cni-1", ("10.244.1.5",), pod_uid=UID_A
    )
    # No pause process seen: a uid of its own, from the pod's.
    assert record_for(a, Found("/host/proc/9/ns/net", None)) == PodRecord(
        f"pod-{UID_A}", "shop", "a", "/host/proc/9/ns/net", ("10.244.1.5",), pod_uid=UID_A
    )
    assert record_for(a, None) is None
    # meshlab's state names the sandbox and its namespace: no /proc needed.
    known = facts("k", ips=("10.244.1.7",), sandbox="c0ffee", netns="/run/netns/ml-k")
    assert record_for(known, None) == PodRecord(
        "c0ffee", "shop", "k", "/run/netns/ml-k", ("10.244.1.7",)
    )


def test_the_agents_pass_records_this_nodes_unseen_mesh_pods_only(tmp_path: Path) -> None:
    proc, netns_dir = tree(tmp_path / "host")
    ip = ("10.244.1.5",)
    pods = {
        ("shop", "a"): facts("a", uid=UID_A, ips=ip),
        ("shop", "c"): facts("c", uid=UID_C, ips=ip, labels={"istio.io/dataplane-mode": "none"}),
        ("other", "b"): PodFacts("other", "b", "node1", "default", {}, uid=UID_B, ips=ip),
        ("shop", "far"): PodFacts("shop", "far", "node2", "web", {}, uid=UID_C, ips=ip),
    }
    view = ClusterView(1, MappingProxyType({"shop": AMBIENT, "other": {}}), MappingProxyType(pods))

    async def body() -> dict[str, PodRecord]:
        (tmp_path / "run").mkdir()
        agent = NodeAgent(
            run_dir=tmp_path / "run",
            source=FixedView(view),
            node="node1",
            finder=ProcFinder(proc, netns_dir),
            netns_exists=lambda p: p.startswith(str(tmp_path)),
        )
        # Capturing the found pod fails here (no real namespace): the record stays.
        await agent.reconcile()
        return agent.records.all()[0]

    records = asyncio.run(body())
    assert list(records) == [PAUSE]
    assert records[PAUSE].name == "a" and records[PAUSE].netns == str(netns_dir / "cni-1234")


def test_the_kubernetes_view_takes_the_pods_uid_and_addresses() -> None:
    pod = {
        "metadata": {"namespace": "shop", "name": "a", "uid": UID_A},
        "spec": {"nodeName": "node1"},
        "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]},
    }
    got = kube._facts(pod, "node1")
    assert got is not None and (got.uid, got.ips) == (UID_A, ("10.244.1.5", "fd00::5"))
    del pod["status"]["podIPs"]  # type: ignore[attr-defined]
    got = kube._facts(pod, "node1")
    assert got is not None and got.ips == ("10.244.1.5",)
    pod["status"] = {}
    got = kube._facts(pod, "node1")
    assert got is not None and got.ips == ()
    # A pod on its way out is never looked for, though the API still shows its address.
    for meta, phase in (({"deletionTimestamp": "2026-12-03T10:00:00Z"}, "Running"), ({}, "Failed")):
        pod["metadata"] = {"namespace": "shop", "name": "a", "uid": UID_A, **meta}
        pod["status"] = {"podIP": "10.244.1.5", "phase": phase}
        got = kube._facts(pod, "node1")
        assert got is not None and got.ips == ()
