"""Objects shaped as a kind cluster returns them, for tests to add: namespaces, pods,
services, endpoint slices, authorization policies and waypoint gateways. The constant parts
are as ``kubectl get -o json`` shows them on kind (v1.33)."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from tests.support.fake_kube.resources import Obj
from tests.support.fake_kube.strategy import SERVICE_DEFAULTS

KIND_NODES = {"kind-control-plane": "172.18.0.2", "kind-worker": "172.18.0.3"}
_CREATED = "2026-03-01T12:00:00Z"
_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.45"
_POD_SPEC = """{
  "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace",
      "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
  "containers": [{"name": "app", "image": "registry.k8s.io/e2e-test-images/agnhost:2.45",
    "args": ["netexec", "--http-port=8080"],
    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}], "resources": {},
    "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    "imagePullPolicy": "IfNotPresent"}],
  "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
  "securityContext": {}, "schedulerName": "default-scheduler", "priority": 0,
  "tolerations": [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
     "tolerationSeconds": 300},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
     "tolerationSeconds": 300}],
  "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"}"""


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def service_account(name: str, namespace: str = "default") -> Obj:
    return {"metadata": {"name": name, "namespace": namespace}}


def pod(
    name: str,
    namespace: str = "default",
    ip: str | None = "10.244.1.5",
    node: str = "kind-worker",
    service_account: str = "default",
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    *,
    phase: str = "Running",
    host_network: bool = False,
) -> Obj:
    """A Deployment's pod as the kubelet reports it; ``ip=None`` for one not yet wired."""
    host_ip = KIND_NODES.get(node, "172.18.0.3")
    spec = json.loads(_POD_SPEC)
    spec.update(serviceAccountName=service_account, serviceAccount=service_account, nodeName=node)
    if host_network:
        spec["hostNetwork"] = True
        ip = host_ip  # a host-network pod has its node's address
    running = phase == "Running"
    is_ready = "True" if ready and running else "False"
    conditions: list[Obj] = [
        {"type": "PodReadyToStartContainers", "status": "True" if ip else "False"},
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": is_ready},
        {"type": "ContainersReady", "status": is_ready},
        {"type": "PodScheduled", "status": "True"},
    ]
    for c in conditions:
        c.update(lastProbeTime=None, lastTransitionTime=_CREATED)
        if c["status"] == "False" and c["type"] in ("Ready", "ContainersReady"):
            c.update(reason="ContainersNotReady", message="containers with unready status: [app]")
    state = {"running": {"startedAt": _CREATED}} if running else {"terminated": {"exitCode": 0}}
    status: Obj = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": _CREATED,
        "containerStatuses": [
            {
                "name": "app",
                "state": state if ip else {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {},
                "ready": is_ready == "True",
                "restartCount": 0,
                "image": _IMAGE,
                "imageID": _IMAGE.replace(":2.45", "@sha256:") + "7e8bdd27" * 8,
                "containerID": "containerd://" + uuid.uuid5(uuid.NAMESPACE_DNS, name).hex * 2,
                "started": running,
            }
        ],
        "qosClass": "BestEffort",
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": namespace,
            "labels": dict(labels) if labels is not None else {"app": name.split("-")[0]},
        },
        "spec": spec,
        "status": status,
    }


def service(
    name: str,
    namespace: str = "default",
    cluster_ip: str = "10.96.0.10",
    ports: Sequence[int | tuple[int, int | str] | Obj] = (80,),
    selector: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """A ClusterIP service (``"None"``: headless); each port ``port`` or ``(port, targetPort)``."""
    spec_ports = []
    for p in ports:
        if isinstance(p, dict):
            spec_ports.append({"protocol": "TCP", "targetPort": p["port"], **p})
        else:
            port, target = (p, p) if isinstance(p, int) else p
            spec_ports.append(
                {"name": f"tcp-{port}", "protocol": "TCP", "port": port, "targetPort": target}
            )
    spec: Obj = {"ports": spec_ports, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip]}
    spec.update(json.loads(SERVICE_DEFAULTS))
    if selector is not None:
        spec["selector"] = dict(selector)
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    name: str,
    namespace: str,
    service: str,
    addresses: Sequence[str],
    *,
    not_ready: Sequence[str] = (),
    port: int = 80,
    node: str = "kind-worker",
) -> Obj:
    """An EndpointSlice as the controller writes it: one address per endpoint."""
    endpoints = [
        {
            "addresses": [address],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": node,
        }
        for ready, group in ((True, addresses), (False, not_ready))
        for address in group
    ]
    return {
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": f"tcp-{port}", "protocol": "TCP", "port": port}],
    }


def authorization_policy(name: str, namespace: str, spec: Mapping[str, Any]) -> Obj:
    """An AuthorizationPolicy as ``kubectl apply`` leaves it."""
    applied = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"annotations": {}, "name": name, "namespace": namespace},
        "spec": spec,
    }
    annotation = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied) + "\n"}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotation},
        "spec": copy.deepcopy(dict(spec)),
    }


def gateway(
    name: str, namespace: str, address: str | None, *, gateway_class: str = "istio-waypoint"
) -> Obj:
    """A waypoint Gateway after Istio has programmed it (``address=None``: not yet)."""
    status: Obj = {
        "conditions": [
            {
                "type": t,
                "status": "True" if address else "False",
                "reason": t if address else "Pending",
                "message": "Resource programmed" if address else "Waiting for the deployment",
                "observedGeneration": 1,
                "lastTransitionTime": _CREATED,
            }
            for t in ("Accepted", "Programmed")
        ]
    }
    if address:
        status["addresses"] = [{"type": "IPAddress", "value": address}]
    listener: Obj = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
    listener["allowedRoutes"] = {"namespaces": {"from": "Same"}}
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {"gatewayClassName": gateway_class, "listeners": [listener]},
        "status": status,
    }
