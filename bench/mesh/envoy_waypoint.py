"""Envoy 1.40 as the waypoint: the resources meshd sent ours, and Istio's HBONE plumbing.

The feed is a portable subset (:mod:`controlplane.l7.envoy`): an internal
listener ``waypoint`` whose filter chains match the original destination,
HTTP connection managers taking routes by RDS, EDS clusters whose mesh
endpoints carry Istio's tunnel marker. Our waypoint terminates and
originates HBONE itself; a stock Envoy needs that spelled out, as Istio's
waypoint config does (``pilot/pkg/networking/core/listener_waypoint.go``):

* ``connect_terminate`` on ``0.0.0.0:15008``: mTLS (the waypoint's identity,
  the mesh root; TLS 1.3, X25519, ALPN h2), an HTTP/2 connection manager
  that accepts CONNECT, copies ``:authority`` into the filter state
  ``envoy.filters.listener.original_dst.local_ip`` (shared with the
  upstream), and the HBONE peer's URI SAN into ``io.istio.peer_principal``
  (a string object, shared likewise; the feed's RBAC principals match it,
  as on Istio's waypoints), and sends the stream to the internal listener
  ``waypoint``, whose ``original_dst`` filter makes it the connection's
  destination, so the feed's filter chains match as they do in ours;
* every cluster's endpoint becomes an internal address of the listener
  ``connect_originate`` carrying ``envoy.filters.listener.original_dst``
  ``local: ip:port`` (passed through by the ``internal_upstream`` transport
  socket); ``connect_originate`` restores that destination and tunnels the
  bytes with ``tcp_proxy`` ``tunneling_config`` (``:authority`` ip:port) on
  the cluster ``connect_originate``: ``ORIGINAL_DST`` with the port
  overridden to 15008, mTLS HTTP/2 under the waypoint's identity.

The resources come from our waypoint's ``/config_dump?include_eds`` (what
meshd sent it, Envoy's shape), made static: the RouteConfigurations inline
in their connection managers, the clusters STATIC with their endpoints. A
readiness listener answers ``/healthz/ready`` on 15021 as a waypoint does.
Everything else in the feed goes along unchanged: the connection managers'
HTTP filters (RBAC, ``jwt_authn`` with its inline JWKS, an EnvoyFilter's
``local_ratelimit``) and their ``tracing`` (the OpenTelemetry provider
naming the collector by ``google_grpc`` ``target_uri``, which Envoy dials
itself, as ours does). The bootstrap's node id (the ``node_id`` tag of
Envoy's spans) is the caller's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from bench.envoy import CONNECTION_WINDOW, STREAM_WINDOW, _common_tls

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
}
ORIGINAL_DST = "envoy.filters.listener.original_dst"
PEER_PRINCIPAL = "io.istio.peer_principal"
TUNNEL_MATCH = "envoy.transport_socket_match"  # Istio's marker of an HBONE endpoint
RAW_BUFFER = {
    "name": "envoy.transport_sockets.raw_buffer",
    "typed_config": {"@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
}
HTTP2 = {
    "initial_stream_window_size": STREAM_WINDOW,
    "initial_connection_window_size": CONNECTION_WINDOW,
}
HBONE_PORT = 15008
READY_PORT = 15021
Obj = dict[str, Any]


def _resources(dump: Obj) -> tuple[list[Obj], dict[str, Obj], list[Obj], dict[str, Obj]]:
    """(listeners, routes by name, clusters, endpoints by cluster) of a ConfigDump."""
    listeners: list[Obj] = []
    routes: dict[str, Obj] = {}
    clusters: list[Obj] = []
    endpoints: dict[str, Obj] = {}
    for section in dump.get("configs") or []:
        kind = str(section.get("@type", "")).rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump":
            for entry in section.get("dynamic_listeners") or []:
                listeners.append(_bare(entry["active_state"]["listener"]))
        elif kind == "RoutesConfigDump":
            for entry in section.get("dynamic_route_configs") or []:
                route = _bare(entry["route_config"])
                routes[route["name"]] = route
        elif kind == "ClustersConfigDump":
            for entry in section.get("dynamic_active_clusters") or []:
                clusters.append(_bare(entry["cluster"]))
        elif kind == "EndpointsConfigDump":
            for entry in section.get("dynamic_endpoint_configs") or []:
                cla = _bare(entry["endpoint_config"])
                endpoints[cla["cluster_name"]] = cla
    if not listeners or not clusters:
        raise ValueError("the config dump holds no listener or no cluster (not synced yet?)")
    return listeners, routes, clusters, endpoints


def _bare(resource: Obj) -> Obj:
    out = copy.deepcopy(resource)
    out.pop("@type", None)
    return out


def _inline_routes(listener: Obj, routes: dict[str, Obj]) -> Obj:
    """The listener with each connection manager's RDS replaced by its RouteConfiguration."""
    listener = copy.deepcopy(listener)
    for chain in listener.get("filter_chains") or []:
        for network_filter in chain.get("filters") or []:
            config = network_filter.get("typed_config") or {}
            if config.get("@type") != HCM or "rds" not in config:
                continue
            name = config.pop("rds")["route_config_name"]
            if name not in routes:
                raise ValueError(f"the dump has no RouteConfiguration {name!r}")
            config["route_config"] = routes[name]
    return listener


