"""``meshlab app echo``: echo-basic's JSON over HTTP/1.1, h2c and gRPC, on real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import uvloop
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded

from meshlab.apps import echo

POD = {"pod": "echo-1", "namespace": "server", "node": "node1", "ip": "10.244.1.2"}
Headers = dict[str, str]
Scenario = Callable[[echo.EchoServer], Awaitable[None]]


def run(scenario: Scenario, **settings: Any) -> None:
    """Serve on 127.0.0.1 (ephemeral ports) while ``scenario`` runs, then stop."""

    async def main() -> None:
        base: dict[str, Any] = {"ports": (0,), "address": "127.0.0.1", "version": "v2", **POD}
        server = echo.EchoServer(echo.Settings(**(base | settings)))
        await server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def read_reply(
    sock: socket.socket, buf: bytearray, *, head: bool = False
) -> tuple[int, Headers, bytes]:
    """One HTTP/1.1 response from ``sock``: status, headers (lowercase names), body."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {bytes(buf)!r}"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = buf[:end].decode().split("\r\n")
    del buf[: end + 4]
    headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    length = 0 if head else int(headers.get("content-length", 0))
    while len(buf) < length:
        buf += sock.recv(65536)
    body = bytes(buf[:length])
    del buf[:length]
    return int(lines[0].split()[1]), headers, body


def h1(port: int, *messages: bytes, heads: tuple[bool, ...] = ()) -> list[tuple[int, Headers, Any]]:
    """Send ``messages`` on one connection, one at a time, and read a reply to each."""
    out: list[tuple[int, Headers, Any]] = []
    buf = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for i, message in enumerate(messages):
            sock.sendall(message)
            status, headers, body = read_reply(sock, buf, head=i < len(heads) and heads[i])
            out.append((status, headers, json.loads(body) if body else None))
    return out


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: echo.server", *extra, "", ""]).encode()


def test_keep_alive_echoes_request_and_pod_in_echo_basic_shape() -> None:
    async def scenario(server: echo.EchoServer) -> None:
        first, second = await asyncio.to_thread(
            h1, server.ports[0], get("/a?x=1", "user-agent: t", "x-header-SET: 1"), get("/b")
        )
        status, headers, doc = first
        assert status == 200 and headers["content-type"] == "application/json"
        assert {k: doc[k] for k in ("path", "host", "method", "proto")} == {
            "path": "/a?x=1",
            "host": "echo.server",
            "method": "GET",
            "proto": "HTTP/1.1",
        }
        assert doc["headers"] == {"User-Agent": ["t"], "X-Header-Set": ["1"]}
        assert {k: doc[k] for k in POD} == POD and doc["version"] == "v2"
        assert doc["client"].startswith("127.0.0.1:") and doc["bodyBytes"] == 0
        assert second[2]["path"] == "/b" and second[2]["client"] == doc["client"]

    run(scenario)


def test_chunked_post_expect_continue_head_pipelining_and_close() -> None:
    def client(port: int) -> None:
        buf = bytearray()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            assert read_reply(sock, buf, head=True)[0] == 100
            sock.sendall(b"5;ext=1\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nT: 1\r\n\r\n")
            _, _, body = read_reply(sock, buf)
            doc = json.loads(body)
            assert doc["bodyBytes"] == 21 and "Transfer-Encoding" not in doc["headers"]
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
            status, headers, body = read_reply(sock, buf, head=True)
            assert status == 200 and int(headers["content-length"]) > 100 and body == b""
            # Pipelined: the slow one first, and the answers keep the order.
            sock.sendall(get("/delay/0.2") + get("/fast", "Connection: close"))
            paths = [json.loads(read_reply(sock, buf)[2])["path"] for _ in range(2)]
            assert paths == ["/delay/0.2", "/fast"]
            assert sock.recv(1) == b"", "Connection: close must close"

    run(lambda server: asyncio.to_thread(client, server.ports[0]))


