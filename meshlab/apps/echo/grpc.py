"""The gRPC echo: echo-basic's service over ``grpcio``, with protobuf encoded by hand.

``--grpc PORT`` serves echo-basic's gRPC service with ``grpcio``, without
generated code: the handlers take and return raw bytes, encoded here by hand.
Service ``gateway_api_conformance.echo_basic.grpcecho.GrpcEcho``, methods
``Echo`` and ``EchoTwo`` (``EchoThree`` is unimplemented, as upstream). The
request ``EchoRequest`` is empty; the response, in proto3 wire format::

    EchoResponse { Assertions assertions = 1; }
    Assertions   { string fully_qualified_method = 1;  // "/<service>/Echo"
                   repeated Header headers = 2;         // request metadata
                   string authority = 3;                // always "": grpcio hides it
                   Context context = 4;
                   /* TLSAssertions tls_assertions = 5: never, no TLS here */ }
    Header       { string key = 1; string value = 2; }
    Context      { string namespace = 1; string ingress = 2;
                   string service_name = 3; string pod = 4; }

``decode_echo_response`` reads one back, for tests and demos.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from meshlab.apps.echo.connection import address
from meshlab.apps.echo.settings import Settings

GRPC_SERVICE = "gateway_api_conformance.echo_basic.grpcecho.GrpcEcho"


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_field(number: int, payload: bytes, *, always: bool = False) -> bytes:
    """One length-delimited field (wire type 2); proto3 leaves out empty ones."""
    if not payload and not always:
        return b""
    return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def _pb_fields(data: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of one message, in order; other wire types skipped."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _pb_read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _pb_read_varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _pb_read_varint(data, pos)
            fields.append((key >> 3, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
    if pos != len(data):
        raise ValueError("protobuf message truncated")
    return fields


def _pb_read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("protobuf varint truncated")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_echo_response(
    *,
    method: str,
    headers: Sequence[tuple[str, str | bytes]],
    authority: str,
    context: Mapping[str, str],
) -> bytes:
    """An ``EchoResponse`` (see the module docstring), serialised."""
    pairs = b"".join(
        _pb_field(
            2,
            _pb_field(1, key.encode())
            + _pb_field(2, value if isinstance(value, bytes) else value.encode()),
            always=True,
        )
        for key, value in headers
    )
    ctx = b"".join(
        _pb_field(number, context.get(name, "").encode())
        for number, name in enumerate(("namespace", "ingress", "serviceName", "pod"), 1)
    )
    assertions = (
        _pb_field(1, method.encode())
        + pairs
        + _pb_field(3, authority.encode())
        + _pb_field(4, ctx, always=True)
    )
    return _pb_field(1, assertions, always=True)


def decode_echo_response(data: bytes) -> dict[str, Any]:
    """An ``EchoResponse`` as protobuf's JSON mapping names it (``fullyQualifiedMethod``...)."""
    out: dict[str, Any] = {
        "fullyQualifiedMethod": "",
        "headers": [],
        "authority": "",
        "context": {},
    }
    for number, assertions in _pb_fields(data):
        if number != 1:
            continue
        for field, value in _pb_fields(assertions):
            if field == 1:
                out["fullyQualifiedMethod"] = value.decode()
            elif field == 2:
                header = dict(_pb_fields(value))
                out["headers"].append([header.get(1, b"").decode(), header.get(2, b"").decode()])
            elif field == 3:
                out["authority"] = value.decode()
            elif field == 4:
                names = {1: "namespace", 2: "ingress", 3: "serviceName", 4: "pod"}
                ctx = {names[n]: v.decode() for n, v in _pb_fields(value) if n in names}
                out["context"] = {name: ctx.get(name, "") for name in names.values()}
    return out


def grpc_status_for(http_status: int) -> str:
    """gRPC's mapping of an HTTP status to a status code name (http-grpc-status-mapping.md)."""
    mapped = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
    mapped |= {404: "UNIMPLEMENTED", 429: "UNAVAILABLE", 502: "UNAVAILABLE"}
    mapped |= {503: "UNAVAILABLE", 504: "UNAVAILABLE"}
    return mapped.get(http_status, "UNKNOWN")


async def start_grpc_server(settings: Settings, port: int) -> tuple[Any, int]:
    """A started ``grpc.aio`` server for ``Echo`` and ``EchoTwo`` and the port it bound."""
    # Imported here: grpc costs a tenth of a second at start, and most pods never use it.
    grpc = importlib.import_module("grpc")
    server = grpc.aio.server()
    fail = settings.status
    context = {
        "namespace": settings.namespace,
        "ingress": settings.ingress,
        "serviceName": settings.service,
        "pod": settings.pod,
    }

    def handler(name: str) -> Any:
        full_method = f"/{GRPC_SERVICE}/{name}"

        async def echo(request: bytes, ctx: Any) -> bytes:
            if fail is not None and fail >= 400:
                code = getattr(grpc.StatusCode, grpc_status_for(fail))
                await ctx.abort(code, f"echo: --status {fail}")
            metadata = [(m.key, m.value) for m in ctx.invocation_metadata() or ()]
            if settings.log:
                print(f"echo: src.addr={ctx.peer()} grpc={full_method}", file=sys.stderr)
            return encode_echo_response(
                method=full_method, headers=metadata, authority="", context=context
            )

        return grpc.unary_unary_rpc_method_handler(echo)

    handlers = {name: handler(name) for name in ("Echo", "EchoTwo")}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers)])
    bound = server.add_insecure_port(address(settings.address, port))
    await server.start()
    return server, bound
