"""A waypoint Gateway's instance on Kubernetes, rendered: pure functions, no I/O.

What Istio's deployment controller makes for a Gateway of class
``istio-waypoint`` (the ``waypoint.yaml`` template of
``manifests/charts/istio-control/istio-discovery/files``), with our image,
command line, labels and ports (those of :mod:`meshlab.waypoints`): a
ServiceAccount, a Deployment and a Service named after the Gateway, each with
an owner reference to it and the managed label. :func:`covers` says whether a
live object already holds what we want, so that the API server's defaults and
other controllers' additions are never taken for differences.

May import: ``controlplane.state``, PyYAML and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml

from controlplane.state import MANAGED, MANAGED_VALUE, WAYPOINT_CLASS

Obj = dict[str, Any]

GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
GATEWAY_CLASS = "gateway.networking.k8s.io/gateway-class-name"
GATEWAY_API = "gateway.networking.k8s.io/v1"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
ISTIO_CONFIG_LABEL = "istio.io/config"
# Annotations Istio's controller does not copy from the Gateway to what it makes.
_NOT_COPIED = (
    "kubectl.kubernetes.io/last-applied-configuration",
    "gateway.istio.io/name-override",
    "gateway.istio.io/service-account",
    "gateway.istio.io/controller-version",
)
# Where the pod finds what it needs: as Istio's waypoint template mounts them.
ROOT_CERT_DIR = "/var/run/secrets/istio"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = "istio-token"
DEFAULT_IMAGE = "ambient-mesh:0.1.0"
DEFAULT_XDS_ADDRESS = "istiod.istio-system.svc:15012"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployerSettings:
    """What every waypoint instance shares (meshd's ``--waypoint-*`` flags)."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    xds_address: str = DEFAULT_XDS_ADDRESS  # meshd's TLS port (xDS and the CA), as istiod's
    trust_domain: str = "cluster.local"
    token_audience: str = "istio-ca"
    token_expiration_s: int = 43200
    resync_s: float = 300.0
    # How long what a gone Gateway left is the garbage collector's to delete, before ours.
    orphan_grace_s: float = 30.0
    # Istio's global.waypoint.resources defaults.
    resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        }
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayRef:
    """What the instance of one waypoint Gateway is made from."""

    namespace: str
    name: str
    uid: str
    generation: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)  # spec.infrastructure.labels
    annotations: Mapping[str, str] = field(default_factory=dict)  # ...and .annotations
    replicas: int | None = None  # None: the Deployment's own (1 when created; an HPA's)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Mapping[str, Any], replicas: int | None = None) -> GatewayRef:
        meta = obj.get("metadata") or {}
        infra = (obj.get("spec") or {}).get("infrastructure") or {}
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta["name"]),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            labels={str(k): str(v) for k, v in (infra.get("labels") or {}).items()},
            annotations={
                str(k): str(v)
                for k, v in (infra.get("annotations") or {}).items()
                if k not in _NOT_COPIED
            },
            replicas=replicas,
        )


# -- rendering: pure ------------------------------------------------------------------------


def owner_reference(gw: GatewayRef) -> Obj:
    return {
        "apiVersion": GATEWAY_API,
        "kind": "Gateway",
        "name": gw.name,
        "uid": gw.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(gw: GatewayRef, *, extra_annotations: Mapping[str, str] | None = None) -> Obj:
    meta: Obj = {
        "name": gw.name,
        "namespace": gw.namespace,
        "labels": {
            **gw.labels,
            GATEWAY_NAME: gw.name,
            GATEWAY_CLASS: WAYPOINT_CLASS,
            MANAGED: MANAGED_VALUE,
        },
        "ownerReferences": [owner_reference(gw)],
    }
    annotations = {**(extra_annotations or {}), **gw.annotations}
    if annotations:
        meta["annotations"] = annotations
    return meta


def service_account(gw: GatewayRef) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(gw)}


