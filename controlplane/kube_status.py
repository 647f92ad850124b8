"""The status meshd writes to Gateway API objects on Kubernetes: what to write, decided purely.

:func:`controlplane.l7.build.build` computes each object's
:class:`~controlplane.l7.status.ObjectStatus`; this module turns it into the
object's new ``status`` against the one it has, as a controller must:

* a condition is a ``metav1.Condition``: ``lastTransitionTime`` is required
  (the CRDs refuse a condition without one) and moves only when the
  condition's ``status`` changes, so an unchanged answer is an unchanged
  object and nothing is written;
* a Gateway's ``status`` is its controller's: our conditions replace the
  ones of the same type, others (and ``listeners``) are kept, ``addresses``
  are the instance Service's cluster IPs;
* a route's ``status.parents`` is shared by every controller its parents
  name: only the entries with our ``controllerName`` are ours to replace or
  drop; the other controllers' entries are kept as they are.

``None`` means: the object already says it, write nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.l7.status import CONTROLLER, Condition, ObjectStatus

Obj = dict[str, Any]
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


def merge_conditions(
    live: Iterable[Mapping[str, Any]] | None, wanted: Sequence[Mapping[str, Any]], now: str
) -> list[Obj]:
    """``wanted`` (conditions without ``lastTransitionTime``) as metav1.Conditions, keeping
    the live transition time of each whose status did not change; then the live conditions
    of other types, untouched."""
    before = {str(c.get("type")): c for c in live or () if isinstance(c, Mapping)}
    out = []
    for c in wanted:
        old = before.get(str(c["type"]))
        since = now
        if old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime"):
            since = old["lastTransitionTime"]
        out.append({**c, "lastTransitionTime": since})
    ours = {str(c["type"]) for c in wanted}
    out += [copy.deepcopy(dict(c)) for t, c in before.items() if t not in ours]
    return out


def gateway_status(
    live: Mapping[str, Any] | None,
    computed: ObjectStatus,
    addresses: Sequence[str],
    now: str,
) -> Obj | None:
    """A waypoint Gateway's new ``status``, or None if ``live`` already says it."""
    current = dict(live or {})
    wanted = computed.to_status()
    new = copy.deepcopy(current)
    new["conditions"] = merge_conditions(current.get("conditions"), wanted["conditions"], now)
    if addresses:
        new["addresses"] = [{"type": "IPAddress", "value": a} for a in addresses]
    else:
        new.pop("addresses", None)
    return None if new == current else new


def invalid_gateway(namespace: str, name: str, generation: int, reason: str) -> ObjectStatus:
    """The status of a waypoint Gateway meshd could not read at all: not Accepted, and why."""
    conditions = tuple(
        Condition(type=t, status=False, reason="Invalid", message=reason)
        for t in ("Accepted", "Programmed")
    )
    return ObjectStatus(
        kind="Gateway", namespace=namespace, name=name, generation=generation, conditions=conditions
    )


def route_status(
    live: Mapping[str, Any] | None, computed: ObjectStatus | None, now: str
) -> Obj | None:
    """A route's new ``status`` (our ``parents`` entries from ``computed``; None: the route
    has no parent of ours any more), or None if ``live`` already says it."""
    current = dict(live or {})
    parents = [p for p in current.get("parents") or () if isinstance(p, Mapping)]
    others = [copy.deepcopy(dict(p)) for p in parents if p.get("controllerName") != CONTROLLER]
    mine = {
        _ref_key(p.get("parentRef")): p for p in parents if p.get("controllerName") == CONTROLLER
    }
    ours = []
    if computed is not None and computed.parents:
        for entry in computed.to_status()["parents"]:
            old = mine.get(_ref_key(entry["parentRef"]))
            conditions = merge_conditions(
                old.get("conditions") if old is not None else None, entry["conditions"], now
            )
            # Conditions of other types on our own entry are stale: ours are the whole answer.
            types = {c["type"] for c in entry["conditions"]}
            ours.append({**entry, "conditions": [c for c in conditions if c["type"] in types]})
    new = copy.deepcopy(current)
    new["parents"] = others + ours
    if not new["parents"] and "parents" not in current:
        return None
    return None if new == current else new


def _ref_key(ref: object) -> tuple[Any, ...]:
    """A parentRef's identity, with the API's defaults applied (group and kind Gateway)."""
    r = ref if isinstance(ref, Mapping) else {}
    return (
        r.get("group", "gateway.networking.k8s.io"),
        r.get("kind", "Gateway"),
        r.get("namespace"),
        r.get("name"),
        r.get("sectionName"),
        r.get("port"),
    )
