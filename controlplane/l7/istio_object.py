"""What VirtualService and DestinationRule share: apiVersion and kind, metadata, hosts.

``networking.istio.io/v1`` (and v1beta1, v1alpha3); a host, short or fully
qualified, names a service by its key (``namespace/fqdn``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.l7.binding import CLUSTER_DOMAIN
from controlplane.l7.reader import Reader

_API_VERSIONS = tuple(f"networking.istio.io/{v}" for v in ("v1", "v1beta1", "v1alpha3"))


def created_of(raw: Mapping[str, Any]) -> str:
    meta = raw.get("metadata") or {}
    return str(meta.get("creationTimestamp") or "") if isinstance(meta, Mapping) else ""


def generation_of(raw: Mapping[str, Any]) -> int:
    meta = raw.get("metadata") or {}
    gen = meta.get("generation") if isinstance(meta, Mapping) else 0
    return gen if isinstance(gen, int) else 0


def check_api(r: Reader, kind: str) -> None:
    if r.raw.get("kind") not in (None, kind):
        raise r.error(f"must be {kind}", "kind")
    api = r.raw.get("apiVersion", _API_VERSIONS[0])
    if api not in _API_VERSIONS:
        raise r.error(f"{api!r} is not one of {', '.join(_API_VERSIONS)}", "apiVersion")


def resolve_host(host: str, namespace: str) -> str:
    """A VirtualService or DestinationRule host as a service key (namespace/fqdn)."""
    parts = host.split(".")
    if len(parts) == 1:
        return f"{namespace}/{host}.{namespace}.{CLUSTER_DOMAIN}"
    if len(parts) == 2:
        return f"{parts[1]}/{host}.{CLUSTER_DOMAIN}"
    if host.endswith("." + CLUSTER_DOMAIN) and len(parts) == 5:
        return f"{parts[1]}/{host}"
    return f"?/{host}"
