"""The baggage the source ztunnel sends and the labels the destination ztunnel takes from it."""

from __future__ import annotations

from dataclasses import replace

from mesh.hbone.headers import parse_baggage
from mesh.identity import SpiffeId
from mesh.model import Port, Service, Workload
from tests.unit.ztunnel.conftest import index, service, workload
from ztunnel.baggage import (
    DESTINATION_HOST,
    DESTINATION_NAME,
    DESTINATION_NAMESPACE,
    DerivedSources,
    SourceBaggage,
    inbound_service,
    source_fields,
)
from ztunnel.telemetry import Conn, traffic_labels

TO_8080 = (Port(service_port=80, target_port=8080),)
ECHO_SVC = service("echo", "10.96.0.20", "server")
LOCAL_SVC = service("echo-local", "10.96.0.21", "server")
OTHER_SVC = service("other", "10.96.0.30", "server")
ADMIN_SVC = service("admin", "10.96.0.40", "server", (Port(service_port=90, target_port=9090),))
SLEEP = replace(
    workload("sleep-7d9c", "10.0.0.1", "client", "sleep"),
    canonical_name="sleep",
    canonical_revision="v1",
    workload_name="sleep",
    cluster_id="Kubernetes",
)
ECHO = replace(
    workload(
        "echo-1",
        "10.0.1.1",
        "server",
        "echo",
        services={ECHO_SVC.resource_name: TO_8080, LOCAL_SVC.resource_name: TO_8080},
    ),
    canonical_name="echo",
)
LONE = workload("lone", "10.0.1.2", "server", services={ECHO_SVC.resource_name: TO_8080})
STATE = index((SLEEP, ECHO, LONE), (ECHO_SVC, LOCAL_SVC, OTHER_SVC, ADMIN_SVC))
SLEEP_ID = SpiffeId(trust_domain="cluster.local", namespace="client", service_account="sleep")


def sent(source: Workload | None, svc: Service | None) -> dict[str, str]:
    """What the destination reads from the header the source sends."""
    return parse_baggage(SourceBaggage().header(source, svc))


def test_the_source_sends_istios_members_and_ours_for_the_service() -> None:
    assert source_fields(SLEEP, ECHO_SVC) == {
        "k8s.cluster.name": "Kubernetes",
        "k8s.namespace.name": "client",
        "k8s.pod.name": "sleep",  # the workload name: the model knows no other type
        "service.name": "sleep",
        "service.version": "v1",
        DESTINATION_HOST: "echo.server.svc.cluster.local",
        DESTINATION_NAMESPACE: "server",
        DESTINATION_NAME: "echo",
    }
    # Empty values are left out; no service resolved, no destination members.
    bare = replace(SLEEP, cluster_id="", workload_name="", canonical_revision="")
    assert source_fields(bare, None) == {
        "k8s.namespace.name": "client",
        "k8s.pod.name": "sleep-7d9c",
        "service.name": "sleep",
    }
    assert source_fields(None, None) == {}
    assert SourceBaggage().header(None, None) == ""


def test_the_encoded_header_is_built_once_per_pair_of_objects() -> None:
    cache = SourceBaggage()
    first = cache.header(SLEEP, ECHO_SVC)
    assert cache.header(SLEEP, ECHO_SVC) is first
    assert "destination.service.host=echo.server.svc.cluster.local" in first
    renamed = replace(SLEEP, canonical_name="sleepy")  # a new snapshot's object
    assert "service.name=sleepy" in cache.header(renamed, ECHO_SVC)
    assert cache.header(SLEEP, LOCAL_SVC) != first


def test_the_service_the_baggage_names_labels_the_connection() -> None:
    assert inbound_service(STATE, ECHO, 8080, sent(SLEEP, ECHO_SVC)) is ECHO_SVC
    assert inbound_service(STATE, ECHO, 8080, sent(SLEEP, LOCAL_SVC)) is LOCAL_SVC
    labels = traffic_labels(
        Conn(
            "server/echo-1",
            "inbound",
            "HBONE",
            "10.0.0.1:40000",
            "10.0.1.1:8080",
            "10.0.1.1:8080",
            src_identity=str(SLEEP_ID),
            src_workload=SLEEP,
            dst_workload=ECHO,
            dst_service=inbound_service(STATE, ECHO, 8080, sent(SLEEP, LOCAL_SVC)),
        )
    )
    assert labels["reporter"] == "destination"
    assert labels["destination_service"] == "echo-local.server.svc.cluster.local"
    assert labels["destination_service_namespace"] == "server"
    assert labels["destination_service_name"] == "echo-local"


