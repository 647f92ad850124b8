"""Status conditions, as the Gateway API (and Istio's status) writes them.

meshd computes them with the translation and shows them in ``/debug/status``;
the deployer writes them to the objects (``status.conditions`` of a Gateway,
``status.parents[].conditions`` of a route), so ``kubectl get`` (or
``meshlab get``) says what was accepted and why not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.l7.gateway_api import ParentRef

CONTROLLER = "istio.io/mesh-controller"


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""

    def to_dict(self, generation: int) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": generation,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentStatus:
    parent: ParentRef
    conditions: tuple[Condition, ...]

    @property
    def accepted(self) -> bool:
        return all(c.status for c in self.conditions if c.type == "Accepted")


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectStatus:
    """The status of one object; ``parents`` for routes, ``conditions`` for the rest."""

    kind: str
    namespace: str
    name: str
    generation: int = 0
    conditions: tuple[Condition, ...] = ()
    parents: tuple[ParentStatus, ...] = ()
    addresses: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def problems(self) -> list[str]:
        """One line per false condition, for logs and ``rejected``."""
        lines = [
            f"{self.kind} {self.namespace}/{self.name}: {c.type} {c.reason}: {c.message}"
            for c in self.conditions
            if not c.status and c.type not in ("Programmed",)
        ]
        for p in self.parents:
            lines += [
                f"{self.kind} {self.namespace}/{self.name} (parent {p.parent}): "
                f"{c.type} {c.reason}: {c.message}"
                for c in p.conditions
                if not c.status
            ]
        return lines

    def to_status(self) -> dict[str, Any]:
        """The object's ``status``, in the Gateway API's shape."""
        gen = self.generation
        if self.parents:
            return {
                "parents": [
                    {
                        "parentRef": _parent_ref(p.parent),
                        "controllerName": CONTROLLER,
                        "conditions": [c.to_dict(gen) for c in p.conditions],
                    }
                    for p in self.parents
                ]
            }
        status: dict[str, Any] = {"conditions": [c.to_dict(gen) for c in self.conditions]}
        if self.kind == "Gateway":
            status["addresses"] = [{"type": "IPAddress", "value": a} for a in self.addresses]
        return status

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "status": self.to_status(),
        }


def _parent_ref(ref: ParentRef) -> dict[str, Any]:
    out: dict[str, Any] = {
        "group": ref.group,
        "kind": ref.kind,
        "namespace": ref.namespace,
        "name": ref.name,
    }
    if ref.port is not None:
        out["port"] = ref.port
    if ref.section is not None:
        out["sectionName"] = ref.section
    return out


def waypoint_accepted(
    kind: str, namespace: str, name: str, generation: int, ok: bool, reason: str, message: str
) -> ObjectStatus:
    """An Istio policy's status as meshd writes it: one ``WaypointAccepted`` condition
    (AuthorizationPolicy, RequestAuthentication, EnvoyFilter, Telemetry)."""
    return ObjectStatus(
        kind=kind,
        namespace=namespace,
        name=name,
        generation=generation,
        conditions=(Condition(type="WaypointAccepted", status=ok, reason=reason, message=message),),
    )


def accepted(message: str = "") -> Condition:
    return Condition(type="Accepted", status=True, reason="Accepted", message=message)


def not_accepted(reason: str, message: str) -> Condition:
    return Condition(type="Accepted", status=False, reason=reason, message=message)


def resolved(message: str = "") -> Condition:
    return Condition(type="ResolvedRefs", status=True, reason="ResolvedRefs", message=message)


def not_resolved(reason: str, message: str) -> Condition:
    return Condition(type="ResolvedRefs", status=False, reason=reason, message=message)


class Out:
    """What a build says of the objects it reads: their statuses, and a line for each
    thing it cannot use (``rejected``)."""

    def __init__(self) -> None:
        self.status: list[ObjectStatus] = []
        self.rejected: list[str] = []

    def reject(self, line: str) -> None:
        self.rejected.append(line)
