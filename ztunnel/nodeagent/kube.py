"""The node agent's view of a Kubernetes cluster: Namespaces, and this node's Pods.

Istio's CNI node agent watches the same two things. This view lists them
every ``poll_s`` seconds on a thread of its own (the node's pods only, by
``spec.nodeName``, checked again here), so :meth:`read` never blocks the
agent; a pod the CNI plugin asks about before the next list is fetched at
once by :meth:`refresh_pod`. A failed list keeps the last good view and is
logged once until it recovers.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import kubernetes

from ztunnel.nodeagent.view import ClusterView, PodFacts

log = logging.getLogger("ztunnel.nodeagent")


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


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def _facts(pod: dict[str, Any], node: str) -> PodFacts | None:
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    if spec.get("nodeName") != node or spec.get("hostNetwork"):
        return None  # another node's, or a host-network pod: never captured
    return PodFacts(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        node=node,
        service_account=str(spec.get("serviceAccountName") or "default"),
        labels=_labels(pod),
    )


class KubernetesView:
    def __init__(self, node: str, api: Any, *, poll_s: float = 2.0) -> None:
        self.node = node
        self.core = kubernetes.client.CoreV1Api(api)
        self.poll_s = poll_s
        self.view = ClusterView()
        self.error = ""
        self._version = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        return f"Kubernetes, pods of node {self.node!r}"

    def start(self) -> None:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="kube-view", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def read(self) -> ClusterView:
        return self.view

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """List Namespaces and the node's Pods; publish a new view when they changed."""
        try:
            namespaces = _json(self.core.list_namespace(_preload_content=False))
            pods = _json(
                self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={self.node}", _preload_content=False
                )
            )
        except Exception as e:  # the client raises many kinds: all mean "not now"
            self._report(f"listing from the API server failed: {e}")
            return
        self._report("")
        labels = {str(ns["metadata"]["name"]): _labels(ns) for ns in namespaces.get("items") or []}
        facts = {}
        for pod in pods.get("items") or []:
            found = _facts(pod, self.node)
            if found is not None:
                facts[(found.namespace, found.name)] = found
        self._publish(labels, facts)

    def refresh_pod(self, namespace: str, name: str) -> ClusterView:
        """Fetch one pod and its namespace now (a pod the CNI plugin is adding)."""
        try:
            pod = _json(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
            ns = _json(self.core.read_namespace(namespace, _preload_content=False))
        except Exception as e:
            log.info("node agent: cannot read pod %s/%s now: %s", namespace, name, e)
            return self.view
        with self._lock:
            labels = {k: dict(v) for k, v in self.view.namespaces.items()}
            labels[namespace] = _labels(ns)
            facts = dict(self.view.pods)
            found = _facts(pod, self.node)
            if found is not None:
                facts[(namespace, name)] = found
        self._publish(labels, facts)
        return self.view

    def _publish(
        self, labels: dict[str, dict[str, str]], facts: dict[tuple[str, str], PodFacts]
    ) -> None:
        with self._lock:
            if labels == self.view.namespaces and facts == self.view.pods:
                return
            self._version += 1
            self.view = ClusterView(
                version=self._version,
                namespaces=MappingProxyType(labels),
                pods=MappingProxyType(facts),
            )

    def _report(self, error: str) -> None:
        if error != self.error:
            self.error = error
            if error:
                log.warning("node agent: %s; keeping the last good view", error)
            else:
                log.info("node agent: the API server answers again")
