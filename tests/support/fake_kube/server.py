"""The HTTP side: requests as the tests see them, routing each to its verb, and watch
streams (newline-delimited events over chunked transfer encoding, bookmarks, 410 Gone)."""

from __future__ import annotations

import bisect
import json
import select
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from tests.support.fake_kube.auth import TOKEN_REVIEWS, token_review
from tests.support.fake_kube.errors import ApiError, status
from tests.support.fake_kube.resources import RESOURCES, Obj, Resource, render, route_of
from tests.support.fake_kube.selectors import selected_as, selector_for

if TYPE_CHECKING:
    from tests.support.fake_kube.kube import FakeKube


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    content_type: str = ""
    body: bytes = b""
    token: str = ""  # the bearer token it carried: which client made it

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    kube: FakeKube

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client going away is no error
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked encoding, as the API server
    server: Server

    def setup(self) -> None:
        super().setup()
        # As Go's net/http: without it, Nagle and delayed ACKs add 40 ms to each response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.kube._cond:
            self.server.kube._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.kube._cond:
            self.server.kube._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read FakeKube.requests instead

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        kube = self.server.kube
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type") or ""
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        request = Request(method, url.path, query, content_type, body, token)
        route = route_of(url.path)
        with kube._cond:
            hook = next(
                (h for h in kube._before if route and h[:2] == (method, route.resource)), None
            )
            if hook is not None:
                kube._before.remove(hook)
        if hook is not None:
            hook[2]()
        with kube._cond:
            kube.requests.append(request)
            failing = kube._fail_next > 0
            kube._fail_next -= failing
            failing = failing or any(
                t == token and r in (None, route and route.resource) for t, r in kube._refused
            )
        try:
            if failing:
                raise ApiError(
                    status(
                        500,
                        "InternalError",
                        "Internal error occurred: etcdserver: request timed out",
                    )
                )
            if method == "POST" and url.path == TOKEN_REVIEWS:
                self._send_json(201, token_review(kube._tokens, json.loads(body or b"{}")))
                return
            if (
                route is None
                or kube._stores[route.resource].missing
                or (route.subresource and not RESOURCES[route.resource].status)
            ):
                raise ApiError(
                    status(404, "NotFound", "the server could not find the requested resource")
                )
            resource, namespace, name, sub = route
            try:
                decoded = json.loads(body) if body else {}
            except ValueError:
                raise ApiError(status(400, "BadRequest", "the body is not JSON")) from None
            if method == "POST" and not name:
                self._send_json(201, kube._create(resource, namespace, decoded))
            elif method == "GET" and name:
                self._send_json(200, kube._get_one(resource, namespace, name))
            elif method == "GET" and request.watch:
                self._watch(resource, namespace, query)
            elif method == "GET":
                self._send_json(200, kube._list(resource, namespace, query))
            elif method == "PUT" and name:
                self._send_json(200, kube._replace(resource, namespace, name, sub, decoded))
            elif method == "PATCH" and name:
                self._send_json(
                    200, kube._patch(resource, namespace, name, sub, decoded, content_type)
                )
            elif method == "DELETE" and name and not sub:
                self._send_json(
                    200, kube._delete_request(resource, namespace, name, decoded, query)
                )
            else:
                raise ApiError(status(405, "MethodNotAllowed", f"{method} is not supported"))
        except ApiError as e:
            self._send_json(e.body["code"], e.body)

    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, resource: str, namespace: str | None, query: Mapping[str, str]) -> None:
        kube = self.server.kube
        res = RESOURCES[resource]
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        selects = selector_for(resource, query)
        with kube._cond:
            store = kube._stores[resource]
            epoch, closes, bookmark_seen = store.epoch, kube._closes, kube._bookmarks
            lines: list[Obj] = []
            requested = query.get("resourceVersion") or "0"
            if requested == "0":  # "any version": start with the current objects
                cursor = kube._rv
                lines = [
                    {"type": "ADDED", "object": render(res, obj)}
                    for key, obj in sorted(store.objects.items())
                    if (namespace is None or key[0] == namespace) and selects(obj)
                ]
            else:
                cursor = int(requested)
                if cursor < store.floor:
                    message = f"too old resource version: {cursor} ({store.floor})"
                    if store.gone_as_http:
                        raise ApiError(status(410, "Expired", message))
                    epoch = -1  # answered at once with the 410 event
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ended = False
        while True:
            with kube._cond:
                while not lines and not ended:
                    if store.epoch != epoch:  # compacted: nothing more is delivered
                        ended = True
                        if epoch == -1 or not store.gone_as_http:
                            message = f"too old resource version: {cursor} ({store.floor})"
                            gone = status(410, "Expired", message)
                            lines.append({"type": "ERROR", "object": gone})
                        break
                    start = bisect.bisect_right(store.history_rvs, cursor)
                    for event in store.history[start:]:
                        if namespace is not None and event.namespace != namespace:
                            continue
                        seen = selected_as(event, selects)
                        if seen is not None:
                            lines.append({"type": seen, "object": render(res, event.obj)})
                    if store.history:
                        cursor = max(cursor, store.history_rvs[-1])
                    if bookmarks and kube._bookmarks != bookmark_seen:
                        bookmark_seen, cursor = kube._bookmarks, kube._rv
                        lines.append({"type": "BOOKMARK", "object": _bookmark(res, cursor)})
                    remaining = deadline - time.monotonic()
                    if lines:
                        break
                    # Pending events first, then an end: a closed watch loses nothing.
                    if kube._stopping or kube._closes != closes or remaining <= 0:
                        ended = True
                    elif self._peer_closed():
                        self.close_connection = True
                        return
                    else:
                        kube._cond.wait(min(remaining, 0.2))
            try:
                for line in lines:
                    data = json.dumps(line).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                lines = []
                if ended:
                    self.wfile.write(b"0\r\n\r\n")
                    return
            except OSError:
                self.close_connection = True
                return

    def _peer_closed(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True


def _bookmark(res: Resource, rv: int) -> Obj:
    # What the API server sends: an empty object of the kind, only the version set.
    obj: Obj = {
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
    }
    if res.plural == "pods":
        obj["spec"] = {"containers": None}
        obj["status"] = {}
    return obj
