"""``meshlab up --image``: the podman options read from the manifests, without running any."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controlplane import kube_waypoints
from meshlab import containers
from meshlab.errors import MeshlabError
from tests.unit.deploy.render import container, find, need_kubectl, pod_spec, render
from ztunnel.ctl import hostpid


def _security(kind: str, name: str, c: str) -> containers.Security:
    need_kubectl()
    workload = find(render("default"), kind, name)
    return containers.Security.of(pod_spec(workload), container(workload, c))


def test_ztunnel_gets_istios_privilege_set_and_nothing_else() -> None:
    args = _security("DaemonSet", "ztunnel", "ztunnel").podman_args()
    assert args[:2] == ["--user", "0:1337"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--cap-add"] == [
        "NET_ADMIN",
        "SYS_ADMIN",
        "NET_RAW",
    ]
    assert args[2:4] == ["--cap-drop", "ALL"]
    # Read-only root, its emptyDir /tmp the one writable place; no podman tmpfs defaults.
    assert {"--read-only", "--read-only-tmpfs=false"} <= set(args)
    assert args[args.index("--tmpfs") + 1] == "/tmp"
    assert "--privileged" not in args and "no-new-privileges" not in args


def test_meshd_runs_as_1337_with_no_capabilities_no_new_privileges_and_runtime_seccomp() -> None:
    args = _security("Deployment", "meshd", "meshd").podman_args()
    assert args[:4] == ["--user", "1337:1337", "--cap-drop", "ALL"]
    assert "--cap-add" not in args
    assert "no-new-privileges" in args
    assert "seccomp=unconfined" not in args  # the pod asks RuntimeDefault: podman's own


def test_the_node_agent_is_unconfined_by_apparmor_as_its_manifest_says() -> None:
    security = _security("DaemonSet", "ztunnel-node-agent", "node-agent")
    assert security.apparmor_unconfined and not security.read_only
    assert set(security.cap_add) == {
        "NET_ADMIN",
        "NET_RAW",
        "SYS_PTRACE",
        "SYS_ADMIN",
        "DAC_OVERRIDE",
    }


def test_the_waypoint_is_the_deployment_meshd_makes() -> None:
    deployment = kube_waypoints.deployment(
        kube_waypoints.GatewayRef(namespace="n", name="w", uid=""),
        kube_waypoints.DeployerSettings(),
    )
    security = containers.Security.of(pod_spec(deployment), container(deployment, "waypoint"))
    assert (security.user, security.group, security.cap_add) == (1337, 1337, ())
    assert security.no_new_privileges and security.read_only
    # What meshlab records survives its file.
    assert containers.Security.from_dict(security.to_dict()) == security


def test_run_as_non_root_with_uid_0_is_refused() -> None:
    with pytest.raises(MeshlabError, match="runAsNonRoot"):
        containers.Security(user=0, run_as_non_root=True).podman_args()


def test_a_container_joins_its_node_namespace_and_carries_the_cluster_label() -> None:
    c = containers.Container(
        cluster="demo",
        name="demo-ztunnel-node1",
        image="localhost/ambient-mesh:0.1.0",
        security=containers.Security(),
        argv=("ztunnel", "--node", "node1"),
        netns="demo-node-node1",
        log_path=Path("/tmp/x.log"),
        env={"MESHLAB_CLUSTER": "demo"},
        binds=containers.default_binds("demo"),
    )
    argv = c.podman_argv()
    assert argv[argv.index("--network") + 1] == "ns:/run/netns/demo-node-node1"
    assert argv[argv.index("--label") + 1] == f"{containers.LABEL}=demo"
    assert argv[argv.index("--name") + 1] == "demo-ztunnel-node1"
    assert argv[-4:] == ["localhost/ambient-mesh:0.1.0", "ztunnel", "--node", "node1"]
    # meshd lives in the root namespace.
    root = replace(c, netns=None).podman_argv()
    assert root[root.index("--network") + 1] == "host"


def test_ctl_leaves_paths_it_cannot_map_alone() -> None:
    translate = hostpid.translator(Path("/proc/self/ns/net"), 15000)
    assert translate("/run/netns/demo-pod-a-b") == "/run/netns/demo-pod-a-b"
