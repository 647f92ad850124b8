"""meshd's side of Istio's Telemetry: MeshConfig's providers, where a Telemetry is read
from, and what the waypoint's connection manager gets (``tracing``, ``access_log``).

The waypoint's side (spans, propagation) is tests/unit/waypoint/test_tracing.py and the
Envoy differential tests/interop/test_envoy_waypoint_tracing.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import yaml
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.l7 import envoy, mesh_config
from controlplane.l7.build import build
from controlplane.meshd import Meshd, watch_mesh_config
from controlplane.sources.kube_convert import KINDS, L7_KINDS
from controlplane.sources.local import source_state
from controlplane.state import L7Object
from mesh.accesslog_formats import ISTIO_TEXT_FORMAT
from mesh.cluster import parse_spec
from tests.support.l7world import world
from tests.unit.waypoint.test_tracing import SAMPLE_ALL, telemetry
from tests.unit.waypoint.test_tracing import mesh_config as mesh_config_map


def test_mesh_config_reads_istio_field_names_and_refuses_kinds_it_does_not_run() -> None:
    mesh = mesh_config.parse(
        """
extensionProviders:
- name: otel
  opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4317}
- name: logs
  envoyFileAccessLog: {path: /dev/stdout, logFormat: {labels: {code: '%RESPONSE_CODE%'}}}
- name: ext
  envoyExtAuthzHttp: {service: authz.svc, port: 8000}
- name: broken
  opentelemetry: {port: 4317}
