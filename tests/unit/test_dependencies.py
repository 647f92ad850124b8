"""The environment's packages fit together: what a bad install order breaks shows here,
named, instead of as a waypoint that cannot start."""

from __future__ import annotations


def test_opentelemetry_protos_are_opentelemetry_s_own() -> None:
    """xds-protos ships an older copy of opentelemetry/proto/ (no InstrumentationScope);
    `make venv` and deploy/Containerfile reinstall opentelemetry-proto after it."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope"), (
        "opentelemetry/proto/ is xds-protos' older copy: reinstall opentelemetry-proto "
        "(pip install --force-reinstall --no-deps opentelemetry-proto==VERSION)"
    )
    # What the waypoint's tracer imports, and Envoy's tracing config beside it.
    from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert OTLPSpanExporter is not None
