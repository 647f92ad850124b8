"""``python -m mesh.xds``: the feed as an operator reads it."""

from __future__ import annotations

from controlplane.authz_yaml import parse_authorization_policy
from controlplane.state import (
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    frozen_labels,
)
from controlplane.translate import translate
from mesh.xds import XdsState
from mesh.xds.__main__ import main, render


def test_render_shows_protocol_services_and_policies_per_workload() -> None:
    resources = translate(
        SourceState(
            namespaces=(
                NamespaceInfo(
                    name="shop", labels=frozen_labels({"istio.io/dataplane-mode": "ambient"})
                ),
            ),
            pods=(
                PodInfo(
                    uid="1",
                    name="web-1",
                    namespace="shop",
                    node="node2",
                    ip="10.244.1.7",
                    labels=frozen_labels({"app": "web"}),
                ),
            ),
            services=(
                ServiceInfo(
                    name="web",
                    namespace="shop",
                    cluster_ips=("10.96.0.7",),
                    ports=(ServicePortInfo(port=80, target_port=8080),),
                    selector=frozen_labels({"app": "web"}),
                ),
            ),
            policies=(
                parse_authorization_policy(
                    {
                        "metadata": {"name": "lockdown", "namespace": "shop"},
                        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY"},
                    }
                ),
            ),
        )
    )
    text = render(
        XdsState(
            workloads=resources.workloads,
            services=resources.services,
            policies=resources.policies,
        )
    )
    rows = text.splitlines()
    workload = next(r for r in rows if r.startswith("shop/web-1"))
    assert workload.split()[1:4] == ["10.244.1.7", "node2", "HBONE"]
    assert workload.endswith("web, policy:shop/lockdown")
    assert any(r.split()[:3] == ["shop/web", "10.96.0.7", "80->8080"] for r in rows)
    assert any(r.split()[:3] == ["shop/lockdown", "WORKLOAD_SELECTOR", "DENY"] for r in rows)


def test_tls_needs_the_mesh_root() -> None:
    assert main(["--target", "127.0.0.1:1"]) == 2