defaultProviders: {tracing: [otel], accessLogging: [logs]}
defaultConfig: {tracing: {sampling: 2.5}}
accessLogFile: /dev/stdout
accessLogEncoding: JSON
trustDomain: cluster.local
"""
    )
    otel = mesh.providers["otel"]
    assert (otel.kind, otel.service, otel.port) == (
        "opentelemetry",
        "otel-collector.observability.svc.cluster.local",
        4317,
    )
    assert mesh.providers["logs"].json_labels == {"code": "%RESPONSE_CODE%"}
    assert "envoy" in mesh.providers and "prometheus" in mesh.providers  # Istio's built-ins
    assert "envoyExtAuthzHttp, which this mesh does not run" in mesh.refused["ext"]
    assert len(mesh.problems) == 1 and "service: is required" in mesh.problems[0]
    assert (mesh.default_tracing, mesh.default_access_logging) == (("otel",), ("logs",))
    assert (mesh.sampling, mesh.access_log_file, mesh.access_log_json) == (2.5, "/dev/stdout", True)
    assert mesh_config.parse("").sampling == 1.0  # Istio's default: 1%
    assert mesh_config.parse("[").problems[0].startswith("mesh config: not YAML")


def _hcm(state: object) -> hcm_pb2.HttpConnectionManager:
    share = build(state).shares["shop/waypoint"]  # type: ignore[arg-type]
    (listener,) = envoy.translate(share).listeners.values()
    for chain in listener.filter_chains:
        if chain.name == "reviews.shop.svc.cluster.local:9080":
            h = hcm_pb2.HttpConnectionManager()
            chain.filters[0].typed_config.Unpack(h)
            return h
    raise AssertionError("no chain for reviews")


def _formats(h: hcm_pb2.HttpConnectionManager) -> list[tuple[str, str]]:
    out = []
    for entry in h.access_log:
        f = file_pb2.FileAccessLog()
        entry.typed_config.Unpack(f)
        kind = f.log_format.WhichOneof("format")
        out.append(
            (
                f.path,
                f.log_format.text_format_source.inline_string
                if kind == "text_format_source"
                else "json",
            )
        )
    return out


def _with_mesh(state: object, extra: str) -> object:
    return replace(state, l7=(*state.l7, mesh_config_map(4317, extra)))  # type: ignore[attr-defined, type-var]


def test_access_logging_follows_meshconfig_then_the_most_specific_telemetry() -> None:
    assert _formats(_hcm(world())) == []  # Istio's default: no access log
    on = _with_mesh(world(), "accessLogFile: /dev/stdout\n")
    assert _formats(_hcm(on)) == [("/dev/stdout", ISTIO_TEXT_FORMAT)]
    json_on = _with_mesh(world(), "accessLogFile: /dev/stdout\naccessLogEncoding: JSON\n")
    assert _formats(_hcm(json_on)) == [("/dev/stdout", "json")]
    off = (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: quiet, namespace: shop}\nspec:\n  accessLogging:\n  - disabled: true\n"
    )
    assert _formats(_hcm(_with_mesh(world(off), "accessLogFile: /dev/stdout\n"))) == []
    envoy_provider = off.replace("- disabled: true", "- providers: [{name: envoy}]")
    assert _formats(_hcm(_with_mesh(world(envoy_provider), ""))) == [
        ("/dev/stdout", ISTIO_TEXT_FORMAT)
    ]


def test_tracing_goes_to_the_hcm_with_the_collector_named_directly() -> None:
    h = _hcm(_with_mesh(world(telemetry(SAMPLE_ALL)), ""))
    t = h.tracing
    assert (t.random_sampling.value, t.client_sampling.value, t.overall_sampling.value) == (
        100.0,
        100.0,
        100.0,
    )
    assert t.provider.name == "envoy.tracers.opentelemetry"
    assert "dns:///127.0.0.1:4317" in t.provider.typed_config.value.decode("latin-1")
    assert {c.tag for c in t.custom_tags} == {"team", "user"}
    assert not _hcm(world()).HasField("tracing")  # no provider anywhere: no tracing


def test_a_collector_service_meshd_knows_is_dialled_at_its_ready_pods() -> None:
    state = world(telemetry(SAMPLE_ALL))
    mesh = (
        "extensionProviders:\n- name: otel\n  opentelemetry:\n"
        "    service: reviews.shop.svc.cluster.local\n    port: 9080\n"
    )
    raw = {"data": {"mesh": mesh}, "metadata": {"name": "istio", "namespace": "istio-system"}}
    cm = L7Object(kind="ConfigMap", namespace="istio-system", name="istio", raw=raw)
    share = build(replace(state, l7=(*state.l7, cm))).shares["shop/waypoint"]
    # the pods' target port (8080), not the service's
    assert share.collectors["otel"] == "ipv4:10.244.1.11:8080,10.244.1.21:8080,10.244.2.12:8080"


def test_a_cluster_file_carries_the_istio_config_map_and_telemetries() -> None:
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": "accessLogFile: /dev/stdout\n"},
        },
        yaml.safe_load(telemetry(SAMPLE_ALL)),
    ]
    cluster = parse_spec(
        {
            "nodes": [{"name": "node1"}],
            "namespaces": [{"name": "shop"}, {"name": "istio-system"}],
            "resources": docs,
        }
    )
    kinds = {o.kind for o in source_state(cluster).l7}
    assert {"ConfigMap", "Telemetry"} <= kinds
    assert ("telemetries" in L7_KINDS) and any(
        k.args == ("telemetry.istio.io", "v1", "telemetries") for k in KINDS
    )


def test_meshd_follows_its_mesh_config_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh"

    async def body() -> None:
        meshd = Meshd()
        meshd.on_source(world())
        task = asyncio.ensure_future(watch_mesh_config(meshd, path, poll_s=0.01))
        try:
            await asyncio.sleep(0.05)
            assert meshd.mesh_config == ""  # missing: Istio's defaults
            path.write_text("accessLogFile: /dev/stdout\n")
            for _ in range(100):
                await asyncio.sleep(0.02)
                share = meshd.l7.shares["shop/waypoint"]
                if share.services[0].telemetry.access_logs:
                    break
            else:
                raise AssertionError("the mesh config's change was not built")
        finally:
            task.cancel()

    asyncio.run(body())
