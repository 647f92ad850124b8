"""The waypoint reads meshd's HTTP connection managers, and refuses what it would not do."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2

from controlplane.l7 import envoy
from controlplane.l7.build import build
from tests.support.l7world import world
from waypoint.config import convert, model

CHAIN = "reviews.shop.svc.cluster.local:9080"


def meshd_listener() -> listener_pb2.Listener:
    return envoy.translate(build(world()).shares["shop/waypoint"]).listeners["waypoint"]


def with_stream_idle_timeout(timeout: duration_pb2.Duration | None) -> listener_pb2.Listener:
    """meshd's listener, its first HCM's ``stream_idle_timeout`` set (None: unset)."""
    listener = meshd_listener()
    network = listener.filter_chains[0].filters[0]
    hcm = hcm_pb2.HttpConnectionManager()
    assert network.typed_config.Unpack(hcm)
    hcm.ClearField("stream_idle_timeout")
    if timeout is not None:
        hcm.stream_idle_timeout.CopyFrom(timeout)
    network.typed_config.Pack(hcm)
    return listener


def http_managers(listener: listener_pb2.Listener) -> dict[str, model.HttpManager]:
    return {
        chain.name: chain.handler
        for chain in convert.listener(listener).chains
        if isinstance(chain.handler, model.HttpManager)
    }


def test_meshd_says_no_stream_idle_timeout_and_the_waypoint_takes_it() -> None:
    assert CHAIN in http_managers(meshd_listener())


def test_an_unset_stream_idle_timeout_is_taken() -> None:
    assert http_managers(with_stream_idle_timeout(None))


@pytest.mark.parametrize(
    ("timeout", "said"),
    [
        (duration_pb2.Duration(seconds=300), "300s"),
        (duration_pb2.Duration(nanos=500_000_000), "0.5s"),
    ],
    ids=["envoy-default", "half-a-second"],
)
def test_a_stream_idle_timeout_is_refused_naming_the_field(
    timeout: duration_pb2.Duration, said: str
) -> None:
    """Taking it would be a promise the waypoint does not keep: idle streams stay open."""
    with pytest.raises(convert.Unsupported) as e:
        convert.listener(with_stream_idle_timeout(timeout))
    message = str(e.value)
    assert ".filters[0].stream_idle_timeout: " in message
    assert f"{said} is not supported" in message and "only 0s" in message
