"""A real Envoy as HBONE peer: its binary, its configs, and running it.

Used by the interop tests and the benchmarks. The two configurations are
Envoy's own HBONE ends, as Istio's waypoints and gateways build them: a
``tcp_proxy`` with ``tunneling_config`` (the client: plain TCP in, CONNECT
over mTLS HTTP/2 out) and an HTTP connection manager terminating CONNECT
(the server). Windows, TLS version and curve are set as ours are.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024


def envoy_binary() -> Path | None:
    """``$ENVOY_BIN``, else the copy `make envoy` installs, else one on PATH."""
    candidates = [os.environ.get("ENVOY_BIN"), str(REPO / ".envoy/envoy/_bin/envoy")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("envoy")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def _tls_params() -> dict[str, Any]:
    return {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
        "ecdh_curves": ["X25519"],
    }


def _common_tls(cert: Path, key: Path, ca: Path, peer_sans: list[str]) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(ca)}}
    if peer_sans:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": san}} for san in peer_sans
        ]
    return {
        "alpn_protocols": ["h2"],
        "tls_params": _tls_params(),
        "tls_certificates": [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ],
        "validation_context": validation,
    }


def _admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static_cluster(name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
        **extra,
    }


def client_config(
    *,
    listen_port: int,
    admin_port: int,
    peer: tuple[str, int],
    authority: str,
    cert: Path,
    key: Path,
    ca: Path,
    peer_sans: list[str],
) -> dict[str, Any]:
    """Envoy's HBONE client: plain TCP in, CONNECT ``authority`` over mTLS HTTP/2 out."""
    http2 = {
        "initial_stream_window_size": STREAM_WINDOW,
        "initial_connection_window_size": CONNECTION_WINDOW,
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": _common_tls(cert, key, ca, peer_sans),
        },
    }
    cluster = _static_cluster(
        "hbone",
        *peer,
        transport_socket=tls,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": http2},
            }
        },
    )
    return {
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": "plain",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": TCP_PROXY,
                                        "stat_prefix": "tunnel",
                                        "cluster": "hbone",
                                        "tunneling_config": {"hostname": authority},
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


def server_config(
    *,
    listen_port: int,
    admin_port: int,
    upstream: tuple[str, int],
    cert: Path,
    key: Path,
    ca: Path,
    peer_sans: list[str],
) -> dict[str, Any]:
    """Envoy's HBONE server: mTLS HTTP/2 CONNECT in, plain TCP to ``upstream`` out."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone",
        "codec_type": "HTTP2",
        "http2_protocol_options": {
            "allow_connect": True,
            "initial_stream_window_size": STREAM_WINDOW,
            "initial_connection_window_size": CONNECTION_WINDOW,
        },
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "upstream",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext",
            "require_client_certificate": True,
            # As ours: no session tickets, HBONE never resumes.
            "disable_stateless_session_resumption": True,
            "common_tls_context": _common_tls(cert, key, ca, peer_sans),
        },
    }
    return {
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "transport_socket": tls,
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [_static_cluster("upstream", *upstream)],
        },
    }


def envoy_argv(binary: Path, config: Path, base_id: Path, concurrency: int) -> list[str]:
    """How the benches run Envoy: ``concurrency`` workers, a base id of its own (several
    run at once), warnings only, no hot restart."""
    return [
        str(binary),
        "-c",
        str(config),
        "--concurrency",
        str(concurrency),
        "--base-id-path",
        str(base_id),
        "--use-dynamic-base-id",
        "-l",
        "warning",
        "--disable-hot-restart",
    ]


class Envoy:
    """One Envoy process: ``start()`` waits until it is ready, ``stop()`` ends it."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, name: str, concurrency: int = 1
    ) -> None:
        binary = envoy_binary()
        if binary is None:
            raise FileNotFoundError("envoy is not installed (`make envoy` installs it)")
        self.binary = binary
        self.config = config
        self.workdir = workdir
        self.name = name
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        self.log_path = workdir / f"{name}.log"

    def start(self, timeout_s: float = 20) -> Envoy:
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(self.config, indent=1))
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            envoy_argv(self.binary, path, self.workdir / f"{self.name}.baseid", self.concurrency),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy {self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin_port}/ready", timeout=1
                ) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy {self.name} not ready after {timeout_s}s")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=2) as r:
            return parse_stats(r.read().decode())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def parse_stats(text: str) -> dict[str, int]:
    """Envoy's ``/stats`` text: the counters and gauges with integer values."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            result[name] = int(value)
    return result


def negotiated_cipher(stats: dict[str, int]) -> str:
    """The TLS ciphers and curves Envoy's stats show in use, as ``CIPHER / CURVE``."""
    names = [k.rsplit(".", 1)[1] for k, v in stats.items() if ".ssl.ciphers." in k and v]
    curves = [k.rsplit(".", 1)[1] for k, v in stats.items() if ".ssl.curves." in k and v]
    return f"{','.join(names) or 'unknown'} / {','.join(curves) or 'unknown'}"


HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def waypoint_config(
    *,
    xds_port: int,
    admin_port: int,
    namespace: str,
    gateway: str,
    pod_ip: str = "127.0.0.1",
    static_listeners: list[dict[str, Any]] | None = None,
    static_clusters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An Envoy that subscribes to meshd's Delta ADS feed as the waypoint ``namespace/gateway``.

    The node is an Istio waypoint's (``waypoint~ip~pod.ns~ns.svc.cluster.local``, the
    Gateway named in its labels), so meshd serves it that waypoint's Listener,
    routes, clusters and endpoints. Internal listeners are enabled (the feed's
    ``waypoint`` listener is one); ``static_listeners`` may reach its routes.
    """
    xds = _static_cluster("xds", "127.0.0.1", xds_port)
    xds["typed_extension_protocol_options"] = {
        HTTP_PROTOCOL_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "node": {
            "id": f"waypoint~{pod_ip}~{gateway}.{namespace}~{namespace}.svc.cluster.local",
            "cluster": f"{gateway}.{namespace}",
            "metadata": {
                "NAMESPACE": namespace,
                "LABELS": {"gateway.networking.k8s.io/gateway-name": gateway},
            },
        },
        "admin": _admin(admin_port),
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "listeners": static_listeners or [],
            "clusters": [xds, *(static_clusters or [])],
        },
    }