def _tunnelled_cluster(cluster: Obj, cla: Obj | None) -> Obj:
    """An EDS cluster made STATIC, each endpoint reached through ``connect_originate``."""
    cluster = copy.deepcopy(cluster)
    cluster.pop("eds_cluster_config", None)
    cluster["type"] = "STATIC"
    assignment = copy.deepcopy(cla) if cla else {"endpoints": []}
    assignment["cluster_name"] = cluster["name"]
    for locality in assignment.get("endpoints") or []:
        for lb_endpoint in locality.get("lb_endpoints") or []:
            marker = (lb_endpoint.get("metadata") or {}).get("filter_metadata") or {}
            if (marker.get(TUNNEL_MATCH) or {}).get("tunnel") != "http":
                continue  # not in the mesh: plaintext, as ours
            endpoint = lb_endpoint["endpoint"]
            socket = endpoint["address"]["socket_address"]
            target = f"{socket['address']}:{socket['port_value']}"
            endpoint["address"] = {
                "envoy_internal_address": {
                    "server_listener_name": "connect_originate",
                    "endpoint_id": target,
                }
            }
            metadata = lb_endpoint.setdefault("metadata", {}).setdefault("filter_metadata", {})
            metadata[ORIGINAL_DST] = {"local": target}
    cluster["load_assignment"] = assignment
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.internal_upstream",
        "typed_config": {
            "@type": T
            + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "passthrough_metadata": [{"kind": {"host": {}}, "name": ORIGINAL_DST}],
            "transport_socket": RAW_BUFFER,
        },
    }
    return cluster


def _eds_name(cluster: Obj) -> str:
    return str((cluster.get("eds_cluster_config") or {}).get("service_name") or cluster["name"])


def _connect_terminate(files: dict[str, Path]) -> Obj:
    hcm = {
        "@type": HCM,
        "stat_prefix": "connect_terminate",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True, **HTTP2},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "stream_idle_timeout": "0s",
        "route_config": {
            "name": "connect",
            "virtual_hosts": [
                {
                    "name": "connect",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "main_internal",
                                "timeout": "0s",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.set_filter_state",
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.set_filter_state.v3.Config",
                    "on_request_headers": [
                        {
                            "object_key": f"{ORIGINAL_DST}.local_ip",
                            "format_string": {
                                "text_format_source": {"inline_string": "%REQ(:AUTHORITY)%"}
                            },
                            "shared_with_upstream": "ONCE",
                        },
                        {
                            # The HBONE peer's identity, which the feed's RBAC matches
                            # (Istio's waypoints: the filter state io.istio.peer_principal).
                            "object_key": PEER_PRINCIPAL,
                            "factory_key": "envoy.string",
                            "format_string": {
                                "text_format_source": {"inline_string": "%DOWNSTREAM_PEER_URI_SAN%"}
                            },
                            "shared_with_upstream": "ONCE",
                        },
                    ],
                },
            },
            ROUTER,
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "disable_stateless_session_resumption": True,
            "common_tls_context": _common_tls(files["cert"], files["key"], files["ca"], []),
        },
    }
    return {
        "name": "connect_terminate",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
        "filter_chains": [
            {
                "transport_socket": tls,
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }


def _connect_originate_listener() -> Obj:
    return {
        "name": "connect_originate",
        "internal_listener": {},
        "listener_filters": [
            {
                "name": ORIGINAL_DST,
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "connect_originate",
                            "cluster": "connect_originate",
                            "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                        },
                    }
                ]
            }
        ],
    }


def _connect_originate_cluster(files: dict[str, Path]) -> Obj:
    return {
        "name": "connect_originate",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"upstream_port_override": HBONE_PORT},
        "cleanup_interval": "60s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": HTTP2},
                "common_http_protocol_options": {"idle_timeout": "3600s"},
            }
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": _common_tls(files["cert"], files["key"], files["ca"], []),
            },
        },
    }


def _main_internal() -> Obj:
    return {
        "name": "main_internal",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "main_internal",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "envoy_internal_address": {"server_listener_name": "waypoint"}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.internal_upstream",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.internal_upstream.v3."
                "InternalUpstreamTransport",
                "transport_socket": RAW_BUFFER,
            },
        },
    }


def _ready_listener() -> Obj:
    hcm = {
        "@type": HCM,
        "stat_prefix": "status",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "status",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"path": "/healthz/ready"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [ROUTER],
    }
    return {
        "name": "status",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": READY_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def envoy_waypoint_config(dump: Obj, files: dict[str, Path], admin: Path, node_id: str = "") -> Obj:
    """The bootstrap of an Envoy serving as the waypoint whose ``/config_dump`` is ``dump``.

    ``files``: the waypoint identity's ``cert`` chain and ``key``, the mesh root ``ca``;
    ``admin``: the unix socket of Envoy's admin; ``node_id``: the bootstrap's node id
    (Envoy's ``node_id`` tag on the spans it reports)."""
    listeners, routes, clusters, endpoints = _resources(dump)
    return {
        **({"node": {"id": node_id, "cluster": "waypoint"}} if node_id else {}),
        "admin": {"address": {"pipe": {"path": str(admin)}}},
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": T + "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "static_resources": {
            "listeners": [
                _connect_terminate(files),
                *(_inline_routes(listener, routes) for listener in listeners),
                _connect_originate_listener(),
                _ready_listener(),
            ],
            "clusters": [
                _main_internal(),
                _connect_originate_cluster(files),
                *(_tunnelled_cluster(c, endpoints.get(_eds_name(c))) for c in clusters),
            ],
        },
    }
