"""Istio's traffic APIs as users write them: VirtualService and DestinationRule, all of them.

``networking.istio.io/v1`` (and v1beta1, v1alpha3) with Istio's field names
and semantics, oldest object first: each DestinationRule
(:mod:`controlplane.l7.destination_rule`) becomes the
:class:`~controlplane.l7.ir.ServicePolicy` of its service (the oldest one
applies); the VirtualServices (:mod:`controlplane.l7.virtual_service`) for
one host are merged, oldest first. Each object gets its ``Accepted``
condition; what is refused is said with the field's path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from controlplane.l7.destination_rule import parse_destination_rule
from controlplane.l7.ir import ServicePolicy
from controlplane.l7.istio_object import created_of, generation_of
from controlplane.l7.reader import InvalidObject
from controlplane.l7.status import Condition, ObjectStatus
from controlplane.l7.virtual_service import (
    ParsedVirtualService,
    VirtualServiceRoutes,
    parse_virtual_service,
)
from controlplane.state import L7Object, ServiceInfo

Report = Callable[[str], None]


def parse_all(
    objects: Iterable[L7Object],
    services: Mapping[str, ServiceInfo],
    reject: Report,
    statuses: list[ObjectStatus],
) -> tuple[dict[str, ServicePolicy], dict[str, VirtualServiceRoutes]]:
    """DestinationRules and VirtualServices by the service key they apply to."""
    policies: dict[str, ServicePolicy] = {}
    parsed_vs: list[ParsedVirtualService] = []
    for obj in sorted(objects, key=lambda o: (created_of(o.raw), o.namespace, o.name)):
        if obj.kind not in ("VirtualService", "DestinationRule"):
            continue
        gen = generation_of(obj.raw)
        try:
            if obj.kind == "DestinationRule":
                policy = parse_destination_rule(obj.raw)
                if policy is None:
                    continue
                if policy.service not in services:
                    raise InvalidObject(
                        obj.kind,
                        f"{obj.namespace}/{obj.name}",
                        "spec.host",
                        f"no service {policy.service} (a DestinationRule needs a service of its "
                        "namespace or a fully qualified host)",
                    )
                if policy.service in policies:
                    first = policies[policy.service].origin
                    raise InvalidObject(
                        obj.kind,
                        f"{obj.namespace}/{obj.name}",
                        "spec.host",
                        f"service {policy.service} already has DestinationRule {first} "
                        "(the oldest one applies)",
                    )
                policies[policy.service] = policy
            else:
                vs = parse_virtual_service(obj.raw, services)
                if vs is None:
                    continue
                parsed_vs.append(vs)
        except InvalidObject as e:
            reject(str(e))
            statuses.append(_status(obj, gen, False, "Invalid", f"{e.path}: {e.reason}"))
            continue
        statuses.append(_status(obj, gen, True, "Accepted", ""))
    merged: dict[str, VirtualServiceRoutes] = {}
    for vs in parsed_vs:
        for key in vs.services:
            before = merged.get(key)
            merged[key] = VirtualServiceRoutes(
                service=key,
                origin=(before.origin + ", " if before else "") + f"{vs.namespace}/{vs.name}",
                rules=(before.rules if before else ()) + vs.rules,
                http=True,
            )
    return policies, merged


def _status(obj: L7Object, gen: int, ok: bool, reason: str, message: str) -> ObjectStatus:
    return ObjectStatus(
        kind=obj.kind,
        namespace=obj.namespace,
        name=obj.name,
        generation=gen,
        conditions=(Condition(type="Accepted", status=ok, reason=reason, message=message),),
    )
