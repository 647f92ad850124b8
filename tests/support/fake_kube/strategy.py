"""What the API server does to a written object, as its registry strategies do: the
defaults it fills in, what it validates (a Lease's times), what a write may not change (a
Service's clusterIP, a pod's metadata through pods/status), and the metadata it sets."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime

from tests.support.fake_kube.errors import ApiError, status
from tests.support.fake_kube.resources import Obj, Resource

# The Service spec defaults, as `kubectl get -o json` shows them on kind (v1.33).
SERVICE_DEFAULTS = """{"type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4"],
  "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"}"""

# What a write to pods/status may not change in a pod's metadata.
POD_STATUS_KEEPS = frozenset(
    {"name", "namespace", "uid", "creationTimestamp", "managedFields", "ownerReferences"}
    | {"deletionTimestamp", "generation"}
)


def defaults(resource: str, obj: Obj) -> None:
    """The defaults the API server fills in on a write (the ones a controller sees back)."""
    spec = obj.setdefault("spec", {}) if resource in ("services", "deployments") else None
    if resource == "services" and spec is not None:
        for k, v in json.loads(SERVICE_DEFAULTS).items():
            spec.setdefault(k, v)
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        obj.setdefault("status", {"loadBalancer": {}})
    elif resource == "deployments" and spec is not None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy",
            {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
        )
        template = spec.setdefault("template", {})
        template.setdefault("metadata", {}).setdefault("creationTimestamp", None)
        pod = template.setdefault("spec", {})
        for k, v in (
            ("restartPolicy", "Always"),
            ("terminationGracePeriodSeconds", 30),
            ("dnsPolicy", "ClusterFirst"),
            ("securityContext", {}),
            ("schedulerName", "default-scheduler"),
        ):
            pod.setdefault(k, v)
        if pod.get("serviceAccountName"):
            pod.setdefault("serviceAccount", pod["serviceAccountName"])  # the deprecated alias
        for c in pod.get("containers") or []:
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            latest = ":" not in str(c.get("image", "")).rsplit("/", 1)[-1] or str(
                c.get("image", "")
            ).endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            for port in c.get("ports") or []:
                port.setdefault("protocol", "TCP")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    p = c[probe]
                    for k, v in (
                        ("timeoutSeconds", 1),
                        ("periodSeconds", 10),
                        ("successThreshold", 1),
                        ("failureThreshold", 3),
                    ):
                        p.setdefault(k, v)
                    if "httpGet" in p:
                        p["httpGet"].setdefault("scheme", "HTTP")
        for volume in pod.get("volumes") or []:
            for source in ("configMap", "secret", "projected", "downwardAPI"):
                if source in volume:
                    volume[source].setdefault("defaultMode", 420)
            for part in (volume.get("projected") or {}).get("sources") or []:
                if "serviceAccountToken" in part:
                    part["serviceAccountToken"].setdefault("expirationSeconds", 3600)


# metav1.MicroTime's one accepted form (RFC3339Micro: "2006-01-02T15:04:05.000000Z07:00").
_MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")


def validate(res: Resource, obj: Obj) -> None:
    """What the API server refuses in a written object (of the kinds checked here: Lease)."""
    if res.plural != "leases":
        return
    spec = obj.get("spec") or {}
    for name in ("acquireTime", "renewTime"):
        value = spec.get(name)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
            raise ApiError(
                status(
                    400,
                    "BadRequest",
                    f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                    f'"{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse',
                )
            )
    invalid = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        invalid.append(f"spec.leaseDurationSeconds: Invalid value: {duration}: must be positive")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        invalid.append(f"spec.leaseTransitions: Invalid value: {transitions}: must be >= 0")
    if invalid:
        lease = (obj.get("metadata") or {}).get("name")
        message = f'Lease.coordination.k8s.io "{lease}" is invalid: ' + ", ".join(invalid)
        raise ApiError(status(422, "Invalid", message))


def keep_cluster_ip(current: Obj, new: Obj) -> None:
    """A Service keeps its clusterIP when a write leaves it out, and may not change it."""
    old_spec, spec = current.get("spec") or {}, new.setdefault("spec", {})
    for field_name in ("clusterIP", "clusterIPs"):
        if field_name in old_spec and not spec.get(field_name):
            spec[field_name] = copy.deepcopy(old_spec[field_name])
    if old_spec.get("clusterIP") and spec.get("clusterIP") != old_spec["clusterIP"]:
        name = current["metadata"]["name"]
        raise ApiError(
            status(
                422,
                "Invalid",
                f'Service "{name}" is invalid: spec.clusterIPs[0]: Invalid value: '
                f'["{spec.get("clusterIP")}"]: may not change once set',
            )
        )


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def managed_field(res: Resource, now: str) -> Obj:
    return {
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": res.api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {}}},
    }
