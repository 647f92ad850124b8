"""The node agent's view of a Kubernetes cluster: Namespaces, and this node's Pods.

Istio's CNI node agent follows the same two: every Namespace, and the Pods
whose ``spec.nodeName`` is this node (a field selector: other nodes' pods are
never sent). Each is an :class:`~ztunnel.nodeagent.informer.Informer` (list,
then watch) on a thread of its own, so :meth:`KubernetesView.read` never
blocks the agent; the view is known once both have listed. A pod the CNI
plugin asks about before its watch event has arrived is fetched at once by
:meth:`~KubernetesView.refresh_pod`. While the API server cannot be followed
the last good view is kept, and why is said once (and in ``error``).

The agent says with :meth:`~KubernetesView.report` what each pod's
redirection annotation should be; a thread of its own patches the pods whose
annotation differs (:func:`~ztunnel.nodeagent.reconcile.redirection_changes`)
with a JSON merge patch on ``pods/status``, as istio-cni does: the API server
takes a pod's metadata there too, and it is a lower privilege than patching
the pod. A failed patch is said once per pod and retried with a backoff; it
never holds up enrollment.

:meth:`KubernetesView.daemonset_removed` tells, when the agent is stopped,
whether its DaemonSet is gone or being deleted (the mesh is being removed
from the node: take ztunnel-cni out of the chain) or still there (a restart,
an upgrade, a drain: leave it, so pods started meanwhile fail closed), as
istio-cni decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from ztunnel.nodeagent import reconcile
from ztunnel.nodeagent.informer import CONNECT_TIMEOUT_S, Informer, Kind, Obj
from ztunnel.nodeagent.view import ClusterView, PodFacts

log = logging.getLogger("ztunnel.nodeagent")

# What the agent follows; ``{node}`` is this node's name.
KINDS = (
    Kind("namespaces", "list_namespace"),
    Kind("pods", "list_pod_for_all_namespaces", field_selector="spec.nodeName={node}"),
)
MERGE_PATCH = "application/merge-patch+json"
PATCH_TIMEOUT_S = 30.0
PATCH_RETRY_INITIAL_S = 0.5
PATCH_RETRY_MAX_S = 30.0
# What a 401/403 most likely means, per call.
PATCH_HINT = "does the node agent's ClusterRole allow patch of pods/status?"
DAEMONSET_HINT = "does the node agent's Role allow get of its DaemonSet?"

# The config loaders are not annotated.
_load_kube_config: Callable[..., None] = kubernetes.config.load_kube_config
_load_incluster_config: Callable[..., None] = kubernetes.config.load_incluster_config


def api_client(kubeconfig: str | None = None) -> Any:
    """In-cluster (the DaemonSet's service account) unless ``kubeconfig`` is given."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        _load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        _load_incluster_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def _json(response: Any) -> dict[str, Any]:
    """The body of a call made with ``_preload_content=False`` (the client's model
    classes are slow to build and not needed for a few fields)."""
    data = json.loads(response.data)
    if not isinstance(data, dict):
        raise ValueError("the API server answered with something other than an object")
    return data


def _labels(obj: Obj) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def _key(obj: Obj) -> reconcile.Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _facts(pod: Obj, node: str) -> PodFacts | None:
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    if spec.get("nodeName") != node or spec.get("hostNetwork"):
        return None  # another node's, or a host-network pod: never captured
    redirection = (meta.get("annotations") or {}).get(reconcile.REDIRECTION)
    status = pod.get("status") or {}
    ips = tuple(str(ip["ip"]) for ip in status.get("podIPs") or () if ip.get("ip"))
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        ips = ()  # on its way out: never looked for among the node's processes
    return PodFacts(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        node=node,
        service_account=str(spec.get("serviceAccountName") or "default"),
        labels=_labels(pod),
        redirection=None if redirection is None else str(redirection),
        uid=str(meta.get("uid") or ""),
        ips=ips,
    )


class KubernetesView:
    def __init__(
        self,
        node: str,
        api: Any,
        *,
        watch_timeout_s: int = 300,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        patch_retry_initial_s: float = PATCH_RETRY_INITIAL_S,
    ) -> None:
        self.node = node
        self.patch_retry_initial_s = patch_retry_initial_s
        self.core = kubernetes.client.CoreV1Api(api)
        self.view = ClusterView()
        self._namespaces: dict[str, dict[str, str]] = {}
        self._pods: dict[reconcile.Key, PodFacts] = {}
        self._listed: set[str] = set()
        self._errors: dict[str, str] = {}
        self._version = 0
        self._lock = threading.Lock()
        self.informers = {
            kind.name: Informer(
                getattr(self.core, kind.method),
                dataclasses.replace(kind, field_selector=kind.field_selector.format(node=node)),
                self,
                watch_timeout_s=watch_timeout_s,
                backoff_initial_s=backoff_initial_s,
                backoff_max_s=backoff_max_s,
            )
            for kind in KINDS
        }
        # Reporting: what the agent wants (None: nothing said yet); the rest belongs to
        # the reporter thread alone.
        self._desired: dict[reconcile.Key, str] | None = None
        self._retry: dict[reconcile.Key, tuple[float, float]] = {}  # (not before, delay)
        self._patch_errors: dict[reconcile.Key, str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="kube-report", daemon=True)

    def describe(self) -> str:
        return f"Kubernetes, pods of node {self.node!r}"

    @property
    def error(self) -> str:
        """Why the view cannot follow the API server right now ("" when it can)."""
        with self._lock:
            return "; ".join(f"{k}: {why}" for k, why in sorted(self._errors.items()) if why)

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()
        self._reporter.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for informer in self.informers.values():
            informer.stop()
        if self._reporter.ident is not None:
            self._reporter.join(timeout=5)

    def read(self) -> ClusterView:
        return self.view

    # -- what the informers deliver (on their threads) --------------------------------------

    def replace(self, kind: str, objects: list[Obj]) -> None:
        with self._lock:
            if kind == "namespaces":
                self._namespaces = {_key(o)[1]: _labels(o) for o in objects}
            else:
                pods = ((_key(o), _facts(o, self.node)) for o in objects)
                self._pods = {key: facts for key, facts in pods if facts is not None}
            self._listed.add(kind)
            self._publish()

    def put(self, kind: str, obj: Obj) -> None:
        with self._lock:
            self._put(kind, obj)
            self._publish()

    def remove(self, kind: str, obj: Obj) -> None:
        with self._lock:
            if kind == "namespaces":
                self._namespaces.pop(_key(obj)[1], None)
            else:
                self._pods.pop(_key(obj), None)
            self._publish()

    def failing(self, kind: str, reason: str) -> None:
        with self._lock:
            before = self._errors.get(kind, "")
            if reason == before:
                return
            self._errors[kind] = reason
        if reason:
            log.warning("node agent: following %s: %s; keeping the last good view", kind, reason)
        else:
            log.info("node agent: following %s again", kind)

    def _put(self, kind: str, obj: Obj) -> None:
        if kind == "namespaces":
            self._namespaces[_key(obj)[1]] = _labels(obj)
            return
        facts = _facts(obj, self.node)
        if facts is None:
            self._pods.pop(_key(obj), None)
        else:
            self._pods[_key(obj)] = facts

    def _publish(self) -> None:
        """Under the lock: a new view when something changed, once every kind is listed."""
        if len(self._listed) < len(self.informers):
            return
        if self._namespaces == self.view.namespaces and self._pods == self.view.pods:
            return
        self._version += 1
        self.view = ClusterView(
            version=self._version,
            namespaces=MappingProxyType({k: dict(v) for k, v in self._namespaces.items()}),
            pods=MappingProxyType(dict(self._pods)),
        )
        self._wake.set()  # a pod's annotation may need writing again

    # -- the CNI plugin's question ----------------------------------------------------------

    def refresh_pod(self, namespace: str, name: str) -> ClusterView:
        """Fetch one pod and its namespace now (a pod the CNI plugin is adding, whose
        watch event may not have arrived yet)."""
        try:
            pod = _json(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
            ns = _json(self.core.read_namespace(namespace, _preload_content=False))
        except Exception as e:
            log.info("node agent: cannot read pod %s/%s now: %s", namespace, name, e)
            return self.view
        with self._lock:
            self._put("pods", pod)
            self._put("namespaces", ns)
            self._publish()
            if self.view.known:
                return self.view
            # Not listed yet: an answer for this pod alone, from what was just read.
            return ClusterView(
                namespaces=MappingProxyType({namespace: _labels(ns)}),
                pods=MappingProxyType(
                    {k: v for k, v in self._pods.items() if k == (namespace, name)}
                ),
            )

    def daemonset_removed(self, namespace: str, name: str) -> tuple[bool, str]:
        """Whether the DaemonSet ``namespace/name`` is gone or being deleted, and what was
        seen. When that cannot be told (the API server unreachable, forbidden), False:
        the plugin stays and pods fail closed, never start uncaptured."""
        where = f"DaemonSet {namespace}/{name}"
        apps = kubernetes.client.AppsV1Api(self.core.api_client)
        try:
            ds = _json(
                apps.read_namespaced_daemon_set(
                    name,
                    namespace,
                    _preload_content=False,
                    _request_timeout=(CONNECT_TIMEOUT_S, 10),
                )
            )
        except ApiException as e:
            if e.status == 404:
                return True, f"{where} is gone"
            return (
                False,
                f"cannot tell whether {where} is being removed: {_reason(e, DAEMONSET_HINT)}",
            )
        except Exception as e:
            return False, f"cannot tell whether {where} is being removed: {e}"
        if (ds.get("metadata") or {}).get("deletionTimestamp"):
            return True, f"{where} is being deleted"
        return False, f"{where} remains (a restart or an upgrade)"

    # -- the redirection annotation -----------------------------------------------------------

    def report(self, desired: Mapping[reconcile.Key, str]) -> None:
        """What each pod in the mesh should say (``enabled`` or ``pending``); a pod not
        named is not in the mesh. Returns at once: the patches are made on a thread."""
        with self._lock:
            if desired == self._desired:
                return
            self._desired = dict(desired)
        self._wake.set()

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            waits = [after - now for after, _ in self._retry.values()]
            self._wake.wait(max(0.0, min(waits)) if waits else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._report_once()
            except Exception:
                log.exception("node agent: reporting redirection failed; trying again")
                self._stop.wait(PATCH_RETRY_MAX_S)

    def _report_once(self) -> None:
        with self._lock:
            desired, view = self._desired, self.view
        if desired is None or not view.known:
            return
        changes = reconcile.redirection_changes(view, desired)
        wanted = {key for key, _ in changes}
        for key in set(self._retry) - wanted:
            del self._retry[key]  # no longer needs writing (left the mesh, went away)
        for key in set(self._patch_errors) - wanted:
            del self._patch_errors[key]
        for key, value in changes:
            if self._stop.is_set():
                return
            if self._retry.get(key, (0.0, 0.0))[0] <= time.monotonic():
                self._patch(key, value)

    def _patch(self, key: reconcile.Key, value: str | None) -> None:
        namespace, name = key
        body = {"metadata": {"annotations": {reconcile.REDIRECTION: value}}}
        try:
            patched = _json(
                self.core.patch_namespaced_pod_status(
                    name,
                    namespace,
                    body,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=(CONNECT_TIMEOUT_S, PATCH_TIMEOUT_S),
                )
            )
        except ApiException as e:
            if e.status == 404:
                return  # the pod is gone; its watch event drops it from the view
            self._patch_failed(key, _reason(e))
            return
        except Exception as e:  # unreachable, timed out, a bad answer: all "not now"
            self._patch_failed(key, f"{type(e).__name__}: {e}")
            return
        self._retry.pop(key, None)
        if self._patch_errors.pop(key, None) is not None:
            log.info("node agent: %s/%s: redirection %s reported", namespace, name, value)
        # The answer is the pod as written: the watch may be a moment behind it.
        self.put("pods", patched)

    def _patch_failed(self, key: reconcile.Key, reason: str) -> None:
        _, delay = self._retry.get(key, (0.0, 0.0))
        delay = min(PATCH_RETRY_MAX_S, 2 * delay if delay else self.patch_retry_initial_s)
        self._retry[key] = (time.monotonic() + delay, delay)
        if key not in self._patch_errors:
            log.warning(
                "node agent: cannot annotate pod %s/%s with its redirection: %s; retrying",
                *key,
                reason,
            )
        self._patch_errors[key] = reason


def _reason(e: ApiException, hint: str = PATCH_HINT) -> str:
    message = ""
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(e.body or "{}").get("message", ""))
    text = f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
    if e.status in (401, 403):
        text += f" ({hint})"
    return text
