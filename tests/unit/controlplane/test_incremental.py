"""The incremental translator gives what the specification gives, on any history."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.incremental import IncrementalTranslator
from controlplane.state import (
    TRAFFIC_DISTRIBUTION_ANNOTATION,
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    frozen_labels,
)
from controlplane.translate import translate, workload_uid
from mesh.model import (
    Clause,
    Match,
    MatchKind,
    Rule,
    StringMatch,
)

NAMESPACES = ("ns0", "ns1", "istio-system")
# Small pools, so that selectors match, addresses clash and waypoints resolve.
# "own" is an address of the object's own; the rest are shared, or not addresses at all.
POD_IPS = ("own",) * 8 + (None, "", "10.0.9.9", "fd00::1", "bogus")
VIPS = ("own",) * 6 + ("10.96.9.9", "None", "nope")
LABEL_VALUES = {"app": ("a", "b"), "tier": ("x", "y"), "istio.io/dataplane-mode": ("none",)}
WAYPOINT_LABELS = {"istio.io/use-waypoint": ("wp", "gone", "none")}
# Known, unset, and values Istio ignores (or knows only in another case).
DISTRIBUTIONS = ("", "PreferClose", "PreferSameZone", "PreferSameNode", "preferclose", "Nearby")

labels_st = st.dictionaries(
    st.sampled_from(sorted(LABEL_VALUES)), st.sampled_from(("a", "b", "x", "y", "none")), max_size=3
).map(lambda d: {k: v for k, v in d.items() if v in LABEL_VALUES[k]})
waypoint_labels_st = st.dictionaries(
    st.sampled_from(sorted(WAYPOINT_LABELS)),
    st.sampled_from(WAYPOINT_LABELS["istio.io/use-waypoint"]),
)
selector_st = st.dictionaries(
    st.sampled_from(("app", "tier")), st.sampled_from(("a", "b", "x", "y")), max_size=2
)


@st.composite
def pods(draw: st.DrawFn) -> PodInfo:
    n = draw(st.integers(0, 5))
    namespace = draw(st.sampled_from(NAMESPACES[:2]))
    ip = draw(st.sampled_from(POD_IPS))
    return PodInfo(
        uid=f"p{n}",
        name=f"p{n}",
        namespace=namespace,
        node=draw(st.sampled_from(("n1", "n2"))),
        ip=f"10.0.{namespace[-1]}.{n + 1}" if ip == "own" else ip,
        service_account=draw(st.sampled_from(("default", "web"))),
        labels=frozen_labels({**draw(labels_st), **draw(waypoint_labels_st)}),
        ready=draw(st.booleans()),
    )


@st.composite
def services(draw: st.DrawFn) -> ServiceInfo:
    ports = draw(st.lists(st.sampled_from((80, 443, 53)), max_size=2, unique=True))
    n = draw(st.integers(0, 2))
    namespace = draw(st.sampled_from(NAMESPACES[:2]))
    vips = draw(st.lists(st.sampled_from(VIPS), max_size=2))
    return ServiceInfo(
        name=f"s{n}",
        namespace=namespace,
        cluster_ips=tuple(f"10.96.{namespace[-1]}.{n + 1}" if v == "own" else v for v in vips),
        ports=tuple(
            ServicePortInfo(port=p, target_port=p + 8000, protocol="UDP" if p == 53 else "TCP")
            for p in ports
        ),
        selector=frozen_labels(draw(selector_st)),
        labels=frozen_labels(draw(waypoint_labels_st)),
        traffic_distribution=draw(st.sampled_from(DISTRIBUTIONS)),
        internal_traffic_policy=draw(st.sampled_from(("", "Cluster", "Local"))),
        annotations=frozen_labels(
            {TRAFFIC_DISTRIBUTION_ANNOTATION: a}
            if (a := draw(st.sampled_from(DISTRIBUTIONS)))
            else {}
        ),
    )


@st.composite
def policies(draw: st.DrawFn) -> AuthorizationPolicyInfo:
    principal = draw(st.sampled_from(("cluster.local/ns/ns0/sa/web", "cluster.local/ns/x/sa/y")))
    rule = Rule(
        clauses=(Clause(matches=(Match(principals=(StringMatch(MatchKind.EXACT, principal),)),)),)
    )
    return AuthorizationPolicyInfo(
        name=draw(st.sampled_from(("pol0", "pol1", "pol2"))),
        namespace=draw(st.sampled_from(NAMESPACES)),
        action=draw(st.sampled_from(("ALLOW", "DENY"))),
        selector=draw(st.none() | selector_st.map(frozen_labels)),
        rules=draw(st.none() | st.just((rule,))),
    )


@st.composite
def endpoint_slices(draw: st.DrawFn) -> EndpointSliceInfo:
    """Slices listing pods' addresses, of this namespace or the other, or of nobody."""
    pool = [f"10.0.{ns}.{n}" for ns in (0, 1) for n in range(1, 7)] + ["10.0.9.9", "fd00::1"]
    return EndpointSliceInfo(
        service=draw(st.sampled_from(("s0", "s1", "s2"))),
        namespace=draw(st.sampled_from(NAMESPACES[:2])),
        addresses=tuple(draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))),
        name=draw(st.sampled_from(("e0", "e1"))),
    )