def test_garbage_gets_400_in_json_and_close() -> None:
    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            status, headers, body = read_reply(sock, bytearray())
            assert status == 400 and "message" in json.loads(body)
            assert headers["connection"] == "close" and sock.recv(1) == b""

    run(lambda server: asyncio.to_thread(client, server.ports[0]))


def test_status_and_delay_routes() -> None:
    async def scenario(server: echo.EchoServer) -> None:
        start = time.monotonic()
        replies = await asyncio.to_thread(
            h1, server.ports[0], get("/status/503"), get("/status/20"), get("/delay/0.2")
        )
        assert time.monotonic() - start >= 0.2
        assert [status for status, _, _ in replies] == [503, 400, 200]
        assert replies[0][2]["path"] == "/status/503", "the body is still the echo"
        (bad,) = await asyncio.to_thread(h1, server.ports[0], get("/?delay=soon"))
        assert bad[0] == 500 and "invalid duration" in bad[2]["message"]

    run(scenario)


def test_status_flag_fails_every_request_on_every_port() -> None:
    async def scenario(server: echo.EchoServer) -> None:
        for port in server.ports:
            replies = await asyncio.to_thread(h1, port, get("/"), get("/status/200"))
            assert [status for status, _, _ in replies] == [500, 500]

    run(scenario, status=500, ports=(0, 0))


def test_header_names_canonical_as_go_and_echo_set_header() -> None:
    cases = {"user-agent": "User-Agent", "X-HEADER-set": "X-Header-Set", "x--a": "X--A"}
    cases |= {"te": "Te", "foo bar": "foo bar", "x_y": "X_y", "1a-b": "1a-B"}
    assert {name: echo.canonical_header_key(name) for name in cases} == cases
    reply = echo.Responder(echo.Settings())(
        echo.Request(
            method="GET",
            target="/",
            host="h",
            proto="HTTP/1.1",
            headers={"X-Echo-Set-Header": ["X-A: 1, X-A:2", "Content-Length: 9, X-B:b"]},
            body_bytes=0,
            client="1.2.3.4:5",
        )
    )
    assert ("X-A", "1,2") in reply.headers and ("X-B", "b") in reply.headers
    assert [v for k, v in reply.headers if k == "Content-Length"] == [str(len(reply.body))]
    assert echo.parse_go_duration("1m1.5s") == 61.5 and echo.parse_go_duration("250ms") == 0.25


