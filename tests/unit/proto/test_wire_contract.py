"""Our .proto files keep Istio's wire contract: package, message and field numbers.

A renumbered field would still compile and round-trip between our own
programs, and silently break every real Istio peer; this test is the guard.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.proto.istio.ca import ca_pb2
from mesh.proto.istio.security import authorization_pb2 as authz
from mesh.proto.istio.workload import workload_pb2 as wl
from mesh.proto.istio.workload import zds_pb2 as zds

CONTRACT: list[tuple[Any, dict[str, int]]] = [
    (wl.Address.DESCRIPTOR, {"workload": 1, "service": 2}),
    (
        wl.Workload.DESCRIPTOR,
        {
            "uid": 20,
            "name": 1,
            "namespace": 2,
            "addresses": 3,
            "hostname": 21,
            "network": 4,
            "tunnel_protocol": 5,
            "trust_domain": 6,
            "service_account": 7,
            "waypoint": 8,
            "network_gateway": 19,
            "node": 9,
            "canonical_name": 10,
            "canonical_revision": 11,
            "workload_type": 12,
            "workload_name": 13,
            "native_tunnel": 14,
            "application_tunnel": 23,
            "services": 22,
            "authorization_policies": 16,
            "status": 17,
            "cluster_id": 18,
            "locality": 24,
            "network_mode": 25,
            "extensions": 26,
            "capacity": 27,
        },
    ),
    (
        wl.Service.DESCRIPTOR,
        {
            "name": 1,
            "namespace": 2,
            "hostname": 3,
            "addresses": 4,
            "ports": 5,
            "subject_alt_names": 6,
            "waypoint": 7,
            "load_balancing": 8,
            "ip_families": 9,
            "extensions": 10,
            "canonical": 11,
        },
    ),
    (wl.GatewayAddress.DESCRIPTOR, {"hostname": 1, "address": 2, "hbone_mtls_port": 3}),
    (wl.NetworkAddress.DESCRIPTOR, {"network": 1, "address": 2}),
    (wl.Port.DESCRIPTOR, {"service_port": 1, "target_port": 2}),
    (
        wl.LoadBalancing.DESCRIPTOR,
        {
            "routing_preference": 1,
            "mode": 2,
            "health_policy": 3,
            "dns_connect_strategy": 4,
        },
    ),
    (
        authz.Authorization.DESCRIPTOR,
        {
            "name": 1,
            "namespace": 2,
            "scope": 3,
            "action": 4,
            "rules": 5,
        },
    ),
    (
        authz.Match.DESCRIPTOR,
        {
            "namespaces": 1,
            "not_namespaces": 2,
            "principals": 3,
            "not_principals": 4,
            "source_ips": 5,
            "not_source_ips": 6,
            "destination_ips": 7,
            "not_destination_ips": 8,
            "destination_ports": 9,
            "not_destination_ports": 10,
        },
    ),
    (authz.StringMatch.DESCRIPTOR, {"exact": 1, "prefix": 2, "suffix": 3, "presence": 4}),
    (
        ca_pb2.IstioCertificateRequest.DESCRIPTOR,
        {
            "csr": 1,
            "validity_duration": 3,
            "metadata": 4,
        },
    ),
    (ca_pb2.IstioCertificateResponse.DESCRIPTOR, {"cert_chain": 1, "root_cert": 2}),
    (zds.WorkloadRequest.DESCRIPTOR, {"add": 1, "del": 2, "snapshot_sent": 3, "keep": 5}),
    (zds.AddWorkload.DESCRIPTOR, {"uid": 1, "workload_info": 2}),
    (zds.DelWorkload.DESCRIPTOR, {"uid": 2}),
]


@pytest.mark.parametrize("descriptor,fields", CONTRACT, ids=lambda x: getattr(x, "full_name", ""))
def test_field_numbers_are_istios(descriptor: Any, fields: dict[str, int]) -> None:
    actual = {name: field.number for name, field in descriptor.fields_by_name.items()}
    assert {name: actual.get(name) for name in fields} == fields
    assert set(actual) == set(fields), "a field was added or removed: check Istio's definition"


def test_packages_and_type_urls() -> None:
    assert wl.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert authz.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    assert [m.name for m in service.methods] == ["CreateCertificate"]
    assert wl.HBONE == 1 and wl.NONE == 0
    assert authz.ALLOW == 0 and authz.DENY == 1
    assert (authz.GLOBAL, authz.NAMESPACE, authz.WORKLOAD_SELECTOR) == (0, 1, 2)


def test_known_bytes() -> None:
    # A workload with uid "a", address 1.2.3.4 and HBONE, encoded by hand from
    # the field numbers: (3<<3|2) 04 01020304, (5<<3|0) 01, (20<<3|2)=0xa2 0x01 01 'a'.
    workload = wl.Workload(uid="a", addresses=[b"\x01\x02\x03\x04"], tunnel_protocol=wl.HBONE)
    assert workload.SerializeToString() == bytes.fromhex("1a04010203042801a2010161")
