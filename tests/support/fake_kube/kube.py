"""``FakeKube``: the server, its lifecycle, and the controls the tests steer it with."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.support.fake_kube.api import Api
from tests.support.fake_kube.auth import API_AUDIENCE, TOKEN_REVIEWS, TokenInfo
from tests.support.fake_kube.resources import route_of
from tests.support.fake_kube.server import Handler, Request, Server


class FakeKube(Api):
    """The server and its controls. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        first_resource_version: int = 1000,
        garbage_collector: bool = True,
    ) -> None:
        super().__init__(
            missing=missing,
            first_resource_version=first_resource_version,
            garbage_collector=garbage_collector,
        )
        self._fail_next = 0
        self._refused: list[tuple[str, str | None]] = []  # (token, resource or None: any)
        self._tokens: dict[str, TokenInfo] = {}
        self._before: list[tuple[str, str, Callable[[], object]]] = []
        self._stopping = False
        self._connections: set[socket.socket] = set()
        self.requests: list[Request] = []
        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.kube = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-kube"
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every stream and connection, then join every server thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, token: str = "fake-admin-token") -> Path:
        """A kubeconfig naming this server, as ``kind get kubeconfig`` would (JSON is YAML)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kind-fake", "cluster": {"server": self.url}}],
            "users": [{"name": "kind-fake", "user": {"token": token}}],
            "contexts": [
                {"name": "kind-fake", "context": {"cluster": "kind-fake", "user": "kind-fake"}}
            ],
            "current-context": "kind-fake",
        }
        path.write_text(json.dumps(config))
        return path

    # -- controls --------------------------------------------------------------------------

    def fail_next(self, n: int) -> None:
        """The next ``n`` requests, whatever they are, fail with 500 Internal Server Error."""
        with self._cond:
            self._fail_next = n

    @contextmanager
    def refusing(self, token: str, resource: str | None = None) -> Iterator[None]:
        """While inside, every request bearing ``token`` (to ``resource``, or to any) fails
        with 500, as an API server that cannot reach etcd answers; other clients are served."""
        entry = (token, resource)
        with self._cond:
            self._refused.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._refused.remove(entry)

    def before(self, method: str, resource: str, action: Callable[[], object]) -> None:
        """Run ``action`` once, just before the next ``method`` request on ``resource`` is
        served: another client's write landing between two of the tested client's requests."""
        with self._cond:
            self._before.append((method, resource, action))

    def add_token(
        self,
        token: str,
        *,
        namespace: str,
        service_account: str,
        node: str | None = None,
        pod: str | None = None,
        audiences: Sequence[str] = (API_AUDIENCE,),
    ) -> None:
        """A bound service account token the TokenReview API will vouch for."""
        self._tokens[token] = TokenInfo(namespace, service_account, node, pod, tuple(audiences))

    def writes(self, resource: str | None = None) -> list[Request]:
        """The write requests served (POST, PUT, PATCH, DELETE; not TokenReviews), in order."""
        with self._cond:
            requests = list(self.requests)
        return [
            r
            for r in requests
            if r.method in ("POST", "PUT", "PATCH", "DELETE")
            and r.path != TOKEN_REVIEWS
            and (resource is None or ((route := route_of(r.path)) and route.resource == resource))
        ]

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.method == "GET" and not r.watch]

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.watch]

    def _matching(self, resource: str) -> list[Request]:
        """Requests to a collection of ``resource``, not to one of its objects."""
        with self._cond:
            requests = list(self.requests)
        routes = [(r, route_of(r.path)) for r in requests]
        return [r for r, route in routes if route and route.resource == resource and not route.name]
