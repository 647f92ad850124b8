"""Informers: list+watch of one Kubernetes kind each, as client-go's reflector does it.

One thread per kind: list (in pages), then watch from the list's resourceVersion
with bookmarks; on ``410 Gone`` list again and replace that kind's store; on any
other error back off (0.1 s doubling to 30 s, with jitter) and retry, saying why
in one log line. Threads, because the official client blocks. Every object is
converted as it arrives (a bad one is refused alone, as a line in its
:class:`Entry`) and handed to the informer's :class:`Sink`: the Kubernetes source
(:mod:`controlplane.sources.kubernetes`) or the waypoint deployer.

Objects are read as raw JSON (``_preload_content=False``), never as the
client's models: the custom resources have no models, and decoding pods
into models is the slowest part of the client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from controlplane.authz_yaml import InvalidPolicy
from controlplane.l7.reader import InvalidObject

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace or "", name)


@dataclass(frozen=True, slots=True)
class Entry:
    """One object, converted once: its value (None: left out), why it was refused, notes."""

    rv: str
    value: object | None
    rejected: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind an :class:`Informer` follows, and how each object is converted."""

    name: str  # the resource, as in the URL
    singular: str  # for log lines and rejected entries
    api: str  # the client API class
    method: str  # its list method
    convert: Callable[[Obj], Any]
    args: tuple[str, ...] = ()  # group, version, plural for custom objects
    optional: bool = False  # a CRD that may not be installed: 404 means none
    selector: str = ""  # a label selector: only the objects it selects


def _entry(kind: Kind, obj: Obj) -> Entry:
    """Convert one object; a malformed one becomes a line in ``rejected``, never an error."""
    meta = obj.get("metadata") or {}
    rv = str(meta.get("resourceVersion") or "")
    namespace, name = meta.get("namespace"), meta.get("name")
    where = f"{kind.singular} {namespace}/{name}" if namespace else f"{kind.singular} {name}"
    try:
        converted = kind.convert(obj)
    except (InvalidPolicy, InvalidObject) as e:  # they name the object themselves
        return Entry(rv, None, rejected=str(e))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        reason = f"missing {e}" if isinstance(e, KeyError) else str(e)
        return Entry(rv, None, rejected=f"{where}: {reason}")
    if isinstance(converted, tuple):
        return Entry(rv, converted[0], notes=converted[1])
    return Entry(rv, converted)


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class _WatchError(Exception):
    """An ERROR event other than 410: the watch is retried after a backoff."""


class _Stopped(Exception):
    pass


