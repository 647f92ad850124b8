"""``deploy/`` renders, every object is valid Kubernetes, and the output is the reviewed one.

Each overlay is rendered with ``kubectl kustomize`` (skipped, with the reason,
where kubectl is missing) and every object validated, unknown fields refused,
against the schemas ``kubernetes-validate`` ships for the Kubernetes versions
in :data:`render.KUBERNETES_VERSIONS` (1.30 and 1.34).

Golden files: ``golden/<overlay>.yaml`` hold each overlay's rendered output;
a render that differs fails with the diff. After an intended change,
regenerate them and review the diff before committing::

    python deploy/base/crds/generate.py          # if the CRD definitions changed
    REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/unit/deploy
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy.render import (
    DEPLOY,
    GOLDEN,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    Obj,
    container,
    containers,
    find,
    mounts,
    pod_spec,
    render,
    render_text,
)

REFRESH = os.environ.get("REFRESH_GOLDEN", "") not in ("", "0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_mesh(overlay: str) -> None:
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for wanted in [
        ("Namespace", "istio-system"),
        ("Deployment", "meshd"),
        ("Service", "istiod"),
        ("DaemonSet", "ztunnel"),
        ("DaemonSet", "ztunnel-node-agent"),
        ("ClusterRole", "meshd"),
        ("ClusterRole", "ztunnel-node-agent"),
        ("CustomResourceDefinition", "virtualservices.networking.istio.io"),
    ]:
        assert wanted in kinds
    namespaced = [o for o in objects if o["kind"] not in CLUSTER_SCOPED]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"istio-system"}
    assert all(
        o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ambient-mesh" for o in objects
    )


CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def test_kubectl_apply_k_deploy_installs_the_default_overlay() -> None:
    assert render_text(DEPLOY) == render_text(DEPLOY / "overlays" / "default")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_kubernetes_schemas(overlay: str, version: str) -> None:
    problems = []
    for obj in render(overlay):
        name = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{name}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: Kubernetes {version} has no schema for {obj['apiVersion']}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_output_is_the_golden_file(overlay: str) -> None:
    rendered = render_text(DEPLOY / "overlays" / overlay)
    golden = GOLDEN / f"{overlay}.yaml"
    if REFRESH:
        golden.write_text(rendered, encoding="utf-8")
        return
    want = golden.read_text(encoding="utf-8") if golden.exists() else ""
    if rendered != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True),
                rendered.splitlines(keepends=True),
                f"golden/{overlay}.yaml",
                f"kubectl kustomize deploy/overlays/{overlay}",
                n=2,
            )
        )
        pytest.fail(
            f"deploy/overlays/{overlay} renders differently from its golden file "
            f"(if intended: REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/unit/deploy):\n"
            + diff[:6000]
        )


def _log_levels(objects: list[Obj]) -> dict[str, str]:
    return {
        c["name"]: {e["name"]: e.get("value") for e in c.get("env") or ()}["LOG_LEVEL"]
        for _, c in containers(objects)
    }


def test_dev_overlay_logs_debug_with_one_meshd() -> None:
    default, dev = render("default"), render("dev")
    assert _log_levels(default) == {"meshd": "info", "ztunnel": "info", "node-agent": "info"}
    assert _log_levels(dev) == {"meshd": "debug", "ztunnel": "debug", "node-agent": "debug"}
    assert find(default, "Deployment", "meshd")["spec"]["replicas"] == 2
    assert find(dev, "Deployment", "meshd")["spec"]["replicas"] == 1
    assert _without_log_levels(default) == _without_log_levels(dev)  # nothing else differs


def _without_log_levels(objects: list[Obj]) -> list[Obj]:
    """The objects less their LOG_LEVEL, and meshd's replicas."""
    out = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            obj = copy.deepcopy(obj)
            obj["spec"].pop("replicas", None)
            for c in pod_spec(obj)["containers"]:
                c["env"] = sorted(
                    (e for e in c["env"] if e["name"] != "LOG_LEVEL"), key=lambda e: e["name"]
                )
        out.append(obj)
    return out


