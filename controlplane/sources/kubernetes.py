"""The Kubernetes source: list+watch the API server into one :class:`SourceState`.

Kinds: namespaces, pods, services, service accounts, endpoint slices; and the
custom resources AuthorizationPolicy, Gateway (class ``istio-waypoint``),
HTTPRoute, GRPCRoute, VirtualService and DestinationRule, each of which may
not be installed (a 404 on list is said once and counts as none). Routes and
traffic policies are kept as written (:class:`~controlplane.state.L7Object`,
less the fields that change without the object changing) for
:mod:`controlplane.l7` to read.

One informer thread per kind, as client-go's reflector does it: list (in
pages), then watch from the list's resourceVersion with bookmarks; on
``410 Gone`` list again and replace that kind's store; on any other error
back off (0.1 s doubling to 30 s, with jitter) and retry, saying why in one
log line. Threads, because the official client blocks; everything they
learn is converted at once (so a bad object is refused alone, and logged
once per resourceVersion) and handed to the asyncio loop, which publishes a
whole new state at most once per ``publish_interval_s``, and only after
every kind has been listed once, so meshd never serves a half-listed world.

Objects are read as raw JSON (``_preload_content=False``), never as the
client's models: the custom resources have no models, and decoding pods
into models is the slowest part of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from controlplane.authz_yaml import InvalidPolicy, parse_authorization_policy
from controlplane.l7.gateway_api import is_waypoint, parse_gateway
from controlplane.l7.reader import InvalidObject
from controlplane.state import (
    TRAFFIC_DISTRIBUTION_ANNOTATION,
    TRAFFIC_DISTRIBUTIONS,
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    L7Object,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    frozen_labels,
)

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
_T = TypeVar("_T")

WAYPOINT_CLASS = "istio-waypoint"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


# kubernetes.config is not annotated; its two loaders, typed.
_load_kube_config: Callable[..., None] = kubernetes.config.load_kube_config
_load_incluster_config: Callable[..., None] = kubernetes.config.load_incluster_config


class KubernetesConfigError(RuntimeError):
    """No way to reach an API server was found; the message says what was tried."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountInfo:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=frozen_labels)


@dataclass(frozen=True, slots=True)
class Entry:
    """One object, converted once: its value (None: left out), why it was refused, notes."""

    rv: str
    value: object | None
    rejected: str = ""
    notes: tuple[str, ...] = ()


# -- conversion: one Kubernetes object (raw JSON) -> one SourceState value ------------------


def _meta(obj: Obj) -> tuple[str, str, Mapping[str, str]]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("metadata.labels must map strings to strings")
    return str(meta.get("namespace") or ""), str(meta["name"]), frozen_labels(labels)


def convert_namespace(obj: Obj) -> NamespaceInfo:
    _, name, labels = _meta(obj)
    return NamespaceInfo(name=name, labels=labels)


def convert_pod(obj: Obj) -> PodInfo | None:
    """None for pods the mesh does not carry: host-network (they share the node's IP,
    as Istio leaves them out of ambient) and finished ones (their IP may be reused)."""
    namespace, name, labels = _meta(obj)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    phase = status.get("phase")
    if spec.get("hostNetwork") or phase in ("Succeeded", "Failed"):
        return None
    ip = status.get("podIP") or None
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ValueError(f"status.podIP {ip!r} is not an IP address") from None
    ready = (
        phase == "Running"
        and not (obj.get("metadata") or {}).get("deletionTimestamp")  # terminating
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
    )
    return PodInfo(
        uid=str(obj["metadata"].get("uid") or ""),
        name=name,
        namespace=namespace,
        node=spec.get("nodeName") or "",
        ip=ip,
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        labels=labels,
        ready=ready,
    )


