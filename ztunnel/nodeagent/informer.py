"""List+watch of one kind from the API server, as client-go's reflector does it.

The node agent's own, smaller copy of meshd's informers (``ztunnel`` may not
import ``controlplane``): one thread per kind; list (in pages), then watch
from the list's ``resourceVersion`` with bookmarks; on ``410 Gone`` (an
``ERROR`` event or the HTTP status) list again and replace what the kind
held; on any other failure back off (0.2 s doubling to 30 s, with jitter) and
retry. What it learns goes to a :class:`Sink` as raw JSON objects, read with
``_preload_content=False`` (the client's models are slow to build and only a
few fields are needed). A watch ends by itself after a few minutes
(``timeoutSeconds``) and is opened again from the last version seen, so a
quiet cluster costs one request per kind every few minutes, not a list.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

Obj = Mapping[str, Any]

CONNECT_TIMEOUT_S = 10.0
LIST_READ_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind an :class:`Informer` follows."""

    name: str  # the resource, as in the URL and the ClusterRole: "pods"
    method: str  # the CoreV1Api method that lists (and, with watch=True, watches) it
    field_selector: str = ""  # only the objects it selects: "spec.nodeName=kind-worker"


class Sink(Protocol):
    """Where an informer delivers what it learns (called from its thread)."""

    def replace(self, kind: str, objects: list[Obj]) -> None:
        """After each list: every object of the kind (those not in it are gone)."""

    def put(self, kind: str, obj: Obj) -> None: ...

    def remove(self, kind: str, obj: Obj) -> None: ...

    def failing(self, kind: str, reason: str) -> None:
        """Why the kind cannot be followed right now; ``""`` once it can again."""


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class WatchError(Exception):
    """An ERROR event other than 410."""


class _Stopped(Exception):
    pass


class Informer:
    """List+watch of one kind in its own thread."""

    def __init__(
        self,
        call: Callable[..., Any],
        kind: Kind,
        sink: Sink,
        *,
        watch_timeout_s: int = 300,
        page_size: int = 500,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._call = call
        self.kind = kind
        self._sink = sink
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.resource_version = ""
        self.lists = 0  # lists done, relists after 410 included
        self.events = 0  # watch events applied, bookmarks included
        self.synced = threading.Event()  # listed once
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None  # the open response, to interrupt
        self._thread = threading.Thread(target=self._run, name=f"kube-{kind.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop: unblock the thread's read (shut its socket down), then join it."""
        self._stopping.set()
        with self._lock:
            response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        attempts = 0
        gone_in_a_row = 0
        while not self._stopping.is_set():
            started, events = time.monotonic(), self.events
            error: Exception | None = None
            try:
                if not self.resource_version:
                    self._list()
                self._watch()
            except _Stopped:
                return
            except Exception as e:  # the client raises many kinds: each means "not now"
                if self._stopping.is_set():
                    return  # the error is the interrupted read
                error = e
            progressed = self.events > events or time.monotonic() - started >= 1.0
            if progressed:
                gone_in_a_row = 0
                if error is None:
                    attempts = 0  # a watch that ran its course
                    continue
            if _status(error) == 410:
                self.resource_version = ""
                gone_in_a_row += 1
                if gone_in_a_row == 1:
                    continue  # list again at once; only a second 410 in a row waits
            reason = _reason(error) if error else "the watch ended within a second, empty"
            self._sink.failing(self.kind.name, reason)
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempts, 30))
            attempts += 1
            if self._stopping.wait(delay * random.uniform(0.5, 1.0)):
                return

    def _open(self, **kwargs: Any) -> Any:
        if self.kind.field_selector:
            kwargs["field_selector"] = self.kind.field_selector
        response = self._call(_preload_content=False, **kwargs)
        with self._lock:
            if self._stopping.is_set():
                response.close()
                response.release_conn()
                raise _Stopped
            self._response = response
        return response

    def _done(self, response: Any, clean: bool) -> None:
        with self._lock:
            self._response = None
        if not clean:
            response.close()  # mid-stream: the connection cannot be reused
        response.release_conn()

    def _list(self) -> None:
        """List every page, then hand the whole kind over at once (deletions included)."""
        objects: list[Obj] = []
        token = ""
        while True:
            pages: dict[str, Any] = {"_continue": token} if token else {}
            response = self._open(
                limit=self.page_size,
                _request_timeout=(CONNECT_TIMEOUT_S, LIST_READ_TIMEOUT_S),
                **pages,
            )
            clean = False
            try:
                body = json.loads(response.read())
                clean = True
            finally:
                self._done(response, clean)
            objects.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        version = str(meta.get("resourceVersion") or "")
        if not version:
            raise ValueError("the list has no metadata.resourceVersion to watch from")
        self._sink.replace(self.kind.name, objects)
        self._sink.failing(self.kind.name, "")
        self.resource_version = version
        self.lists += 1
        self.synced.set()

    def _watch(self) -> None:
        """Watch from :attr:`resource_version` until the server ends the stream."""
        timeout = random.randint(self.watch_timeout_s, 2 * self.watch_timeout_s)
        response = self._open(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # A read blocks while the watch is quiet; the server ends it after `timeout`.
            _request_timeout=(CONNECT_TIMEOUT_S, timeout + 30.0),
        )
        self._sink.failing(self.kind.name, "")
        clean = False
        try:
            for line in _lines(response):
                self._apply(json.loads(line))
            clean = True
        finally:
            self._done(response, clean)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code, message = obj.get("code"), obj.get("message") or obj.get("reason") or ""
            if code == 410:
                raise Gone(message)
            raise WatchError(f"watch error {code}: {message}")
        if kind in ("ADDED", "MODIFIED"):
            self._sink.put(self.kind.name, obj)
        elif kind == "DELETED":
            self._sink.remove(self.kind.name, obj)
        # BOOKMARK (and anything new): only the version moves on.
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if version:
            self.resource_version = version
        self.events += 1


def _lines(response: Any) -> Iterator[bytes]:
    """The watch stream's lines, as chunks arrive (one event may span chunks)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())
    if buffer.strip():
        yield buffer


def _status(e: Exception | None) -> int | None:
    """The HTTP status an error stands for: 410 for an expired watch, however it came."""
    if isinstance(e, Gone):
        return 410
    if isinstance(e, ApiException):
        return int(e.status) if e.status else None
    return None


def _reason(e: BaseException) -> str:
    """One line saying what went wrong, with a hint where one helps."""
    if isinstance(e, ApiException):
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(e.body or "{}").get("message", ""))
        text = f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
        if e.status in (401, 403):
            text += " (does the node agent's ClusterRole allow list and watch?)"
        return text
    if isinstance(e, Gone | WatchError):
        return str(e)
    return f"{type(e).__name__}: {e}"