def test_meshds_replicas_leave_one_serving_through_a_drain_and_a_node_loss() -> None:
    objects = render("default")
    meshd = find(objects, "Deployment", "meshd")
    labels = meshd["spec"]["template"]["metadata"]["labels"]
    budget = find(objects, "PodDisruptionBudget", "meshd")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    # One at a time: never both, and a one-replica install (dev) can still be drained.
    assert budget == {"maxUnavailable": 1, "selector": budget["selector"]}
    assert meshd["spec"]["replicas"] - budget["maxUnavailable"] >= 1
    spread = pod_spec(meshd)["affinity"]["podAntiAffinity"]
    (term,) = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # Its name in the leader Lease: the pod's, from the downward API.
    env = {e["name"]: e for e in container(meshd, "meshd")["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_one_image_for_every_program_and_an_override_changes_them_all(tmp_path: Path) -> None:
    images = {c["image"] for _, c in containers(render("default"))}
    assert images == {"ambient-mesh:0.1.0"}
    overlay = tmp_path / "mine"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY / "overlays" / "default", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "images": [
                    {"name": "ambient-mesh", "newName": "registry.example/mesh", "newTag": "v9"}
                ],
            }
        )
    )
    objects = render(str(overlay))
    assert {c["image"] for _, c in containers(objects)} == {"registry.example/mesh:v9"}
    meshd = container(find(objects, "Deployment", "meshd"), "meshd")
    env = {e["name"]: e.get("value") for e in meshd["env"]}
    assert env["WAYPOINT_IMAGE"] == "registry.example/mesh:v9"  # the waypoints follow


def test_ztunnel_has_istios_privilege_set_and_no_more() -> None:
    objects = render("default")
    ds = find(objects, "DaemonSet", "ztunnel")
    spec, c = pod_spec(ds), container(ds, "ztunnel")
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    security = c["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"],
    }
    assert security["readOnlyRootFilesystem"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (0, 1337)
    volumes = mounts(ds, c)
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == {"/var/run/ztunnel"}
    (token,) = volumes["/var/run/secrets/tokens"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    assert volumes["/var/run/secrets/istio"]["configMap"]["name"] == "istio-ca-root-cert"
    assert spec["automountServiceAccountToken"] is False  # the istio-ca token is its only one
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [
        {"effect": "NoSchedule", "operator": "Exists"},
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"effect": "NoExecute", "operator": "Exists"},
    ]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    bound = [
        s
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for s in o.get("subjects") or ()
    ]
    assert not [s for s in bound if s["name"] == "ztunnel"], "ztunnel has no RBAC"


def test_node_agent_has_istio_cnis_shape() -> None:
    ds = find(render("default"), "DaemonSet", "ztunnel-node-agent")
    spec, c = pod_spec(ds), container(ds, "node-agent")
    assert not spec.get("hostNetwork")
    assert c["securityContext"]["privileged"] is False
    assert c["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN", "DAC_OVERRIDE"],
    }
    volumes = mounts(ds, c)
    host = {where: v["hostPath"]["path"] for where, v in volumes.items() if "hostPath" in v}
    assert host == {
        "/host/opt/cni/bin": "/opt/cni/bin",
        "/host/etc/cni/net.d": "/etc/cni/net.d",
        "/host/proc": "/proc",
        "/var/run/netns": "/var/run/netns",
        "/var/run/ztunnel": "/var/run/ztunnel",
    }
    by_path = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert by_path["/host/proc"]["readOnly"] is True
    assert by_path["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert spec["priorityClassName"] == "system-node-critical"


def test_ebpf_overlay_runs_the_ebpf_capture_with_the_nodes_bpffs_and_cgroups() -> None:
    objects = {c["name"]: (pod, c) for pod, c in containers(render("ebpf"))}
    agent_pod, agent = objects["node-agent"]
    assert agent["args"][-3:] == [
        "--capture=ebpf",
        "--bpf-dir=/sys/fs/bpf/ztunnel",
        "--cgroup-root=/host/sys/fs/cgroup",
    ]
    ztunnel_pod, ztunnel = objects["ztunnel"]
    assert "--bpf-dir=/sys/fs/bpf/ztunnel" in ztunnel["args"]

    def host_paths(workload: Obj, container: Obj) -> dict[str, str]:
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        return {
            m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
            for m in container["volumeMounts"]
            if "hostPath" in volumes[m["name"]]
        }

    assert host_paths(agent_pod, agent)["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert host_paths(agent_pod, agent)["/host/sys/fs/cgroup"] == "/sys/fs/cgroup"
    assert host_paths(ztunnel_pod, ztunnel)["/sys/fs/bpf"] == "/sys/fs/bpf"
    # The same privileges as the default overlay: nothing more for eBPF.
    default = {c["name"]: c for _, c in containers(render("default"))}
    for name in ("node-agent", "ztunnel"):
        assert objects[name][1]["securityContext"] == default[name]["securityContext"]