def convert_service(obj: Obj) -> tuple[ServiceInfo, tuple[str, ...]]:
    """The service, and notes: a named targetPort is resolved per pod by Kubernetes,
    but ServicePortInfo holds one number, so the service port stands in for it; a
    traffic distribution Istio does not know is ignored, as istiod ignores it."""
    namespace, name, labels = _meta(obj)
    spec = obj.get("spec") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    distribution = str(spec.get("trafficDistribution") or "")
    annotated = str(annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION) or "")
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    cluster_ips = tuple(str(ipaddress.ip_address(ip)) for ip in ips if ip and ip != "None")
    ports, notes = [], []
    for raw in spec.get("ports") or ():
        port = int(raw["port"])
        target = raw.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            notes.append(
                f"service {namespace}/{name}: port {port} has the named targetPort {target!r}; "
                f"using {port} (named ports are not resolved per pod)"
            )
            target = port
        ports.append(
            ServicePortInfo(
                port=port,
                target_port=int(target),
                name=str(raw.get("name") or ""),
                protocol=str(raw.get("protocol") or "TCP"),
                app_protocol=str(raw.get("appProtocol") or ""),
            )
        )
    known = {d.lower() for d in TRAFFIC_DISTRIBUTIONS}
    if distribution and distribution not in TRAFFIC_DISTRIBUTIONS:
        notes.append(
            f"service {namespace}/{name}: spec.trafficDistribution {distribution!r} is not "
            f"one of {', '.join(TRAFFIC_DISTRIBUTIONS)}; ignored, as istiod ignores it"
        )
    if annotated and annotated.lower() not in known:
        notes.append(
            f"service {namespace}/{name}: annotation {TRAFFIC_DISTRIBUTION_ANNOTATION}="
            f"{annotated!r} is not one of {', '.join(TRAFFIC_DISTRIBUTIONS)}; ignored"
        )
    info = ServiceInfo(
        name=name,
        namespace=namespace,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        selector=frozen_labels(spec.get("selector") or {}),
        labels=labels,
        traffic_distribution=distribution,
        internal_traffic_policy=str(spec.get("internalTrafficPolicy") or ""),
        annotations=frozen_labels(
            {TRAFFIC_DISTRIBUTION_ANNOTATION: annotated} if annotated else {}
        ),
    )
    return info, tuple(notes)


def convert_endpoint_slice(obj: Obj) -> EndpointSliceInfo | None:
    """The ready addresses (a missing ``ready`` means ready, per the API); None for slices
    that belong to no service or list FQDNs."""
    namespace, name, labels = _meta(obj)
    service = labels.get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    addresses = []
    for endpoint in obj.get("endpoints") or ():
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        # Only the first address has a meaning (the API says so; kube-proxy reads only it).
        first = (endpoint.get("addresses") or [None])[0]
        if first:
            addresses.append(str(ipaddress.ip_address(first)))
    return EndpointSliceInfo(
        service=service, namespace=namespace, addresses=tuple(addresses), name=name
    )


def convert_gateway(obj: Obj) -> WaypointInfo | None:
    """A Gateway of class istio-waypoint, read by :func:`controlplane.l7.gateway_api.parse_gateway`
    (labels such as istio.io/waypoint-for, listeners, status.addresses); other classes are
    another controller's. A malformed one is refused alone (InvalidObject is a ValueError)."""
    if not is_waypoint(obj):
        return None
    return parse_gateway(as_written(obj))


# Fields that change without the object changing: every write moves resourceVersion and
# managedFields, and kubectl's copy of the last applied object says nothing new.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def as_written(obj: Obj) -> dict[str, Any]:
    """The object as JSON, less resourceVersion, managedFields and kubectl's last-applied
    annotation: an object nobody changed compares equal to itself from the next list."""
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping) and LAST_APPLIED in annotations:
        annotations = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        if annotations:
            meta["annotations"] = annotations
        else:
            meta.pop("annotations")
    out["metadata"] = meta
    return out


def l7_converter(kind: str) -> Callable[[Obj], L7Object]:
    """HTTPRoute, GRPCRoute, VirtualService, DestinationRule: kept as written, read later."""

    def convert(obj: Obj) -> L7Object:
        namespace, name, _ = _meta(obj)
        return L7Object(kind=kind, namespace=namespace, name=name, raw=as_written(obj))

    return convert


def convert_service_account(obj: Obj) -> ServiceAccountInfo:
    namespace, name, labels = _meta(obj)
    return ServiceAccountInfo(name=name, namespace=namespace, labels=labels)


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


# -- the kinds ------------------------------------------------------------------------------


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