def test_a_named_service_that_does_not_front_the_workload_stays_unknown() -> None:
    assert inbound_service(STATE, ECHO, 8080, sent(SLEEP, OTHER_SVC)) is None  # exists, elsewhere
    ghost = service("ghost", "10.96.0.99", "server")  # not in the index at all
    assert inbound_service(STATE, ECHO, 8080, sent(SLEEP, ghost)) is None
    # In the workload's services, but not (yet) a service of the snapshot.
    orphan = replace(ECHO, services={**ECHO.services, ghost.resource_name: TO_8080})
    assert inbound_service(STATE, orphan, 8080, sent(SLEEP, ghost)) is None
    named = sent(SLEEP, ECHO_SVC)
    assert inbound_service(STATE, ECHO, 8080, {**named, DESTINATION_NAME: "echo-local"}) is None
    # Half a name is no name: no guessing either (LONE has one service to guess).
    host_only = {DESTINATION_HOST: ECHO_SVC.hostname}
    assert inbound_service(STATE, LONE, 8080, host_only) is None
    assert inbound_service(STATE, LONE, 8080, {DESTINATION_NAMESPACE: "server"}) is None
    assert inbound_service(STATE, LONE, 8080, {**named, DESTINATION_NAMESPACE: "client"}) is None


def test_without_baggage_the_one_service_fronting_the_port_is_taken() -> None:
    assert inbound_service(STATE, LONE, 8080, {}) is ECHO_SVC
    assert inbound_service(STATE, LONE, 8080, sent(SLEEP, None)) is ECHO_SVC  # source members only
    assert inbound_service(STATE, LONE, 9999, {}) is None  # not a port the service leads to
    assert inbound_service(STATE, ECHO, 8080, {}) is None  # two services: which is not known
    # Another service on another port does not make the port's one ambiguous.
    both = replace(LONE, services={**LONE.services, ADMIN_SVC.resource_name: ADMIN_SVC.ports})
    assert inbound_service(STATE, both, 8080, {}) is ECHO_SVC
    assert inbound_service(STATE, both, 9090, {}) is ADMIN_SVC
    # A target port of 0: the service port is the workload's.
    same = replace(LONE, services={ECHO_SVC.resource_name: (Port(service_port=80, target_port=0),)})
    assert inbound_service(STATE, same, 80, {}) is ECHO_SVC
    assert inbound_service(STATE, same, 8080, {}) is None


def test_a_source_the_index_does_not_know_is_taken_from_baggage_within_bounds() -> None:
    derived = DerivedSources(limit=2)
    remote = replace(SLEEP, cluster_id="east")
    found = derived.derive(sent(remote, ECHO_SVC), SLEEP_ID)
    assert found is not None
    assert derived.derive(sent(remote, ECHO_SVC), SLEEP_ID) is found  # one object per source
    labels = traffic_labels(
        Conn(
            "server/echo-1",
            "inbound",
            "HBONE",
            "10.1.0.1:40000",
            "10.0.1.1:8080",
            "10.0.1.1:8080",
            src_identity=str(SLEEP_ID),
            src_workload=found,
        )
    )
    assert labels["source_workload"] == "sleep"
    assert labels["source_workload_namespace"] == "client"
    assert labels["source_canonical_service"] == labels["source_app"] == "sleep"
    assert labels["source_canonical_revision"] == "v1"
    assert labels["source_cluster"] == "east"
    assert labels["source_principal"] == str(SLEEP_ID)

    # The namespace must be the one mTLS proved; the values short names.
    other = SpiffeId(trust_domain="cluster.local", namespace="server", service_account="echo")
    assert derived.derive(sent(remote, None), other) is None
    assert derived.derive(sent(remote, None), None) is None
    fields = sent(remote, None)
    assert derived.derive({**fields, "k8s.pod.name": "x" * 64}, SLEEP_ID) is None
    assert derived.derive({**fields, "service.version": "v1 beta"}, SLEEP_ID) is None
    assert derived.derive({**fields, "k8s.cluster.name": "a/b"}, SLEEP_ID) is None
    del fields["k8s.pod.name"]
    assert derived.derive(fields, SLEEP_ID) is None  # no workload name
    deployment = derived.derive({**fields, "k8s.deployment.name": "sleep-v2"}, SLEEP_ID)
    assert deployment is not None and deployment.workload_name == "sleep-v2"
    # At most `limit` distinct sources: past that, unknown.
    assert len(derived) == 2
    assert derived.derive(sent(replace(remote, workload_name="third"), None), SLEEP_ID) is None
    assert derived.derive(sent(remote, None), SLEEP_ID) is found
