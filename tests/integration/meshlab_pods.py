"""What the meshlab mesh tests ask of a cluster's pods: addresses, one curl, how a pod
is captured, and what crosses the node underlay.

Shared by the mesh suites (test_mesh_meshlab.py, test_capture_mixed_meshlab.py); each
reads the cluster through meshlab's state and the host's own tools (iptables-save,
tc, bpftool, a scapy sniffer), not through the code under test.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from scapy.layers.inet import TCP
from scapy.sendrecv import AsyncSniffer

from mesh.cluster.statefile import read_state
from meshlab import cgroups, names
from tests.integration.conftest import meshlab


def pod_ip(name: str, key: str) -> str:
    state = read_state(name)
    return next(str(p.ip) for p in state.pods if p.key == key)


def curl(name: str, pod: str, url: str, *, data: str | None = None) -> tuple[int, str]:
    """One attempt, no retries: (curl's exit code, body)."""
    args = ["exec", "--name", name, pod, "--", "curl", "-sS", "--max-time", "5"]
    if data is not None:
        args += ["--data-binary", data]
    done = meshlab(*args, url, check=False, timeout=30)
    return done.returncode, done.stdout


def backend_of(name: str, key: str) -> str:
    state = read_state(name)
    pod = next(p for p in state.pods if p.key == key)
    return state.node(pod.node).capture


def _in_pod_netns(name: str, key: str, argv: list[str]) -> str:
    ns, pod = key.split("/")
    return subprocess.run(
        ["ip", "netns", "exec", names.pod_netns(name, ns, pod), *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def tc_ingress(name: str, key: str) -> str:
    """The tc filters on the pod's eth0 ingress (the eBPF capture's is ``zt_ingress``)."""
    return _in_pod_netns(name, key, ["tc", "filter", "show", "dev", "eth0", "ingress"])


def captured(name: str, key: str) -> bool:
    """Whether the pod is captured by its node's backend: the in-pod iptables chains,
    or the eBPF tc filter on its eth0 (and then not one iptables rule of ours)."""
    rules = ":ISTIO_OUTPUT" in _in_pod_netns(name, key, ["iptables-save", "-t", "nat"])
    if backend_of(name, key) == "iptables":
        return rules
    assert not rules, f"{key} holds iptables capture rules on an eBPF node"
    return "zt_ingress" in tc_ingress(name, key)


def capture_state(name: str, key: str) -> str:
    """What the pod's capture consists of, as text: the iptables rules, or the tc
    filters (with their program ids) and the cgroup's attached programs."""
    if backend_of(name, key) == "iptables":
        dump = _in_pod_netns(name, key, ["iptables-save"])
        # The rules and chains, without the dump's timestamps and counters.
        return "\n".join(
            line.split(" [", 1)[0]
            for line in dump.splitlines()
            if line.startswith(("-A", ":", "*"))
        )
    started = next(p for p in read_state(name).pods if p.key == key)
    assert started.container_id
    cgroup = cgroups.pod_dir(name, started.node, started.container_id)
    progs = subprocess.run(
        ["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
    ).stdout
    return tc_ingress(name, key) + progs


def wait_for(what: str, check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def sniff(name: str) -> AsyncSniffer:
    """Pod traffic on the node underlay (meshd's, between node addresses, is left out)."""
    pods = str(read_state(name).network.pod_cidr)
    sniffer = AsyncSniffer(
        iface=names.bridge_name(name),
        store=True,
        filter=f"tcp and src net {pods} and dst net {pods}",
    )
    sniffer.start()
    time.sleep(0.3)
    return sniffer


def seen(sniffer: AsyncSniffer) -> list[Any]:
    time.sleep(0.3)
    return [p for p in (sniffer.stop() or ()) if TCP in p]
