"""A waypoint's ``Cluster``s and ``ClusterLoadAssignment``s (part of :mod:`controlplane.l7.envoy`).

Each cluster with the DestinationRule's load balancing, circuit breakers and
outlier detection (Istio's defaults otherwise); each endpoint with its
health, and for a pod in the mesh Istio's HBONE marker and its SPIFFE ID; a
workload's cluster ``ORIGINAL_DST`` with its pod's marker and identity.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from controlplane.l7.envoy_pb import (
    HTTP_PROTOCOL_OPTIONS,
    TUNNEL_MATCH,
    UINT32_MAX,
    _ads,
    _any,
    _duration,
)
from controlplane.l7.ir import (
    DEFAULT_POLICY,
    LbPolicy,
    Protocol,
    TrafficPolicy,
)
from controlplane.l7.share import ClusterSpec
from controlplane.l7.workloads import WorkloadSpec, pod_cluster_name

_LB = {
    LbPolicy.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    LbPolicy.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbPolicy.RANDOM: cluster_pb2.Cluster.RANDOM,
    LbPolicy.RING_HASH: cluster_pb2.Cluster.RING_HASH,
    LbPolicy.MAGLEV: cluster_pb2.Cluster.MAGLEV,
}


def _thresholds(policy: TrafficPolicy) -> circuit_breaker_pb2.CircuitBreakers:
    b = policy.breakers

    def limit(value: int | None) -> wrappers_pb2.UInt32Value:
        return wrappers_pb2.UInt32Value(value=UINT32_MAX if value is None else value)

    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_connections=limit(b.max_connections),
                max_pending_requests=limit(b.max_pending_requests),
                max_requests=limit(b.max_requests),
                max_retries=limit(b.max_retries),
                track_remaining=True,
            )
        ]
    )


def _cluster(spec: ClusterSpec) -> cluster_pb2.Cluster:
    policy = spec.policy
    out = cluster_pb2.Cluster(
        name=spec.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ads(), service_name=spec.name
        ),
        connect_timeout=_duration(policy.connect_timeout_s),
        lb_policy=_LB[policy.lb],
        circuit_breakers=_thresholds(policy),
    )
    if policy.lb is LbPolicy.RING_HASH and policy.minimum_ring_size:
        out.ring_hash_lb_config.minimum_ring_size.value = policy.minimum_ring_size
    od = policy.outlier
    if od is not None:
        detection = outlier_detection_pb2.OutlierDetection(
            interval=_duration(od.interval_s),
            base_ejection_time=_duration(od.base_ejection_time_s),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=od.max_ejection_percent),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        )
        if od.consecutive_5xx is not None:
            # Unset: Envoy's default (5 in a row, enforced), as Istio leaves it; 0: off.
            detection.consecutive_5xx.value = od.consecutive_5xx
            detection.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx else 0
        if od.consecutive_gateway_errors:
            detection.consecutive_gateway_failure.value = od.consecutive_gateway_errors
            detection.enforcing_consecutive_gateway_failure.value = 100
        out.outlier_detection.CopyFrom(detection)
        out.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent)
    if spec.protocol.is_http:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        if spec.protocol in (Protocol.HTTP2, Protocol.GRPC):
            options.explicit_http_config.http2_protocol_options.SetInParent()
        else:
            options.explicit_http_config.http_protocol_options.SetInParent()
        if policy.idle_timeout_s:
            options.common_http_protocol_options.idle_timeout.CopyFrom(
                _duration(policy.idle_timeout_s)
            )
        if policy.max_requests_per_connection:
            options.common_http_protocol_options.max_requests_per_connection.value = (
                policy.max_requests_per_connection
            )
        out.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(options))
    name, namespace = spec.hostname.split(".")[:2]
    services = struct_pb2.Struct()
    services.update({"services": [{"host": spec.hostname, "name": name, "namespace": namespace}]})
    if spec.subset:
        services.update({"subset": spec.subset})
    out.metadata.filter_metadata["istio"].CopyFrom(services)
    return out


def _workload_cluster(workload: WorkloadSpec) -> cluster_pb2.Cluster:
    """One pod's cluster: to the connection's own destination (the address the client
    dialled), as Envoy's ORIGINAL_DST does, the pod's peer metadata on the cluster."""
    out = cluster_pb2.Cluster(
        name=pod_cluster_name(workload.ip),
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=_duration(DEFAULT_POLICY.connect_timeout_s),
        circuit_breakers=_thresholds(DEFAULT_POLICY),
    )
    _peer_metadata(
        out.metadata,
        hbone=workload.hbone,
        workload=f"{workload.name};{workload.namespace};{workload.canonical_name};"
        f"{workload.canonical_revision};{workload.cluster_id}",
        identity=workload.identity,
    )
    return out


def _peer_metadata(
    metadata: base_pb2.Metadata, *, hbone: bool, workload: str, identity: str
) -> None:
    """Istio's marker of an HBONE peer and the peer's workload and SPIFFE ID."""
    if hbone:
        metadata.filter_metadata[TUNNEL_MATCH].update({"tunnel": "http"})
    metadata.filter_metadata["istio"].update({"workload": workload, "identity": identity})


def _load_assignment(spec: ClusterSpec) -> endpoint_pb2.ClusterLoadAssignment:
    lb_endpoints = []
    for ep in spec.endpoints:
        metadata = base_pb2.Metadata()
        _peer_metadata(
            metadata,
            hbone=ep.hbone,
            workload=f"{ep.pod};{ep.namespace};{ep.canonical_name};"
            f"{ep.canonical_revision};{ep.cluster_id}",
            identity=ep.identity,
        )
        lb_endpoints.append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address=ep.ip, port_value=ep.port)
                    )
                ),
                health_status=(
                    health_check_pb2.HEALTHY if ep.healthy else health_check_pb2.UNHEALTHY
                ),
                metadata=metadata,
            )
        )
    endpoints = (
        [endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)]
        if lb_endpoints
        else []
    )
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=spec.name, endpoints=endpoints)