namespace_st = st.builds(
    lambda name, mode, wp: NamespaceInfo(name=name, labels=frozen_labels({**mode, **wp})),
    st.sampled_from(NAMESPACES),
    st.sampled_from(({}, {"istio.io/dataplane-mode": "ambient"})),
    waypoint_labels_st,
)
waypoint_st = st.builds(
    WaypointInfo,
    name=st.just("wp"),
    namespace=st.sampled_from(NAMESPACES[:2]),
    address=st.sampled_from((None, "10.1.0.1", "x")),
)

# One change to the world: set or remove one object, or a global fact.
# Objects change far more often than the global facts do, here as in a cluster.
change_st = st.one_of(
    *[st.tuples(st.just("pods"), pods())] * 4,
    *[st.tuples(st.just("services"), services())] * 3,
    *[st.tuples(st.just("policies"), policies())] * 3,
    *[st.tuples(st.just("endpoint_slices"), endpoint_slices())] * 3,
    st.tuples(st.just("-endpoint_slices"), st.integers(0, 10)),
    st.tuples(st.just("namespaces"), namespace_st),
    st.tuples(st.just("waypoints"), waypoint_st),
    *[st.tuples(st.just("-pods"), st.integers(0, 10))] * 2,
    *[st.tuples(st.just("-services"), st.integers(0, 10))] * 2,
    *[st.tuples(st.just("-policies"), st.integers(0, 10))] * 2,
    st.tuples(st.just("-waypoints"), st.integers(0, 10)),
    st.tuples(st.just("dup"), pods()),  # a second pod under a name already taken
    st.tuples(
        st.just("copy"), st.sampled_from(("pods", "services", "policies", "endpoint_slices"))
    ),
    st.tuples(st.just("rejected"), st.sampled_from(((), ("source refused x",)))),
    st.tuples(st.just("root"), st.sampled_from(("istio-system", "ns1"))),
)


def _key(obj: Any) -> tuple[str, str]:
    return (getattr(obj, "namespace", ""), obj.name)


def _with(state: SourceState, field: str, items: tuple[Any, ...]) -> SourceState:
    fields: dict[str, Any] = {field: items}
    return replace(state, **fields)


def apply(state: SourceState, change: tuple[str, Any]) -> SourceState:
    """``change`` applied the way a source would: unchanged objects stay the same objects."""
    kind, value = change
    if kind == "rejected":
        return replace(state, rejected=value)
    if kind == "root":
        return replace(state, root_namespace=value)
    if kind == "dup":
        return replace(state, pods=(*state.pods, value))
    if kind == "copy":  # equal objects, new identities (a relist)
        return _with(state, value, tuple(replace(o) for o in getattr(state, value)))
    if kind.startswith("-"):
        items = getattr(state, kind[1:])
        if not items:
            return state
        i = value % len(items)
        return _with(state, kind[1:], items[:i] + items[i + 1 :])
    items = list(getattr(state, kind))
    for i, old in enumerate(items):
        if _key(old) == _key(value):
            items[i] = value
            break
    else:
        items.append(value)
    return _with(state, kind, tuple(items))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.lists(change_st, min_size=1, max_size=3), min_size=15, max_size=50))
def test_incremental_equals_the_specification_on_any_history(
    steps: list[list[tuple[str, Any]]],
) -> None:
    """Each step is what a source publishes at once: one change, or a few together."""
    translator = IncrementalTranslator()
    state = SourceState()
    assert translator.translate(state) == translate(state)
    for changes in steps:
        for change in changes:
            state = apply(state, change)
        assert translator.translate(state) == translate(state), changes


def _world(n: int) -> SourceState:
    return SourceState(
        namespaces=(
            NamespaceInfo(name="ns0", labels=frozen_labels({"istio.io/dataplane-mode": "ambient"})),
        ),
        pods=tuple(
            PodInfo(
                uid=f"p{i}",
                name=f"p{i}",
                namespace="ns0",
                node="n1",
                ip=f"10.0.{i // 250}.{i % 250 + 1}",
                labels=frozen_labels({"app": f"app{i % 10}"}),
            )
            for i in range(n)
        ),
        services=tuple(
            ServiceInfo(
                name=f"s{j}",
                namespace="ns0",
                cluster_ips=(f"10.96.0.{j + 1}",),
                ports=(ServicePortInfo(port=80, target_port=8080),),
                selector=frozen_labels({"app": f"app{j}"}),
            )
            for j in range(10)
        ),
    )


