"""Translation from the source's world to the feed: Istio's ambient rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.authz_yaml import InvalidPolicy, parse_authorization_policy
from controlplane.incremental import IncrementalTranslator
from controlplane.state import (
    AuthorizationPolicyInfo,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    frozen_labels,
)
from controlplane.translate import Resources, translate, workload_uid
from mesh.model import (
    Action,
    LoadBalancingMode,
    LoadBalancingScope,
    MatchKind,
    Scope,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from mesh.proto.istio.workload import workload_pb2 as pb

NETWORK, REGION, ZONE, SUBZONE, NODE = (
    LoadBalancingScope.NETWORK,
    LoadBalancingScope.REGION,
    LoadBalancingScope.ZONE,
    LoadBalancingScope.SUBZONE,
    LoadBalancingScope.NODE,
)
SAME_ZONE = ((NETWORK, REGION, ZONE), LoadBalancingMode.FAILOVER)
SAME_NODE = ((NETWORK, REGION, ZONE, SUBZONE, NODE), LoadBalancingMode.FAILOVER)
NODE_ONLY = ((NODE,), LoadBalancingMode.STRICT)
ANNOTATION = "networking.istio.io/traffic-distribution"


def ns(name: str, **labels: str) -> NamespaceInfo:
    return NamespaceInfo(name=name, labels=frozen_labels(labels))


def pod(
    name: str,
    ip: str | None,
    namespace: str = "apps",
    node: str = "n1",
    sa: str = "default",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    **more: str,
) -> PodInfo:
    return PodInfo(
        uid=name,
        name=name,
        namespace=namespace,
        node=node,
        ip=ip,
        service_account=sa,
        labels=frozen_labels({**(labels or {}), **more}),
        ready=ready,
    )


def svc(
    name: str,
    vip: str,
    namespace: str = "apps",
    selector: dict[str, str] | None = None,
    **labels: str,
) -> ServiceInfo:
    return ServiceInfo(
        name=name,
        namespace=namespace,
        cluster_ips=(vip,),
        ports=(
            ServicePortInfo(port=80, target_port=8080),
            ServicePortInfo(port=53, target_port=53, protocol="UDP"),
        ),
        selector=frozen_labels(selector or {}),
        labels=frozen_labels(labels),
    )


def labelled_svc(name: str, vip: str, labels: dict[str, str]) -> ServiceInfo:
    return replace(svc(name, vip), labels=frozen_labels(labels))


def by_name(resources: Resources) -> dict[str, Workload]:
    return {w.name: w for w in resources.workloads.values()}


def test_ambient_namespaces_get_hbone_and_pods_can_opt_out() -> None:
    state = SourceState(
        namespaces=(ns("apps", **{"istio.io/dataplane-mode": "ambient"}), ns("legacy")),
        pods=(
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2", labels={"istio.io/dataplane-mode": "none"}),
            pod("c", "10.0.0.3", namespace="legacy"),
            pod("d", "10.0.0.4", namespace="legacy", labels={"istio.io/dataplane-mode": "ambient"}),
            pod("pending", None),
        ),
    )
    w = by_name(translate(state))
    assert sorted(w) == ["a", "b", "c", "d"], "a pod without an IP is not a workload yet"
    assert w["a"].tunnel_protocol is TunnelProtocol.HBONE
    assert w["b"].tunnel_protocol is TunnelProtocol.NONE
    assert w["c"].tunnel_protocol is TunnelProtocol.NONE
    assert w["d"].tunnel_protocol is TunnelProtocol.HBONE


def test_workload_identity_uid_and_health() -> None:
    state = SourceState(
        namespaces=(ns("apps"),),
        pods=(pod("a", "10.0.0.1", sa="web", ready=False, app="shop", version="v2"),),
        trust_domain="example.org",
        cluster_id="c1",
    )
    (w,) = translate(state).workloads.values()
    assert w.uid == workload_uid("c1", "apps", "a") == "c1//Pod/apps/a"
    assert str(w.identity) == "spiffe://example.org/ns/apps/sa/web"
    assert w.status is WorkloadStatus.UNHEALTHY
    assert (w.canonical_name, w.canonical_revision) == ("shop", "v2")
    assert w.node == "n1"


def test_services_map_to_their_endpoints_tcp_ports_only() -> None:
    state = SourceState(
        namespaces=(ns("apps"), ns("other")),
        pods=(
            pod("a", "10.0.0.1", app="web"),
            pod("b", "10.0.0.2", app="db"),
            pod("c", "10.0.0.3", namespace="other", app="web"),
        ),
        services=(svc("web", "10.96.0.1", selector={"app": "web"}),),
    )
    r = translate(state)
    (service,) = r.services.values()
    assert service.resource_name == "apps/web.apps.svc.cluster.local"
    assert [(p.service_port, p.target_port) for p in service.ports] == [(80, 8080)]
    w = by_name(r)
    assert w["a"].services == {service.resource_name: service.ports}
    assert w["b"].services == {}
    assert w["c"].services == {}, "selectors never cross namespaces"


@pytest.mark.parametrize(
    ("distribution", "policy", "annotation", "expected"),
    [
        ("", "", "", None),
        ("", "Cluster", "", None),
        ("PreferClose", "", "", SAME_ZONE),
        ("PreferSameZone", "Cluster", "", SAME_ZONE),
        ("PreferSameNode", "", "", SAME_NODE),
        # The annotation, in any case, where the field is unset...
        ("", "", "PreferClose", SAME_ZONE),
        ("", "", "prefersamenode", SAME_NODE),
        # ...the field wins over it, unless Istio does not know the field's value.
        ("PreferSameNode", "", "PreferClose", SAME_NODE),
        ("Nearby", "", "PreferClose", SAME_ZONE),
        # internalTrafficPolicy Local wins over any distribution.
        ("", "Local", "", NODE_ONLY),
        ("PreferClose", "Local", "PreferSameNode", NODE_ONLY),
        # Values Istio does not know are no preference, as in istiod.
        ("Nearby", "", "", None),
        ("", "", "Anywhere", None),
        ("preferclose", "", "", None),  # the field is exact (the API server checks it)
    ],
)
def test_traffic_preferences_become_the_services_load_balancing(
    distribution: str,
    policy: str,
    annotation: str,
    expected: tuple[tuple[LoadBalancingScope, ...], LoadBalancingMode] | None,
) -> None:
    info = replace(
        svc("web", "10.96.0.1", selector={"app": "web"}),
        traffic_distribution=distribution,
        internal_traffic_policy=policy,
        annotations=frozen_labels({ANNOTATION: annotation} if annotation else {}),
    )
    r = translate(SourceState(namespaces=(ns("apps"),), services=(info,)))
    (service,) = r.services.values()
    lb = service.load_balancing
    assert (None if lb is None else (lb.routing_preference, lb.mode)) == expected
    assert r.rejected == (), "an unknown preference is ignored, not a refusal"


def test_load_balancing_goes_on_the_wire_as_istiod_sends_it() -> None:
    local = replace(svc("node-agent", "10.96.0.9"), internal_traffic_policy="Local")
    close = replace(svc("web", "10.96.0.1"), traffic_distribution="PreferClose")
    r = translate(SourceState(namespaces=(ns("apps"),), services=(local, close)))
    wire = {s.name: s.to_proto().service.load_balancing for s in r.services.values()}
    assert list(wire["node-agent"].routing_preference) == [pb.LoadBalancing.NODE]
    assert wire["node-agent"].mode == pb.LoadBalancing.STRICT
    assert list(wire["web"].routing_preference) == [
        pb.LoadBalancing.NETWORK,
        pb.LoadBalancing.REGION,
        pb.LoadBalancing.ZONE,
    ]
    assert wire["web"].mode == pb.LoadBalancing.FAILOVER
    assert wire["web"].health_policy == pb.LoadBalancing.ONLY_HEALTHY
    plain = translate(SourceState(namespaces=(ns("apps"),), services=(svc("x", "10.96.0.2"),)))
    (service,) = plain.services.values()
    assert not service.to_proto().service.HasField("load_balancing")


def test_use_waypoint_precedence_pod_then_service_then_namespace() -> None:
    state = SourceState(
        namespaces=(ns("apps", **{"istio.io/use-waypoint": "ns-wp"}),),
        pods=(
            pod("a", "10.0.0.1", app="web"),
            pod("b", "10.0.0.2", app="web", labels={"istio.io/use-waypoint": "pod-wp"}),
            pod("c", "10.0.0.3", labels={"istio.io/use-waypoint": "none"}),
        ),
        services=(
            svc("web", "10.96.0.1", selector={"app": "web"}, **{"istio.io/use-waypoint": "svc-wp"}),
        ),
        waypoints=(
            WaypointInfo(name="ns-wp", namespace="apps", address="10.0.9.1", waypoint_for="all"),
            WaypointInfo(
                name="pod-wp", namespace="apps", address="10.0.9.2", waypoint_for="workload"
            ),
            WaypointInfo(name="svc-wp", namespace="apps", address="10.0.9.3"),
        ),
    )
    r = translate(state)
    w = by_name(r)
    waypoints = {n: str(wl.waypoint.address) if wl.waypoint else None for n, wl in w.items()}
    assert waypoints == {"a": "10.0.9.1", "b": "10.0.9.2", "c": None}
    assert w["c"].waypoint is None
    (service,) = r.services.values()
    assert service.waypoint is not None and str(service.waypoint.address) == "10.0.9.3"
    assert service.waypoint.port == 15008
    assert r.rejected == ()


def test_a_namespace_bound_to_a_service_waypoint_leaves_its_pods_alone() -> None:
    """Istio's rule: a waypoint for services (the default) binds the namespace's
    services only; its pods are reached through them."""
    state = SourceState(
        namespaces=(ns("apps", **{"istio.io/use-waypoint": "wp"}),),
        pods=(pod("a", "10.0.0.1", app="web"),),
        services=(svc("web", "10.96.0.1", selector={"app": "web"}),),
        waypoints=(WaypointInfo(name="wp", namespace="apps", address="10.0.9.1"),),
    )
    r = translate(state)
    assert by_name(r)["a"].waypoint is None
    (service,) = r.services.values()
    assert service.waypoint is not None and str(service.waypoint.address) == "10.0.9.1"


def test_a_pod_asking_for_a_service_waypoint_fails_closed() -> None:
    state = SourceState(
        namespaces=(ns("apps"),),
        pods=(pod("a", "10.0.0.1", labels={"istio.io/use-waypoint": "wp"}),),
        waypoints=(WaypointInfo(name="wp", namespace="apps", address="10.0.9.1"),),
    )
    r = translate(state)
    gateway = by_name(r)["a"].waypoint
    assert gateway is not None and gateway.address is None
    assert gateway.hostname == "apps/wp.apps.svc.cluster.local"
    assert any("is for service traffic" in line for line in r.rejected)


def test_a_missing_waypoint_fails_closed_and_is_reported() -> None:
    """Istio would send the traffic straight to the pod, past the waypoint's L7 policy:
    the waypoint is named by hostname alone, which ztunnel cannot reach, so it refuses."""
    state = SourceState(
        namespaces=(ns("apps"),),
        pods=(pod("a", "10.0.0.1", labels={"istio.io/use-waypoint": "ghost"}),),
        services=(labelled_svc("web", "10.96.0.1", {"istio.io/use-waypoint": "ghost"}),),
    )
    r = translate(state)
    workload = next(iter(r.workloads.values()))
    assert workload.waypoint is not None and workload.waypoint.address is None
    (service,) = r.services.values()
    assert service.waypoint is not None and service.waypoint.address is None
    assert service.waypoint.hostname == "apps/ghost.apps.svc.cluster.local"
    assert sum("waypoint apps/ghost does not exist" in line for line in r.rejected) == 2


def test_a_waypoint_without_an_address_or_accepting_listener_fails_closed() -> None:
    broken = WaypointInfo(name="wp", namespace="apps", address="10.0.9.1", problem="no listener")
    pending = WaypointInfo(name="wp2", namespace="apps", address=None)
    state = SourceState(
        namespaces=(ns("apps"),),
        services=(
            labelled_svc("a", "10.96.0.1", {"istio.io/use-waypoint": "wp"}),
            labelled_svc("b", "10.96.0.2", {"istio.io/use-waypoint": "wp2"}),
        ),
        waypoints=(broken, pending),
    )
    r = translate(state)
    assert all(s.waypoint is not None and s.waypoint.address is None for s in r.services.values())
    assert any("not accepted: no listener" in line for line in r.rejected)
    assert any("has no address yet" in line for line in r.rejected)


def test_a_waypoint_of_another_namespace_must_allow_it() -> None:
    from controlplane.state import WaypointListener

    shared = WaypointInfo(
        name="shared",
        namespace="infra",
        address="10.0.9.1",
        listeners=(
            WaypointListener(name="mesh", port=15008, protocol="HBONE", allowed_from="All"),
        ),
    )
    own = WaypointInfo(name="own", namespace="infra", address="10.0.9.2")
    use = {"istio.io/use-waypoint-namespace": "infra"}
    state = SourceState(
        namespaces=(ns("apps"), ns("infra")),
        services=(
            labelled_svc("a", "10.96.0.1", {"istio.io/use-waypoint": "shared", **use}),
            labelled_svc("b", "10.96.0.2", {"istio.io/use-waypoint": "own", **use}),
        ),
        waypoints=(shared, own),
    )
    r = translate(state)
    by = {s.name: s.waypoint for s in r.services.values()}
    assert by["a"] is not None and str(by["a"].address) == "10.0.9.1"
    assert by["b"] is not None and by["b"].address is None
    assert any("does not allow namespace apps" in line for line in r.rejected)


WAYPOINT_INSTANCE = {
    "gateway.istio.io/managed": "istio.io-mesh-controller",
    "gateway.networking.k8s.io/gateway-name": "waypoint",
}


@pytest.mark.parametrize("translator", ["specification", "incremental"])
def test_a_waypoint_instance_is_never_bound_to_a_waypoint(translator: str) -> None:
    """The namespace's label binds everything in it but the waypoint's own pod and
    Service (Istio's rule): else traffic to the waypoint would go through itself."""
    state = SourceState(
        namespaces=(ns("apps", **{"istio.io/use-waypoint": "waypoint"}),),
        pods=(
            pod("waypoint-7f9c", "10.0.9.5", sa="waypoint", labels=WAYPOINT_INSTANCE),
            pod("web-1", "10.0.0.1", app="web"),
        ),
        services=(
            labelled_svc("waypoint", "10.96.0.9", WAYPOINT_INSTANCE),
            svc("web", "10.96.0.1", selector={"app": "web"}),
        ),
        waypoints=(
            WaypointInfo(
                name="waypoint", namespace="apps", address="10.96.0.9", waypoint_for="all"
            ),
        ),
    )
    r = (
        translate(state)
        if translator == "specification"
        else IncrementalTranslator().translate(state)
    )
    assert r.rejected == ()
    workloads = {n: w.to_proto().workload for n, w in by_name(r).items()}
    services = {s.name: s.to_proto().service for s in r.services.values()}
    assert not workloads["waypoint-7f9c"].HasField("waypoint")
    assert not services["waypoint"].HasField("waypoint")
    for bound in (workloads["web-1"], services["web"]):
        assert bound.waypoint.address.address == bytes([10, 96, 0, 9])
        assert bound.waypoint.hbone_mtls_port == 15008


def test_bad_objects_are_rejected_alone() -> None:
    state = SourceState(
        namespaces=(ns("apps"),),
        pods=(
            pod("a", "10.0.0.1"),
            pod("twin", "10.0.0.1"),
            pod("junk", "10.0.0.300"),
            pod("ok", "10.0.0.2"),
        ),
        services=(svc("s1", "10.96.0.1"), svc("s2", "10.96.0.1"), svc("s3", "not-an-ip")),
    )
    r = translate(state)
    assert sorted(by_name(r)) == ["a", "ok"]
    assert [s.name for s in r.services.values()] == ["s1"]
    assert len(r.rejected) == 4
    assert any("10.0.0.1 already used by pod apps/a" in line for line in r.rejected)


def policy(name: str, namespace: str = "apps", **spec: object) -> AuthorizationPolicyInfo:
    return parse_authorization_policy(
        {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


def test_policy_scopes_and_selection() -> None:
    state = SourceState(
        namespaces=(ns("apps"), ns("istio-system")),
        pods=(pod("a", "10.0.0.1", app="web"), pod("b", "10.0.0.2", app="db")),
        policies=(
            policy(
                "only-web",
                selector={"matchLabels": {"app": "web"}},
                action="DENY",
                rules=[{}],
            ),
            policy("whole-ns", rules=[{"from": [{"source": {"namespaces": ["apps"]}}]}]),
            policy("mesh", namespace="istio-system", action="DENY"),
        ),
    )
    r = translate(state)
    scopes = {p.name: p.scope for p in r.policies.values()}
    assert scopes == {
        "only-web": Scope.WORKLOAD_SELECTOR,
        "whole-ns": Scope.NAMESPACE,
        "mesh": Scope.GLOBAL,
    }
    w = by_name(r)
    assert w["a"].authorization_policies == ("apps/only-web",)
    assert w["b"].authorization_policies == ()
    assert r.policies["apps/only-web"].action is Action.DENY


def test_authorization_policy_yaml_to_l4_rules() -> None:
    info = parse_authorization_policy(
        {
            "metadata": {"name": "p", "namespace": "apps"},
            "spec": {
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/a/sa/x", "*/sa/y"],
                                    "notNamespaces": ["kube-*"],
                                }
                            },
                            {"source": {"ipBlocks": ["10.0.0.0/8"]}},
                        ],
                        "to": [{"operation": {"ports": ["80", 443]}}],
                    },
                ],
            },
        }
    )
    assert info.action == "ALLOW" and info.selector is None
    assert info.rules is not None
    (rule,) = info.rules
    sources, ports = rule.clauses
    first, second = sources.matches
    assert [(m.kind, m.value) for m in first.principals] == [
        (MatchKind.EXACT, "cluster.local/ns/a/sa/x"),
        (MatchKind.SUFFIX, "/sa/y"),
    ]
    assert [(m.kind, m.value) for m in first.not_namespaces] == [(MatchKind.PREFIX, "kube-")]
    assert [str(n) for n in second.source_ips] == ["10.0.0.0/8"]
    assert ports.matches[0].destination_ports == (80, 443)
    empty = parse_authorization_policy({"metadata": {"name": "e"}, "spec": {}})
    assert empty.rules is None and empty.namespace == "default"


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"action": "AUDIT"}, "spec.action"),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        ({"selector": {"matchExpressions": []}}, "spec.selector"),
        ({"rulez": []}, "spec.rulez"),
        (
            {"rules": [{"when": [{"key": "request.colour", "values": ["1"]}]}]},
            "spec.rules[0].when[0].key",
        ),
        ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0]"),
        (
            {"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]},
            "spec.rules[0].when[0].values[0]",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": ["a"], "serviceAccounts": ["b"]}}]}]},
            "spec.rules[0].from[0].source.serviceAccounts",
        ),
        (
            {"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]},
            "spec.rules[0].from[0].source.serviceAccounts[0]",
        ),
        (
            {"rules": [{"to": [{"operation": {"methods": "GET"}}]}]},
            "spec.rules[0].to[0].operation.methods",
        ),
    ],
)
def test_malformed_policies_are_refused_naming_the_field(
    spec: dict[str, object], path: str
) -> None:
    with pytest.raises(InvalidPolicy) as info:
        parse_authorization_policy({"metadata": {"name": "p", "namespace": "apps"}, "spec": spec})
    assert info.value.path == path
    assert "apps/p" in str(info.value)


def test_translation_is_deterministic_and_pure() -> None:
    state = SourceState(
        namespaces=(ns("apps"),),
        pods=(pod("a", "10.0.0.1", app="x"),),
        services=(svc("s", "10.96.0.9", selector={"app": "x"}),),
    )
    assert translate(state) == translate(replace(state))
