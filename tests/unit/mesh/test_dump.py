"""The model as Istio ztunnel's ``/config_dump`` JSON: its shape, round trips, and errors."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import (
    Action,
    Clause,
    GatewayAddress,
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Match,
    MatchKind,
    Policy,
    Port,
    Rule,
    Scope,
    Service,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from mesh.model.dump import (
    DumpError,
    dump_policy,
    dump_service,
    dump_state,
    dump_workload,
    load_policy,
    load_service,
    load_state,
    load_workload,
)
from mesh.xds import TYPE_URLS, XdsState

# --- strategies --------------------------------------------------------------

names = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
text = st.text(alphabet="abcXYZ019-_./", max_size=12)
ipv4 = st.ip_addresses(v=4)
ips = st.one_of(ipv4, st.ip_addresses(v=6))
port_numbers = st.integers(1, 65535)


@st.composite
def port_lists(draw: st.DrawFn) -> tuple[Port, ...]:
    # A service port is a map key in ztunnel's shape: unique within a list.
    keys = draw(st.lists(port_numbers, unique=True, max_size=3))
    return tuple(Port(service_port=k, target_port=draw(st.integers(0, 65535))) for k in keys)


gateways = st.one_of(
    st.builds(GatewayAddress, address=ips, port=st.integers(0, 65535)),
    st.builds(
        GatewayAddress,
        hostname=st.builds(lambda n, h: f"{n}/{h}.{n}.svc.cluster.local", names, names),
        port=st.integers(0, 65535),
    ),
)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    namespace = draw(names)
    services = draw(
        st.dictionaries(
            st.builds(lambda n, h: f"{n}/{h}.svc", names, names), port_lists(), max_size=3
        )
    )
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{draw(names)}",
        name=draw(names),
        namespace=namespace,
        addresses=tuple(draw(st.lists(ips, max_size=2))),
        node=draw(st.one_of(st.just(""), names)),
        service_account=draw(names),
        trust_domain=draw(st.sampled_from(["cluster.local", "example.org"])),
        tunnel_protocol=draw(st.sampled_from(TunnelProtocol)),
        waypoint=draw(st.none() | gateways),
        services=MappingProxyType(services),
        authorization_policies=tuple(draw(st.lists(text, max_size=2))),
        status=draw(st.sampled_from(WorkloadStatus)),
        canonical_name=draw(text),
        canonical_revision=draw(text),
        workload_name=draw(text),
        cluster_id=draw(text),
        network=draw(st.sampled_from(["", "network1"])),
        locality=draw(st.builds(Locality, region=text, zone=text, subzone=text)),
    )


load_balancings = st.builds(
    LoadBalancing,
    routing_preference=st.lists(st.sampled_from(LoadBalancingScope), max_size=3).map(tuple),
    mode=st.sampled_from(LoadBalancingMode),
    health_policy=st.sampled_from(HealthPolicy),
)


@st.composite
def services(draw: st.DrawFn) -> Service:
    namespace = draw(names)
    return Service(
        name=draw(names),
        namespace=namespace,
        hostname=f"{draw(names)}.{namespace}.svc.cluster.local",
        addresses=tuple(draw(st.lists(ips, max_size=2))),
        ports=draw(port_lists()),
        waypoint=draw(st.none() | gateways),
        subject_alt_names=tuple(draw(st.lists(text, max_size=2))),
        network=draw(st.sampled_from(["", "network1"])),
        load_balancing=draw(st.none() | load_balancings),
    )


string_matches = st.one_of(
    st.builds(
        StringMatch, st.sampled_from([MatchKind.EXACT, MatchKind.PREFIX, MatchKind.SUFFIX]), text
    ),
    st.just(StringMatch(MatchKind.PRESENCE)),
)
networks = st.builds(
    lambda ip, n: ipaddress.ip_network(f"{ip}/{n}", strict=False), ipv4, st.integers(0, 32)
)


def _tuples(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(strategy, max_size=2).map(tuple)


matches = st.builds(
    Match,
    namespaces=_tuples(string_matches),
    not_namespaces=_tuples(string_matches),
    principals=_tuples(string_matches),
    not_principals=_tuples(string_matches),
    source_ips=_tuples(networks),
    not_source_ips=_tuples(networks),
    destination_ips=_tuples(networks),
    not_destination_ips=_tuples(networks),
    destination_ports=_tuples(port_numbers),
    not_destination_ports=_tuples(port_numbers),
)
policies = st.builds(
    Policy,
    name=names,
    namespace=names,
    scope=st.sampled_from(Scope),
    action=st.sampled_from(Action),
    rules=_tuples(st.builds(Rule, _tuples(st.builds(Clause, _tuples(matches))))),
)


def through_json(doc: dict[str, Any]) -> Any:
    """What a reader gets back: the document as bytes on the wire, parsed."""
    return json.loads(json.dumps(doc))


# --- round trips -------------------------------------------------------------


@given(workloads())
def test_a_workload_survives_the_dump(w: Workload) -> None:
    assert load_workload(through_json(dump_workload(w))) == w


@given(services())
def test_a_service_survives_the_dump(s: Service) -> None:
    assert load_service(through_json(dump_service(s))) == s


@given(policies)
def test_a_policy_survives_the_dump(p: Policy) -> None:
    assert load_policy(through_json(dump_policy(p))) == p


@settings(max_examples=30)
@given(st.lists(workloads(), max_size=4), st.lists(services(), max_size=3), st.booleans())
def test_a_snapshot_survives_the_dump(ws: list[Workload], ss: list[Service], synced: bool) -> None:
    state = XdsState(
        workloads=MappingProxyType({w.uid: w for w in ws}),
        services=MappingProxyType({s.resource_name: s for s in ss}),
        synced_types=frozenset(TYPE_URLS) if synced else frozenset(),
    )
    doc = through_json(dump_state(state)) | {"config": {"synced": synced}}
    assert load_state(doc) == state


# --- the shape ztunnel emits -------------------------------------------------

ECHO = Workload(
    uid="Kubernetes//Pod/shop/echo-1",
    name="echo-1",
    namespace="shop",
    addresses=(ipaddress.ip_address("10.244.1.2"),),
    node="node2",
    service_account="echo",
    tunnel_protocol=TunnelProtocol.HBONE,
    waypoint=GatewayAddress(address=ipaddress.ip_address("10.96.0.9")),
    services=MappingProxyType(
        {"shop/echo.shop.svc.cluster.local": (Port(service_port=80, target_port=8080),)}
    ),
    authorization_policies=("shop/allow-sleep",),
)
ECHO_SERVICE = Service(
    name="echo",
    namespace="shop",
    hostname="echo.shop.svc.cluster.local",
    addresses=(ipaddress.ip_address("10.96.0.20"),),
    ports=(Port(service_port=80, target_port=8080),),
)


def test_a_workload_is_shown_as_ztunnel_shows_it() -> None:
    assert dump_workload(ECHO) == {
        "workloadIps": ["10.244.1.2"],
        "waypoint": {"destination": "/10.96.0.9", "hboneMtlsPort": 15008},
        "protocol": "HBONE",
        "networkMode": "Standard",
        "uid": "Kubernetes//Pod/shop/echo-1",
        "name": "echo-1",
        "namespace": "shop",
        "trustDomain": "cluster.local",
        "serviceAccount": "echo",
        "workloadType": "pod",
        "node": "node2",
        "authorizationPolicies": ["shop/allow-sleep"],
        "status": "Healthy",
        "clusterId": "",
        "services": ["shop/echo.shop.svc.cluster.local"],
        "servicePorts": {"shop/echo.shop.svc.cluster.local": {"80": 8080}},
        "capacity": 1,
    }


def test_a_service_lists_its_endpoints_by_uid_and_leaves_the_unhealthy_out() -> None:
    sick = Workload(
        uid="Kubernetes//Pod/shop/echo-2",
        name="echo-2",
        namespace="shop",
        addresses=(ipaddress.ip_address("10.244.1.3"),),
        services=ECHO.services,
        status=WorkloadStatus.UNHEALTHY,
    )
    stranger = Workload(uid="u3", name="other", namespace="shop", addresses=())
    doc = dump_service(ECHO_SERVICE, [ECHO, sick, stranger])
    assert doc == {
        "name": "echo",
        "namespace": "shop",
        "hostname": "echo.shop.svc.cluster.local",
        "vips": ["/10.96.0.20"],
        "ports": {"80": 8080},
        "endpoints": {
            "Kubernetes//Pod/shop/echo-1": {
                "workloadUid": "Kubernetes//Pod/shop/echo-1",
                "port": {"80": 8080},
                "status": "Healthy",
            }
        },
        "subjectAltNames": [],
    }
    allow_all = LoadBalancing(health_policy=HealthPolicy.ALLOW_ALL)
    doc = dump_service(replace(ECHO_SERVICE, load_balancing=allow_all), [ECHO, sick])
    assert sorted(doc["endpoints"]) == [ECHO.uid, sick.uid]
    assert doc["loadBalancer"] == {
        "routingPreferences": [],
        "mode": "Standard",
        "healthPolicy": "AllowAll",
    }


def test_a_policy_is_rules_of_clauses_of_matches_with_serde_string_matches() -> None:
    p = Policy(
        name="allow-sleep",
        namespace="shop",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.ALLOW,
        rules=(
            Rule(
                (
                    Clause(
                        (
                            Match(
                                principals=(
                                    StringMatch(MatchKind.EXACT, "cluster.local/ns/a/sa/b"),
                                ),
                                not_namespaces=(StringMatch(MatchKind.PRESENCE),),
                            ),
                        )
                    ),
                    Clause(
                        (
                            Match(
                                destination_ports=(8080,),
                                source_ips=(ipaddress.ip_network("10.0.0.0/8"),),
                            ),
                        )
                    ),
                )
            ),
        ),
    )
    assert dump_policy(p) == {
        "name": "allow-sleep",
        "namespace": "shop",
        "scope": "WorkloadSelector",
        "action": "Allow",
        "rules": [
            [
                [
                    {
                        "notNamespaces": [{"Presence": []}],
                        "principals": [{"Exact": "cluster.local/ns/a/sa/b"}],
                    }
                ],
                [{"sourceIps": ["10.0.0.0/8"], "destinationPorts": [8080]}],
            ]
        ],
        "dryRun": False,
    }


def test_a_hostname_waypoint_and_an_older_dumps_port_key_are_read() -> None:
    doc = dump_workload(ECHO)
    doc["waypoint"] = {"destination": "shop/waypoint.shop.svc.cluster.local", "port": 15009}
    assert load_workload(doc).waypoint == GatewayAddress(
        hostname="shop/waypoint.shop.svc.cluster.local", port=15009
    )


def test_entries_keyed_by_name_as_older_ztunnels_dumped_them_are_read() -> None:
    state = load_state(
        {
            "workloads": {"/10.244.1.2": dump_workload(ECHO)},
            "services": {"/10.96.0.20": dump_service(ECHO_SERVICE)},
        }
    )
    assert state.workloads == {ECHO.uid: ECHO}
    assert not state.synced


# --- errors ------------------------------------------------------------------


def _broken_state(change: dict[str, Any], at: int = 1) -> dict[str, Any]:
    good = dump_workload(ECHO)
    other = {**good, "uid": "u2"} | change
    return {"workloads": [good, other][: at + 1]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _broken_state({"workloadIps": ["10.0.0.1", "x"]}),
            "workloads[1].workloadIps[1]: 'x' is not an IP address",
        ),
        (
            _broken_state({"protocol": "QUIC"}),
            "workloads[1].protocol: 'QUIC' is not one of HBONE, TCP",
        ),
        (
            _broken_state({"status": 1}),
            "workloads[1].status: expected a string, got int 1",
        ),
        (
            _broken_state({"uid": "Kubernetes//Pod/shop/echo-1"}),
            "workloads[1]: 'Kubernetes//Pod/shop/echo-1' appears twice (also at workloads[0])",
        ),
        (
            _broken_state({"serviceAccount": "Bad_SA"}),
            "workloads[1]: identity: ",
        ),
        (
            _broken_state({"servicePorts": {"shop/echo.shop.svc.cluster.local": {"80": 70000}}}),
            'workloads[1].servicePorts["shop/echo.shop.svc.cluster.local"]["80"]: '
            "70000 is out of range (0-65535)",
        ),
        (
            _broken_state({"waypoint": {"destination": "nowhere"}}),
            "workloads[1].waypoint.destination: 'nowhere' is neither",
        ),
        ({"workloads": "all of them"}, "workloads: expected a list, got a string"),
        (
            {"services": [{**dump_service(ECHO_SERVICE), "vips": ["10.96.0.20"]}]},
            "services[0].vips[0]: '10.96.0.20' is not '<network>/<ip>'",
        ),
        (
            {"services": [{**dump_service(ECHO_SERVICE), "ports": {"http": 80}}]},
            "services[0].ports[\"http\"]: 'http' is not a port number",
        ),
        (
            {"policies": [{"name": "p", "scope": "Cluster", "action": "Allow"}]},
            "policies[0].scope: 'Cluster' is not one of Global, Namespace, WorkloadSelector",
        ),
        (
            {
                "policies": [
                    {
                        "name": "p",
                        "scope": "Global",
                        "action": "Deny",
                        "rules": [[[{"principals": [{"Regex": ".*"}]}]]],
                    }
                ]
            },
            "policies[0].rules[0][0][0].principals[0]: 'Regex' is not one of Exact, Prefix",
        ),
        (
            {
                "policies": [
                    {
                        "name": "p",
                        "scope": "Global",
                        "action": "Allow",
                        "rules": [[[{"serviceAccounts": [{"namespace": "a"}]}]]],
                    }
                ]
            },
            "policies[0].rules[0][0][0].serviceAccounts: the model has no 'serviceAccounts'",
        ),
        (
            {"policies": [{"name": "p", "scope": "Global", "action": "Allow", "dryRun": True}]},
            "policies[0].dryRun: dry-run policies are not supported",
        ),
        (
            {"policies": [{"name": "p", "scope": "Global", "action": "Allow"}], "config": []},
            "config: expected an object, got a list",
        ),
    ],
)
def test_a_bad_document_is_refused_naming_the_path(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(DumpError) as caught:
        load_state(doc)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, ValueError)
