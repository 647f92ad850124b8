"""The mesh from the image: ``meshlab up --mesh --image IMAGE``, in podman.

A short run of what ``MESHLAB_IMAGE=IMAGE pytest tests/integration`` runs in
full: one cluster whose meshd, node agents, ztunnels and waypoint are
containers of the image, a request that crosses the mesh through the
waypoint, and a look at each recorded pid on the host: a process in another
pid namespace, in its node's network namespace, with exactly the
capabilities, user, group and no-new-privileges its manifest gives (the
rendered default overlay; the waypoint's, the Deployment meshd makes).
Skipped, with the reason, where podman, the image or kubectl is missing
(``make test`` builds the image first as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import kube_waypoints
from mesh.cluster.statefile import read_state
from meshlab import mesh
from tests.integration.conftest import IMAGE_ENV, assert_nothing_left, meshlab, unique_name
from tests.integration.test_image import IMAGE as BUILT_IMAGE
from tests.unit.deploy.render import container, find, kubectl, render

IMAGE = os.environ.get(IMAGE_ENV) or BUILT_IMAGE
VIP = "10.96.0.30"
# linux/capability.h: a capability's bit in /proc/<pid>/status CapEff.
CAP_BITS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip

CLUSTER: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "namespaces": [
        {"name": "client", "labels": {"istio.io/dataplane-mode": "ambient"}},
        {
            "name": "server",
            "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"},
        },
    ],
    "serviceAccounts": [{"namespace": "client", "name": "sleep"}],
    "pods": [
        {
            "name": "sleep",
            "namespace": "client",
            "node": "node1",
            "serviceAccount": "sleep",
            "command": ["sleep", "infinity"],
        },
        {
            "name": "echo",
            "namespace": "server",
            "node": "node2",
            "labels": {"app": "echo"},
            "command": ["meshlab", "app", "echo", "--port", "8080"],
        },
    ],
    "services": [
        {
            "name": "echo",
            "namespace": "server",
            "vip": VIP,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "selector": {"app": "echo"},
        }
    ],
}
WAYPOINT = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "server"},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}


def _missing() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (`make image` installs it)"
    if subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode != 0:
        return f"the image {IMAGE} is not built (`make image`)"
    return kubectl()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    name = unique_name()
    files = tmp_path_factory.mktemp("image")
    (files / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    (files / "waypoint.yaml").write_text(yaml.safe_dump(WAYPOINT))
    try:
        meshlab("up", "-f", str(files / "cluster.yaml"), "--name", name, "--mesh", "--image", IMAGE)
        meshlab("apply", "--name", name, "-f", str(files / "waypoint.yaml"))
        yield name
    finally:
        meshlab("down", "--name", name, check=False)
        assert_nothing_left(name)  # the containers too


def request(name: str) -> dict[str, Any] | None:
    done = meshlab(
        "exec", "--name", name, "client/sleep", "--",
        "curl", "-sS", "--max-time", "3", f"http://{VIP}/",
        check=False,
    )  # fmt: skip
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout else None


def test_a_request_crosses_the_mesh_through_the_waypoint(cluster: str) -> None:
    (waypoint,) = [p for p in read_state(cluster).pods if p.key == "server/waypoint"]
    waypoint_ip = str(waypoint.ip)
    deadline = time.monotonic() + 45
    answer = request(cluster)
    while (answer is None or not answer["client"].startswith(f"{waypoint_ip}:")) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.3)
        answer = request(cluster)
    assert answer is not None, "no answer through the mesh"
    # The echo pod on node2 saw the waypoint as its client: client -> ztunnel (node1)
    # -> HBONE -> waypoint -> HBONE -> ztunnel (node2) -> echo, all from the image.
    assert answer["pod"] == "echo"
    assert answer["client"].rsplit(":", 1)[0] == waypoint_ip


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def cap_bits(names: list[str]) -> int:
    return sum(1 << CAP_BITS[n.removeprefix("CAP_")] for n in names)


def inspect(name: str) -> dict[str, Any]:
    out = subprocess.run(
        ["podman", "inspect", name], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, Any] = json.loads(out)[0]
    return found


def check_process(pid: int, netns: str, sc: dict[str, Any], container_name: str) -> None:
    """``pid`` is the container's process, in ``netns``, with what ``sc`` (a manifest's
    securityContext) grants and nothing more."""
    info = inspect(container_name)
    assert info["State"]["Pid"] == pid
    assert info["ImageName"] == IMAGE
    assert info["Config"]["Labels"]["io.meshlab.cluster"] == container_name.split("-")[0]
    assert Path(f"/proc/{pid}/ns/pid").stat().st_ino != Path("/proc/self/ns/pid").stat().st_ino
    assert Path(f"/proc/{pid}/ns/net").stat().st_ino == Path(netns).stat().st_ino
    status = status_of(pid)
    caps = sc.get("capabilities") or {}
    assert caps.get("drop") == ["ALL"], "the manifests drop every capability first"
    assert int(status["CapEff"], 16) == cap_bits(caps.get("add") or []), container_name
    assert int(status["CapBnd"], 16) == cap_bits(caps.get("add") or []), container_name
    assert status["Uid"].split()[0] == str(sc.get("runAsUser", 1337))
    assert status["Gid"].split()[0] == str(sc.get("runAsGroup", 1337))
    assert status["NoNewPrivs"] == ("1" if sc.get("allowPrivilegeEscalation") is False else "0")
    assert info["HostConfig"]["ReadonlyRootfs"] == bool(sc.get("readOnlyRootFilesystem"))


def test_meshd_the_agents_and_the_ztunnels_are_containers_with_their_manifests_privileges(
    cluster: str,
) -> None:
    objects = render("default")
    meshd = container(find(objects, "Deployment", "meshd"), "meshd")["securityContext"]
    agent_set = find(objects, "DaemonSet", "ztunnel-node-agent")
    agent = container(agent_set, "node-agent")["securityContext"]
    ztunnel = container(find(objects, "DaemonSet", "ztunnel"), "ztunnel")["securityContext"]
    recorded = mesh.pids(cluster)
    check_process(recorded["meshd"], "/proc/self/ns/net", meshd, f"{cluster}-meshd")
    for node, pids in recorded["nodes"].items():
        netns = f"/run/netns/{cluster}-node-{node}"
        check_process(pids["agent"], netns, agent, f"{cluster}-node-agent-{node}")
        check_process(pids["ztunnel"], netns, ztunnel, f"{cluster}-ztunnel-{node}")


def test_the_waypoint_runs_as_the_deployment_meshd_would_make(cluster: str) -> None:
    gw = kube_waypoints.GatewayRef(namespace="server", name="waypoint", uid="")
    deployment = kube_waypoints.deployment(gw, kube_waypoints.DeployerSettings())
    sc = container(deployment, "waypoint")["securityContext"]
    (pod,) = [p for p in read_state(cluster).pods if p.key == "server/waypoint"]
    assert pod.pid is not None
    check_process(pod.pid, f"/run/netns/{pod.netns}", sc, f"{cluster}-pod-server-waypoint")