def h2c(port: int, *requests: tuple[list[tuple[str, str]], bytes]) -> list[tuple[Headers, bytes]]:
    """Send every request on its own stream of one h2c connection; their answers, in order."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    answers: dict[int, list[Any]] = {}
    unsent: dict[int, bytes] = {}

    def pump() -> None:  # request bodies, as far as the server's flow-control window goes
        for sid, data in list(unsent.items()):
            size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if size <= 0:
                continue
            conn.send_data(sid, data[:size], end_stream=size >= len(data))
            unsent[sid] = data[size:]
            if not unsent[sid]:
                del unsent[sid]

    with socket.create_connection(("127.0.0.1", port)) as sock:
        for headers, body in requests:
            sid = conn.get_next_available_stream_id()
            answers[sid] = [{}, b"", False]
            conn.send_headers(sid, headers, end_stream=not body)
            if body:
                unsent[sid] = body
        pump()
        sock.sendall(conn.data_to_send())
        while not all(done for _, _, done in answers.values()):
            data = sock.recv(65536)
            assert data, "server closed the h2c connection"
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    answers[event.stream_id][0] = dict(event.headers)
                elif isinstance(event, DataReceived):
                    answers[event.stream_id][1] += event.data
                    conn.acknowledge_received_data(len(event.data), event.stream_id)
                elif isinstance(event, StreamEnded):
                    answers[event.stream_id][2] = True
            pump()
            sock.sendall(conn.data_to_send())
    return [(headers, body) for headers, body, _ in answers.values()]


def test_h2c_prior_knowledge_on_the_http_port() -> None:
    def req(method: str, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        base = [(":method", method), (":path", path), (":scheme", "http")]
        return [*base, (":authority", "echo.server:80"), *extra]

    async def scenario(server: echo.EchoServer) -> None:
        (get_h, get_b), (post_h, post_b), (head_h, head_b), (st_h, _) = await asyncio.to_thread(
            h2c,
            server.ports[0],
            (req("GET", "/delay/0.1?q", ("x-header-set", "a"), ("x-header-set", "b")), b""),
            (req("POST", "/p"), b"z" * 70000),  # more than the initial flow-control window
            (req("HEAD", "/"), b""),
            (req("GET", "/status/503"), b""),
        )
        doc = json.loads(get_b)
        assert get_h[":status"] == "200" and doc["proto"] == "HTTP/2.0"
        assert doc["path"] == "/delay/0.1?q" and doc["host"] == "echo.server:80"
        assert doc["headers"] == {"X-Header-Set": ["a", "b"]} and doc["pod"] == "echo-1"
        assert json.loads(post_b)["bodyBytes"] == 70000 and post_h[":status"] == "200"
        assert head_b == b"" and int(head_h["content-length"]) > 100
        assert st_h[":status"] == "503"

    run(scenario)


def echo_response_class() -> Any:
    """EchoResponse built by protobuf itself from echo-basic's schema: checks our encoder."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="t_echo.proto", package="t", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, str]) -> None:
        proto = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            label = f.LABEL_REPEATED if kind == "Header" else f.LABEL_OPTIONAL
            typ = f.TYPE_STRING if kind == "string" else f.TYPE_MESSAGE
            type_name = "" if kind == "string" else f".t.{kind}"
            proto.field.add(name=field_name, number=number, label=label, type=typ)
            if type_name:
                proto.field[-1].type_name = type_name

    message("Header", ("key", 1, "string"), ("value", 2, "string"))
    names = ("namespace", "ingress", "service_name", "pod")
    message("Context", *((name, i, "string") for i, name in enumerate(names, 1)))
    message(
        "Assertions",
        ("fully_qualified_method", 1, "string"),
        ("headers", 2, "Header"),
        ("authority", 3, "string"),
        ("context", 4, "Context"),
    )
    message("EchoResponse", ("assertions", 1, "Assertions"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.EchoResponse"))


def test_grpc_echo_and_echotwo_carry_method_metadata_and_pod() -> None:
    response_class = echo_response_class()

    async def scenario(server: echo.EchoServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            for method in ("Echo", "EchoTwo"):
                full = f"/{echo.GRPC_SERVICE}/{method}"
                raw = await channel.unary_unary(full)(b"", metadata=[("x-test", method)])
                decoded = response_class.FromString(raw).assertions
                assert decoded.fully_qualified_method == full
                assert ("x-test", method) in [(h.key, h.value) for h in decoded.headers]
                assert (decoded.context.namespace, decoded.context.pod) == ("server", "echo-1")
                ours = echo.decode_echo_response(raw)
                assert (
                    ours["fullyQualifiedMethod"] == full and ["x-test", method] in ours["headers"]
                )
                assert ours["context"]["pod"] == "echo-1"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await channel.unary_unary(f"/{echo.GRPC_SERVICE}/EchoThree")(b"")
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(scenario, grpc_port=0)


def test_grpc_echo_fails_as_the_status_flag_says() -> None:
    async def scenario(server: echo.EchoServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary(f"/{echo.GRPC_SERVICE}/Echo")(b"")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario, grpc_port=0, status=503)


def test_main_says_where_it_listens_and_drains_on_sigterm() -> None:
    code = "import sys; from meshlab.apps import echo; sys.exit(echo.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "--port", "0", "--address", "127.0.0.1"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("echo: listening on 127.0.0.1:") and "(http, h2c)" in line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(get("/delay/0.5"))
            time.sleep(0.1)
            proc.terminate()  # SIGTERM while the request waits: it is still answered
            status, headers, body = read_reply(sock, bytearray())
        assert status == 200 and headers["connection"] == "close"
        assert json.loads(body)["path"] == "/delay/0.5"
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == "", "no per-request logging without --log"