class _Backoff:
    """Exponential backoff with jitter, so informers of many meshds do not retry in step."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s, self.attempts = initial_s, max_s, 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return float(delay * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempts = 0


# What a healthy request may take: connect, then read a page of a list.
CONNECT_TIMEOUT_S = 10.0
LIST_READ_TIMEOUT_S = 60.0


class Sink(Protocol):
    """Where an :class:`Informer` delivers what it learns (called from its thread), and
    the settings it runs with: the source, or another follower such as the deployer."""

    api_client: kubernetes.client.ApiClient
    log: logging.Logger
    log_name: str  # how log lines begin: "kubernetes source"
    stopping: threading.Event
    watch_timeout_s: int
    list_page_size: int
    backoff_initial_s: float
    backoff_max_s: float

    def replace_kind(self, kind: Kind, entries: dict[Key, Entry]) -> None: ...

    def put_object(self, kind: Kind, key: Key, entry: Entry) -> None: ...

    def remove_object(self, kind: Kind, key: Key) -> None: ...


class Informer:
    """List+watch of one kind in its own thread; what it learns goes to its sink."""

    def __init__(self, source: Sink, kind: Kind) -> None:
        self._source = source
        self._kind = kind
        self._lock = threading.Lock()
        self._response: Any = None  # the open urllib3 response, to interrupt
        self.resource_version = ""
        self.events = 0  # a watch that ends without any, within a second, is suspect
        self.missing = False  # the CRD is not installed (said once)
        self.thread = threading.Thread(target=self._run, name=f"kube-{kind.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, deadline: float) -> bool:
        """Join the thread until ``deadline`` (monotonic); False if it is still running."""
        if self.thread.ident is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()

    def interrupt(self) -> None:
        """Unblock the thread's read: shut its socket down (run() is stopping)."""
        with self._lock:
            response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        kind, source = self._kind, self._source
        # Here, not on the loop: the client's first API object takes a second to build.
        api = getattr(kubernetes.client, kind.api)(source.api_client)
        self._call: Callable[..., Any] = getattr(api, kind.method)
        backoff = _Backoff(source.backoff_initial_s, source.backoff_max_s)
        gone_in_a_row = 0
        while not source.stopping.is_set():
            started, events = time.monotonic(), self.events
            error: Exception | None = None
            try:
                if not self.resource_version:
                    self._list()
                self._watch()
            except _Stopped:
                return
            except Exception as e:
                if source.stopping.is_set():
                    return  # the error is the interrupted read
                error = e
            progressed = self.events > events or time.monotonic() - started >= 1.0
            if error is None and progressed:
                backoff.reset()
                gone_in_a_row = 0
                continue
            reason = error_reason(error) if error else "the watch ended within a second, empty"
            if _status(error) == 410:
                self.resource_version = ""
                gone_in_a_row = 1 if progressed else gone_in_a_row + 1
                if gone_in_a_row == 1:
                    source.log.info(
                        "%s: %s: watch expired (410 Gone: %s); listing again",
                        source.log_name,
                        kind.name,
                        reason,
                    )
                    continue
                reason = f"410 Gone again right after listing ({reason})"  # do not spin
            level = logging.WARNING
            if _status(error) == 404 and kind.optional:
                source.replace_kind(kind, {})  # no CRD, no objects: the mesh works without them
                group, version, plural = kind.args
                reason = (
                    f"the API server does not serve {group}/{version} {plural} "
                    "(is the CRD installed?); treating as none"
                )
                backoff.attempts = 30  # check again, at the slowest pace
                level = logging.DEBUG if self.missing else logging.WARNING
                self.missing = True
            delay = backoff.next()
            source.log.log(
                level, "%s: %s: %s; retrying in %.1fs", source.log_name, kind.name, reason, delay
            )
            if source.stopping.wait(delay):
                return

    def _open(self, **kwargs: Any) -> Any:
        if self._kind.selector:
            kwargs["label_selector"] = self._kind.selector
        response = self._call(*self._kind.args, _preload_content=False, **kwargs)
        with self._lock:
            if self._source.stopping.is_set():
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
        """List every page, then replace the kind's store at once (deletions included)."""
        entries: dict[Key, Entry] = {}
        token = ""
        while True:
            pages: dict[str, Any] = {"_continue": token} if token else {}
            response = self._open(
                limit=self._source.list_page_size,
                _request_timeout=(CONNECT_TIMEOUT_S, LIST_READ_TIMEOUT_S),
                **pages,
            )
            clean = False
            try:
                body = json.loads(response.read())
                clean = True
            finally:
                self._done(response, clean)
            for obj in body.get("items") or ():
                key = _key(obj)
                if key is not None:
                    entries[key] = _entry(self._kind, obj)
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        version = str(meta.get("resourceVersion") or "")
        if not version:
            raise ValueError("the list has no metadata.resourceVersion to watch from")
        self._source.replace_kind(self._kind, entries)
        self.resource_version = version

    def _watch(self) -> None:
        """Watch from ``resource_version`` until the server ends the stream."""
        timeout = random.randint(self._source.watch_timeout_s, 2 * self._source.watch_timeout_s)
        response = self._open(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # A read blocks while the watch is quiet; the server ends it after `timeout`.
            _request_timeout=(CONNECT_TIMEOUT_S, timeout + 30.0),
        )
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
                raise _Gone(message)
            raise _WatchError(f"watch error {code}: {message}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        key = _key(obj)
        if kind in ("ADDED", "MODIFIED") and key is not None:
            self._source.put_object(self._kind, key, _entry(self._kind, obj))
        elif kind == "DELETED" and key is not None:
            self._source.remove_object(self._kind, key)
        elif kind != "BOOKMARK":  # a bookmark only moves the version on
            self._source.log.debug(
                "%s: %s: ignored %s event", self._source.log_name, self._kind.name, kind
            )
        if version:
            self.resource_version = version
        self.events += 1


def _key(obj: Obj) -> Key | None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    return (str(meta.get("namespace") or ""), str(name)) if name else None


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
    if isinstance(e, _Gone):
        return 410
    if isinstance(e, ApiException):
        return int(e.status) if e.status else None
    return None


def error_reason(e: BaseException) -> str:
    """One line saying what went wrong, with a hint where one helps."""
    if isinstance(e, ApiException):
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(e.body or "{}").get("message", ""))
        text = f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
        if e.status in (401, 403):
            text += " (are meshd's credentials valid, and does its ClusterRole allow list+watch?)"
        return text
    if isinstance(e, _Gone | _WatchError):
        return str(e)
    return f"{type(e).__name__}: {e}"
