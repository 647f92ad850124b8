"""deploy/kind: the cluster, the sample and up.sh agree with the manifests they install.

kind and Docker do not run on these machines; what can be checked here is
that the cluster file is kind's shape, the sample is valid Kubernetes that
the mesh enrolls, and up.sh names what the rendered manifests really hold.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from mesh.ambient import in_ambient
from tests.unit.deploy.render import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    find,
    pod_spec,
    render,
)

KIND = DEPLOY / "kind"


def test_the_cluster_is_one_control_plane_and_two_workers() -> None:
    cluster = yaml.safe_load((KIND / "cluster.yaml").read_text())
    assert (cluster["kind"], cluster["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert [n["role"] for n in cluster["nodes"]] == ["control-plane", "worker", "worker"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_sample_is_valid_and_in_the_mesh(version: str) -> None:
    objects = render(str(KIND))
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    ns = find(objects, "Namespace", "demo")
    assert in_ambient({}, ns["metadata"]["labels"])
    mesh_image = pod_spec(find(render("default"), "DaemonSet", "ztunnel"))["containers"][0]
    for name in ("echo", "client"):
        spec = pod_spec(find(objects, "Deployment", name))
        assert spec["containers"][0]["image"] == mesh_image["image"]
        assert spec["securityContext"]["runAsUser"] != 1337  # not the mesh's own user
    echo = pod_spec(find(objects, "Deployment", "echo"))["containers"][0]
    port = int(echo["command"][echo["command"].index("--port") + 1])
    assert echo["command"][:3] == ["meshlab", "app", "echo"]
    svc = find(objects, "Service", "echo")
    assert svc["spec"]["ports"][0]["targetPort"] == port == echo["ports"][0]["containerPort"]


def test_up_sh_waits_for_and_selects_what_the_manifests_hold() -> None:
    script = (KIND / "up.sh").read_text()
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(KIND / "up.sh")], check=False).returncode == 0
    objects = render("default")
    waited = re.findall(r"-n istio-system rollout status (deployment|daemonset)/([\w-]+)", script)
    kinds = {"deployment": "Deployment", "daemonset": "DaemonSet"}
    assert {(kinds[k], n) for k, n in waited} == {
        (o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in kinds.values()
    }
    assert re.search(r"-l app=ztunnel\b", script)
    ds = find(objects, "DaemonSet", "ztunnel")
    assert pod_spec(ds) and ds["spec"]["template"]["metadata"]["labels"]["app"] == "ztunnel"
    # The image it loads is the one the manifests name, as containerd spells it.
    image = pod_spec(ds)["containers"][0]["image"]
    assert "IMAGE=docker.io/library/ambient-mesh:$TAG" in script and image.startswith(
        "ambient-mesh:"
    )