_CORE, _CUSTOM = "CoreV1Api", "CustomObjectsApi"
_EVERYWHERE = "_for_all_namespaces"
KINDS = (
    Kind("namespaces", "namespace", _CORE, "list_namespace", convert_namespace),
    Kind("pods", "pod", _CORE, f"list_pod{_EVERYWHERE}", convert_pod),
    Kind("services", "service", _CORE, f"list_service{_EVERYWHERE}", convert_service),
    Kind("serviceaccounts", "serviceaccount", _CORE, f"list_service_account{_EVERYWHERE}",
          convert_service_account),
    Kind("endpointslices", "endpointslice", "DiscoveryV1Api",
          f"list_endpoint_slice{_EVERYWHERE}", convert_endpoint_slice),
    Kind("authorizationpolicies", "AuthorizationPolicy", _CUSTOM, "list_cluster_custom_object",
          parse_authorization_policy, ("security.istio.io", "v1", "authorizationpolicies"), True),
    Kind("gateways", "gateway", _CUSTOM, "list_cluster_custom_object", convert_gateway,
          ("gateway.networking.k8s.io", "v1", "gateways"), True),
    Kind("httproutes", "HTTPRoute", _CUSTOM, "list_cluster_custom_object",
          l7_converter("HTTPRoute"), ("gateway.networking.k8s.io", "v1", "httproutes"), True),
    Kind("grpcroutes", "GRPCRoute", _CUSTOM, "list_cluster_custom_object",
          l7_converter("GRPCRoute"), ("gateway.networking.k8s.io", "v1", "grpcroutes"), True),
    Kind("virtualservices", "VirtualService", _CUSTOM, "list_cluster_custom_object",
          l7_converter("VirtualService"), ("networking.istio.io", "v1", "virtualservices"), True),
    Kind("destinationrules", "DestinationRule", _CUSTOM, "list_cluster_custom_object",
          l7_converter("DestinationRule"), ("networking.istio.io", "v1", "destinationrules"),
          True),
)  # fmt: skip
L7_KINDS = ("httproutes", "grpcroutes", "virtualservices", "destinationrules")


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
            reason = _reason(error) if error else "the watch ended within a second, empty"
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


def _reason(e: BaseException) -> str:
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


# -- the source -----------------------------------------------------------------------------


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
                policies=_values(published, "authorizationpolicies", AuthorizationPolicyInfo),
                waypoints=_values(published, "gateways", WaypointInfo),
                endpoint_slices=_values(published, "endpointslices", EndpointSliceInfo),
                l7=tuple(o for k in L7_KINDS for o in _values(published, k, L7Object)),
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


# -- the API server as an authenticator, and how to reach it ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenReviewResult:
    """What the API server says of a bearer token (``authenticated=False``: refuse it)."""

    authenticated: bool
    username: str = ""
    service_account: tuple[str, str] | None = None  # (namespace, name)
    node_name: str | None = None  # bound tokens name the node their pod runs on
    error: str = ""


def review_token(
    api_client: kubernetes.client.ApiClient, token: str, audiences: list[str] | None = None
) -> TokenReviewResult:
    """Ask the API server (TokenReview) who ``token`` belongs to. Blocking: call it from a
    thread. Fails closed: any error, or an answer that does not confirm one of
    ``audiences``, is ``authenticated=False`` with the reason in ``error``."""
    body = kubernetes.client.V1TokenReview(
        spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=audiences)
    )
    try:
        review = kubernetes.client.AuthenticationV1Api(api_client).create_token_review(body)
    except Exception as e:
        return TokenReviewResult(authenticated=False, error=f"TokenReview failed: {_reason(e)}")
    status = review.status
    if status is None or not status.authenticated:
        error = (status.error if status is not None else "") or "not authenticated"
        return TokenReviewResult(authenticated=False, error=error)
    if audiences and not set(status.audiences or ()) & set(audiences):
        # The API says: a client that sets spec.audiences must check status.audiences.
        return TokenReviewResult(
            authenticated=False,
            error=f"the API server did not confirm an audience of {audiences}",
        )
    user = status.user
    username = (user.username if user is not None else "") or ""
    extra = (user.extra if user is not None else None) or {}
    service_account = None
    if username.startswith(SERVICE_ACCOUNT_PREFIX):
        namespace, _, name = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if namespace and name and ":" not in name:
            service_account = (namespace, name)
    nodes = extra.get(NODE_NAME_EXTRA) or []
    return TokenReviewResult(
        authenticated=True,
        username=username,
        service_account=service_account,
        node_name=nodes[0] if nodes else None,
    )


def api_client_from(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """A client for ``kubeconfig`` if given; else the pod's service account (in-cluster);
    else ``$KUBECONFIG`` or ``~/.kube/config``."""
    configuration = kubernetes.client.Configuration()
    tried = []
    if kubeconfig:
        try:
            _load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except Exception as e:
            raise KubernetesConfigError(f"cannot use kubeconfig {kubeconfig}: {e}") from e
    else:
        try:
            _load_incluster_config(client_configuration=configuration)
        except Exception as e:
            tried.append(f"in-cluster config: {e}")
            try:
                _load_kube_config(client_configuration=configuration)
            except Exception as e2:
                tried.append(f"kubeconfig ($KUBECONFIG or ~/.kube/config): {e2}")
                raise KubernetesConfigError(
                    "no Kubernetes API server configured; tried "
                    + "; ".join(tried)
                    + " (pass --kubeconfig, or run meshd in a pod)"
                ) from e2
    # One connection per informer's watch, plus lists and token reviews, without
    # urllib3 discarding connections ("Connection pool is full").
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, 2 * len(KINDS) + 4
    )
    return kubernetes.client.ApiClient(configuration)
