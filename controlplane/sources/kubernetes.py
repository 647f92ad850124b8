"""The Kubernetes source: list+watch the API server into one :class:`SourceState`.

One informer per kind (:mod:`controlplane.sources.kube_informer`), for the kinds
of :mod:`controlplane.sources.kube_convert`, which converts each object as it
arrives (so a bad object is refused alone, and logged once per resourceVersion).
What the informer threads learn is handed to the asyncio loop, which publishes a
whole new state at most once per ``publish_interval_s``, and only after every
kind has been listed once, so meshd never serves a half-listed world.

The API server as an authenticator, and how to reach it, are
:mod:`controlplane.sources.kube_client`'s; re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import kubernetes.client

from controlplane.sources.kube_client import (
    KubernetesConfigError,
    TokenReviewResult,
    api_client_from,
    review_token,
)
from controlplane.sources.kube_convert import KINDS, L7_KINDS, LAST_APPLIED, ServiceAccountInfo
from controlplane.sources.kube_informer import Entry, Informer, Key, Kind
from controlplane.state import (
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    L7Object,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    SourceState,
    WaypointInfo,
)

__all__ = [
    "LAST_APPLIED",
    "KubernetesConfigError",
    "KubernetesSource",
    "ServiceAccountInfo",
    "TokenReviewResult",
    "api_client_from",
    "review_token",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class KubernetesSource:
    """Follows the API server; publishes a whole :class:`SourceState` on every change.

    ``on_change`` is called on the event loop that runs :meth:`run`, with bursts
    of changes coalesced into one publication per ``publish_interval_s``.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        on_change: Callable[[SourceState], None],
        trust_domain: str = "cluster.local",
        cluster_id: str = "Kubernetes",
        root_namespace: str = "istio-system",
        logger: logging.Logger = log,
        publish_interval_s: float = 0.05,
        watch_timeout_s: int = 300,
        list_page_size: int = 500,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.api_client = api_client
        self.log = logger
        self.log_name = "kubernetes source"
        self.publish_interval_s = publish_interval_s
        self._last_publish = float("-inf")
        self.watch_timeout_s = watch_timeout_s
        self.list_page_size = list_page_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.stopping = threading.Event()
        self._on_change = on_change
        self._empty = SourceState(
            trust_domain=trust_domain, cluster_id=cluster_id, root_namespace=root_namespace
        )
        self._state = self._empty
        self.latest: SourceState | None = None  # None until every kind has been listed
        # Written by the informer threads, read by the loop: all under _lock.
        self._lock = threading.Lock()
        self._stores: dict[str, dict[Key, Entry]] = {kind.name: {} for kind in KINDS}
        self._synced: set[str] = set()
        self._dirty = False
        # Each kind's values as last published, redone only for the kinds that changed.
        self._published: dict[str, tuple[tuple[Any, ...], tuple[str, ...]]] = {}
        self._dirty_kinds: set[str] = set()
        self._wake_pending = False
        # Loop side.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publish_handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def state(self) -> SourceState:
        """The latest published state (empty until every kind has been listed once)."""
        return self._state

    def describe(self) -> str:
        return f"Kubernetes API server {self.api_client.configuration.host}"

    @property
    def synced(self) -> bool:
        with self._lock:
            return len(self._synced) == len(KINDS)

    def service_accounts(self) -> tuple[ServiceAccountInfo, ...]:
        with self._lock:
            store = self._stores["serviceaccounts"]
            return tuple(
                e.value for _, e in sorted(store.items()) if isinstance(e.value, ServiceAccountInfo)
            )

    async def run(self) -> None:
        """Follow the API server until cancelled; then stop and join every informer thread."""
        if self._loop is not None:
            raise RuntimeError("KubernetesSource.run() is already running")
        self._loop = asyncio.get_running_loop()
        self.stopping.clear()
        informers = [Informer(self, kind) for kind in KINDS]
        try:
            for informer in informers:
                informer.thread.start()
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self.stopping.set()
            for informer in informers:
                informer.interrupt()
            if self._publish_handle is not None:
                self._publish_handle.cancel()
                self._publish_handle = None
            deadline = time.monotonic() + self.stop_timeout_s
            for informer in informers:
                if informer.thread.ident is not None:
                    informer.thread.join(max(0.0, deadline - time.monotonic()))
            stuck = [i.thread.name for i in informers if i.thread.is_alive()]
            if stuck:
                # Blocked before the response headers: they end with their request timeout.
                self.log.warning("kubernetes source: threads still stopping: %s", ", ".join(stuck))
            self._loop = None

    # -- called by the informer threads ----------------------------------------------------

    def replace_kind(self, kind: Kind, entries: dict[Key, Entry]) -> None:
        """A fresh list: the kind's whole store, replaced at once."""
        with self._lock:
            old = self._stores[kind.name]
            for key, entry in entries.items():
                self._note(entry, old.get(key))
            changed = old.keys() != entries.keys() or any(
                _differs(old[key], entry) for key, entry in entries.items()
            )
            self._stores[kind.name] = entries
            if kind.name not in self._synced:
                self._synced.add(kind.name)
                changed = True  # the last kind listed triggers the first publication
            if changed:
                self._changed(kind)

    def put_object(self, kind: Kind, key: Key, entry: Entry) -> None:
        with self._lock:
            store = self._stores[kind.name]
            old = store.get(key)
            self._note(entry, old)
            store[key] = entry
            if old is None or _differs(old, entry):
                self._changed(kind)

    def remove_object(self, kind: Kind, key: Key) -> None:
        with self._lock:
            if self._stores[kind.name].pop(key, None) is not None:
                self._changed(kind)

    def _note(self, entry: Entry, old: Entry | None) -> None:
        """Log a refusal or a note once per resourceVersion, not on every publication."""
        if old is not None and old.rv == entry.rv:
            return
        if entry.rejected:
            self.log.warning("kubernetes source: refused %s", entry.rejected)
        for note in entry.notes:
            self.log.info("kubernetes source: %s", note)

    def _changed(self, kind: Kind) -> None:
        """Under _lock: wake the loop once, however many events arrive before it runs."""
        self._dirty = True
        self._dirty_kinds.add(kind.name)
        if self._wake_pending or self._loop is None or self.stopping.is_set():
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: run() is over
            self._loop.call_soon_threadsafe(self._wake)

    # -- on the loop -------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            due = self._dirty and len(self._synced) == len(KINDS)
        if due and self._publish_handle is None and self._loop is not None:
            # Leading edge: a change after a quiet spell goes out at once; a
            # burst is folded into one publication per interval after that.
            wait = self._last_publish + self.publish_interval_s - self._loop.time()
            if wait <= 0:
                self._publish_handle = self._loop.call_soon(self._publish)
            else:
                self._publish_handle = self._loop.call_later(wait, self._publish)

    def _publish(self) -> None:
        self._publish_handle = None
        if self._loop is not None:
            self._last_publish = self._loop.time()
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            for name in self._dirty_kinds:
                store = self._stores[name]
                # In the API server's order: by key at each list, new objects last.
                # (Sorting 10,000 keys on every change was a third of an update.)
                self._published[name] = (
                    tuple(e.value for e in store.values() if e.value is not None),
                    tuple(e.rejected for e in store.values() if e.rejected),
                )
            self._dirty_kinds.clear()
            published = self._published
            state = SourceState(
                namespaces=_values(published, "namespaces", NamespaceInfo),
                pods=_values(published, "pods", PodInfo),
                services=_values(published, "services", ServiceInfo),
                policies=tuple(
                    p
                    for p in _values(published, "authorizationpolicies", object)
                    if isinstance(p, AuthorizationPolicyInfo)
                ),
                waypoints=_values(published, "gateways", WaypointInfo),
                endpoint_slices=_values(published, "endpointslices", EndpointSliceInfo),
                l7=tuple(
                    o
                    for k in (*L7_KINDS, "authorizationpolicies")
                    for o in _values(published, k, object)
                    if isinstance(o, L7Object)
                ),
                trust_domain=self._empty.trust_domain,
                cluster_id=self._empty.cluster_id,
                root_namespace=self._empty.root_namespace,
                rejected=tuple(sorted(r for _, lines in published.values() for r in lines)),
            )
        self._state = self.latest = state
        try:
            self._on_change(state)
        except Exception:
            self.log.exception("kubernetes source: on_change failed")


def _differs(a: Entry, b: Entry) -> bool:
    return a.value != b.value or a.rejected != b.rejected


def _values(
    published: Mapping[str, tuple[tuple[Any, ...], tuple[str, ...]]], kind: str, cls: type[_T]
) -> tuple[_T, ...]:
    """A kind's published values (each store holds values of one class only)."""
    return cast(tuple[_T, ...], published.get(kind, ((), ()))[0])
