"""The proxy's side of the feed, sans I/O: each response makes a whole new snapshot."""

from __future__ import annotations

import ipaddress

from google.protobuf import any_pb2

from mesh.model import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    Action,
    Policy,
    Scope,
    Service,
    Workload,
)
from mesh.xds import XdsState, apply_response


def packed_workload(uid: str, ip: str = "10.0.0.1") -> any_pb2.Any:
    w = Workload(uid=uid, name=uid, namespace="ns", addresses=(ipaddress.ip_address(ip),))
    return any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=w.to_proto().SerializeToString())


def test_good_resources_apply_and_bad_ones_are_refused_alone() -> None:
    service = Service(name="s", namespace="ns", hostname="s.ns.svc.cluster.local")
    packed_service = any_pb2.Any(
        type_url=ADDRESS_TYPE_URL, value=service.to_proto().SerializeToString()
    )
    applied = apply_response(
        XdsState(),
        ADDRESS_TYPE_URL,
        [
            ("w1", "v1", packed_workload("w1")),
            ("ns/s.ns.svc.cluster.local", "v1", packed_service),
            ("garbage", "v1", any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=b"\xff\xff")),
            ("misnamed", "v1", packed_workload("w2")),
            ("wrongtype", "v1", any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"")),
        ],
        [],
    )
    assert set(applied.state.workloads) == {"w1"}
    assert set(applied.state.services) == {"ns/s.ns.svc.cluster.local"}
    assert set(applied.refused) == {"garbage", "misnamed", "wrongtype"}
    assert "cannot decode" in applied.refused["garbage"]
    assert "holds 'w2'" in applied.refused["misnamed"]
    assert applied.state.versions[ADDRESS_TYPE_URL] == {
        "w1": "v1",
        "ns/s.ns.svc.cluster.local": "v1",
    }
    # The NACK names the refused resources in a form meshd can read back.
    (detail,) = applied.refused_details()
    assert detail.type_url.endswith("google.protobuf.ListValue")


def test_snapshots_are_new_values_and_removals_apply() -> None:
    first = apply_response(
        XdsState(),
        ADDRESS_TYPE_URL,
        [("w1", "v1", packed_workload("w1")), ("w2", "v1", packed_workload("w2", "10.0.0.2"))],
        [],
    )
    second = apply_response(first.state, ADDRESS_TYPE_URL, [], ["w1", "never-there"])
    assert set(first.state.workloads) == {"w1", "w2"}, "the old snapshot is untouched"
    assert set(second.state.workloads) == {"w2"}
    assert second.changed
    assert second.state.workload_by_ip("10.0.0.2") is not None
    assert second.state.workload_by_ip("10.0.0.1") is None


def test_synced_once_every_type_answered() -> None:
    state = apply_response(XdsState(), ADDRESS_TYPE_URL, [], []).state
    assert not state.synced
    policy = Policy(name="p", namespace="ns", scope=Scope.NAMESPACE, action=Action.DENY)
    packed = any_pb2.Any(
        type_url=AUTHORIZATION_TYPE_URL, value=policy.to_proto().SerializeToString()
    )
    state = apply_response(state, AUTHORIZATION_TYPE_URL, [("ns/p", "v1", packed)], []).state
    assert state.synced
    assert state.policies["ns/p"] == policy