def test_one_pod_changing_redoes_that_pod_alone() -> None:
    """Workloads a change does not touch come back as the same objects (the feed's fast path)."""
    translator = IncrementalTranslator()
    state = _world(500)
    first = translator.translate(state)
    moved = replace(state.pods[7], labels=frozen_labels({"app": "app3"}))
    second = translator.translate(replace(state, pods=(*state.pods[:7], moved, *state.pods[8:])))
    assert (translator.full_passes, translator.partial_passes) == (1, 1)
    uid = workload_uid("Kubernetes", "ns0", "p7")
    assert list(second.workloads[uid].services) == ["ns0/s3.ns0.svc.cluster.local"]
    same = [u for u in first.workloads if first.workloads[u] is second.workloads[u]]
    assert len(same) == 499 and uid not in same


def test_a_service_change_redoes_the_pods_it_selected_and_selects() -> None:
    translator = IncrementalTranslator()
    state = _world(100)
    first = translator.translate(state)
    retargeted = replace(state.services[2], selector=frozen_labels({"app": "app5"}))
    state2 = replace(state, services=(*state.services[:2], retargeted, *state.services[3:]))
    second = translator.translate(state2)
    assert second == translate(state2)
    assert translator.partial_passes == 1
    changed = {u for u in first.workloads if first.workloads[u] is not second.workloads[u]}
    # app2 pods lost s2, app5 pods gained it: 10 each of 100; nobody else was redone.
    assert len(changed) == 20


def test_an_address_clash_is_settled_by_state_order_as_the_specification_says() -> None:
    translator = IncrementalTranslator()
    state = _world(20)
    twin = replace(state.pods[0], name="twin", uid="twin")
    state2 = replace(state, pods=(*state.pods, twin))
    translator.translate(state)
    result = translator.translate(state2)
    assert result == translate(state2)
    assert any("IP 10.0.0.1 already used by pod ns0/p0" in line for line in result.rejected)
    # The first owner leaves: the twin takes the address.
    state3 = replace(state2, pods=state2.pods[1:])
    assert translator.translate(state3) == translate(state3)
    assert workload_uid("Kubernetes", "ns0", "twin") in translator.translate(state3).workloads


def test_a_clash_loser_stays_out_when_a_service_or_policy_starts_selecting_it() -> None:
    translator = IncrementalTranslator()
    state = _world(20)
    twin = replace(state.pods[0], name="twin", uid="twin", labels=frozen_labels({"app": "twin"}))
    state = replace(state, pods=(*state.pods, twin))
    translator.translate(state)
    twin_svc = replace(state.services[0], selector=frozen_labels({"app": "twin"}))
    state2 = replace(state, services=(twin_svc, *state.services[1:]))
    assert translator.translate(state2) == translate(state2)
    assert workload_uid("Kubernetes", "ns0", "twin") not in translator.translate(state2).workloads


def test_two_new_pods_with_one_address_in_one_update_clash() -> None:
    translator = IncrementalTranslator()
    state = _world(20)
    translator.translate(state)
    first = replace(state.pods[0], name="new1", uid="new1", ip="10.0.9.9")
    second = replace(first, name="new2", uid="new2")
    state2 = replace(state, pods=(*state.pods, first, second))
    result = translator.translate(state2)
    assert result == translate(state2)
    assert "pod ns0/new2: IP 10.0.9.9 already used by pod ns0/new1" in result.rejected


def test_two_new_services_with_one_vip_in_one_update_clash() -> None:
    translator = IncrementalTranslator()
    state = _world(20)
    translator.translate(state)
    first = replace(state.services[0], name="new1", cluster_ips=("10.96.9.9",))
    second = replace(first, name="new2")
    state2 = replace(state, services=(*state.services, first, second))
    result = translator.translate(state2)
    assert result == translate(state2)
    assert "service ns0/new2: VIP already used by ns0/new1" in result.rejected


def test_a_service_without_selector_has_the_pods_its_endpoint_slices_list() -> None:
    translator = IncrementalTranslator()
    world = _world(20)
    external = ServiceInfo(
        name="ext",
        namespace="ns0",
        cluster_ips=("10.96.1.1",),
        ports=(ServicePortInfo(port=5432, target_port=5432),),
    )
    first_slice = EndpointSliceInfo(
        service="ext", namespace="ns0", addresses=("10.0.0.2", "10.0.0.3"), name="ext-a"
    )
    state = replace(world, services=(*world.services, external), endpoint_slices=(first_slice,))
    translator.translate(state)
    ext = "ns0/ext.ns0.svc.cluster.local"

    def backed(result: Any) -> set[str]:
        return {w.name for w in result.workloads.values() if ext in w.services}

    assert backed(translate(state)) == {"p1", "p2"}
    # The slice moves on (a pod replaced behind the service): p1 and p2 lose it, p3 gains it.
    moved = replace(first_slice, addresses=("10.0.0.4",))
    state2 = replace(state, endpoint_slices=(moved,))
    result = translator.translate(state2)
    assert result == translate(state2) and backed(result) == {"p3"}
    assert translator.partial_passes == 1
    # A second slice of the same service adds to the first.
    second = EndpointSliceInfo(service="ext", namespace="ns0", addresses=("10.0.0.5",), name="b")
    state3 = replace(state2, endpoint_slices=(moved, second))
    assert backed(translator.translate(state3)) == {"p3", "p4"} == backed(translate(state3))