def waypoint_args(gw: GatewayRef, settings: DeployerSettings) -> list[str]:
    """The container's arguments: meshlab's command line (:func:`meshlab.waypoints.command`),
    with the pod's own name, IP and service account from its environment."""
    return [
        "--gateway",
        f"{gw.namespace}/{gw.name}",
        "--xds-address",
        settings.xds_address,
        "--root-cert",
        f"{ROOT_CERT_DIR}/{ROOT_CERT_KEY}",
        "--token-file",
        f"{TOKEN_DIR}/{TOKEN_FILE}",
        "--trust-domain",
        settings.trust_domain,
    ]


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def deployment(gw: GatewayRef, settings: DeployerSettings) -> Obj:
    pod_labels = {
        "sidecar.istio.io/inject": "false",
        "istio.io/dataplane-mode": "none",  # the waypoint does its own HBONE
        "service.istio.io/canonical-name": gw.name,
        "service.istio.io/canonical-revision": "latest",
        **gw.labels,
        GATEWAY_NAME: gw.name,
        GATEWAY_CLASS: WAYPOINT_CLASS,
        MANAGED: MANAGED_VALUE,
    }

    def probe() -> Obj:
        return {"httpGet": {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}}

    container: Obj = {
        "name": "waypoint",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["waypoint"],
        "args": waypoint_args(gw, settings),
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            _field_env("NODE_NAME", "spec.nodeName"),
        ],
        "ports": [
            {"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
        ],
        # As Istio's waypoint: up to 30 s to become ready, then checked every 15 s.
        "startupProbe": {
            **probe(),
            "initialDelaySeconds": 1,
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 30,
        },
        "readinessProbe": {
            **probe(),
            "initialDelaySeconds": 0,
            "periodSeconds": 15,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 4,
        },
        "resources": {k: dict(v) for k, v in settings.resources.items()},
        "securityContext": {
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }
    spec: Obj = {
        "selector": {"matchLabels": {GATEWAY_NAME: gw.name}},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {
                    "prometheus.io/path": "/stats/prometheus",
                    "prometheus.io/port": "15020",
                    "prometheus.io/scrape": "true",
                    **gw.annotations,
                },
            },
            "spec": {
                "serviceAccountName": gw.name,
                "containers": [container],
                "volumes": [
                    {
                        "name": "istio-token",
                        "projected": {
                            "sources": [
                                {
                                    "serviceAccountToken": {
                                        "audience": settings.token_audience,
                                        "expirationSeconds": settings.token_expiration_s,
                                        "path": TOKEN_FILE,
                                    }
                                }
                            ]
                        },
                    },
                    {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                ],
            },
        },
    }
    if gw.replicas is not None:
        spec = {"replicas": gw.replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(gw), "spec": spec}


# The Service's ports: meshlab's (meshlab.waypoints.PORTS).
SERVICE_PORTS = (
    {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "all"},
    {
        "name": "status-port",
        "port": 15021,
        "targetPort": 15021,
        "protocol": "TCP",
        "appProtocol": "tcp",
    },
    {
        "name": "metrics",
        "port": 15020,
        "targetPort": 15020,
        "protocol": "TCP",
        "appProtocol": "http",
    },
)


def service(gw: GatewayRef) -> Obj:
    # Istio's: keep traffic to the waypoint in the client's zone when it can.
    meta = _metadata(
        gw, extra_annotations={"networking.istio.io/traffic-distribution": "PreferClose"}
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME: gw.name},
            "ports": [dict(p) for p in SERVICE_PORTS],
        },
    }


def instance_objects(gw: GatewayRef, settings: DeployerSettings) -> tuple[Obj, Obj, Obj]:
    """The ServiceAccount, Deployment and Service of one waypoint, in the order made."""
    return service_account(gw), deployment(gw, settings), service(gw)


def root_cert_config_map(namespace: str, root_pem: str) -> Obj:
    """Istio's ``istio-ca-root-cert`` ConfigMap: the mesh root, for pods to check meshd."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CERT_CONFIGMAP,
            "namespace": namespace,
            "labels": {ISTIO_CONFIG_LABEL: "true"},
        },
        "data": {ROOT_CERT_KEY: root_pem},
    }


def covers(wanted: Any, live: Any) -> bool:
    """Whether ``live`` holds every field of ``wanted`` with its value: fields the API
    server defaulted, or another controller added, are not differences."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and covers(v, live[k]) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(wanted) == len(live)
            and all(covers(w, x) for w, x in zip(wanted, live, strict=True))
        )
    return bool(wanted == live)


def replicas_of(config_map: Mapping[str, Any] | None) -> int | None:
    """``spec.replicas`` of the ``deployment`` overlay in a Gateway's parameters ConfigMap
    (Istio's customisation); None when it says nothing. Other overlay fields are ignored."""
    data = (config_map or {}).get("data") or {}
    text = data.get("deployment")
    if not text:
        return None
    overlay = yaml.safe_load(text)
    replicas = (
        ((overlay or {}).get("spec") or {}).get("replicas") if isinstance(overlay, dict) else None
    )
    if replicas is None:
        return None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ValueError(f"deployment.spec.replicas {replicas!r} is not a count")
    return replicas


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    """``python -m controlplane.kube_waypoints NAMESPACE NAME``: the Deployment meshd would
    make for that waypoint, as JSON (meshlab reads its securityContext to run a waypoint
    pod from the image as Kubernetes would)."""
    import json
    import sys

    namespace, name = argv if argv is not None else sys.argv[1:]
    gw = GatewayRef(namespace=namespace, name=name, uid="")
    print(json.dumps(deployment(gw, DeployerSettings())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
