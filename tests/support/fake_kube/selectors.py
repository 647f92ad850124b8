"""Label and field selectors on lists and watches, and how a selected watch reports an
object that starts or stops matching."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.support.fake_kube.errors import ApiError, status
from tests.support.fake_kube.resources import Obj
from tests.support.fake_kube.store import Event

_REQUIREMENT = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


# The fields each kind can be selected by besides metadata.name and metadata.namespace
# (the API server refuses others with 400).
_FIELDS = {
    "pods": frozenset(
        {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.hostNetwork"}
        | {"spec.serviceAccountName", "status.phase", "status.podIP"}
        | {"status.nominatedNodeName"}
    ),
}


def selector_for(resource: str, query: Mapping[str, str]) -> Callable[[Obj], bool]:
    """The request's label and field selectors, both."""
    labels = _selector(query.get("labelSelector") or "")
    fields = _field_selector(resource, query.get("fieldSelector") or "")
    return lambda obj: labels(obj) and fields(obj)


def _field_selector(resource: str, text: str) -> Callable[[Obj], bool]:
    """A field selector (``spec.nodeName=n,status.phase!=Failed``) as a predicate."""
    terms: list[tuple[str, bool, str]] = []  # (field, equal?, value)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", part)
        if m is None:
            message = f"invalid selector: '{text}'; can't understand '{part}'"
            raise ApiError(status(400, "BadRequest", message))
        name, op, value = m.groups()
        if name not in {"metadata.name", "metadata.namespace"} | _FIELDS.get(resource, set()):
            raise ApiError(status(400, "BadRequest", f"field label not supported: {name}"))
        terms.append((name, op != "!=", value))

    def value_of(obj: Obj, name: str) -> str:
        at: Any = obj
        for part in name.split("."):
            at = at.get(part) if isinstance(at, dict) else None
        if isinstance(at, bool):
            return "true" if at else "false"
        return "" if at is None else str(at)

    return lambda obj: all((value_of(obj, name) == value) == eq for name, eq, value in terms)


def _selector(text: str) -> Callable[[Obj], bool]:
    """A label selector (``a=b,c!=d,e,!f,g in (h,i),j notin (k)``) as a predicate."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (operator, key, values)
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _REQUIREMENT.match(text, pos)
        if m is None or m.end() == pos:
            raise ApiError(
                status(400, "BadRequest", f"unable to parse requirement: {text[pos:]!r}")
            )
        pos = m.end()
        if m["absent"]:
            requirements.append(("!", m["absent"], frozenset()))
        elif m["op"]:
            requirements.append(
                ("!=" if m["op"] == "!=" else "=", m["key"], frozenset([m["value"]]))
            )
        elif m["set"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["set"], m["key"], values))
        else:
            requirements.append(("exists", m["key"], frozenset()))

    def holds(op: str, key: str, values: frozenset[str], labels: Mapping[str, str]) -> bool:
        if op == "!":
            return key not in labels
        if op == "exists":
            return key in labels
        if op in ("=", "in"):
            return labels.get(key) in values
        return labels.get(key) not in values  # != and notin: true when the label is absent

    def selects(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(holds(op, key, values, labels) for op, key, values in requirements)

    return selects


def selected_as(event: Event, selects: Callable[[Obj], bool]) -> str | None:
    """How a watch with a label selector reports an event: an object that starts matching
    is ADDED, one that stops is DELETED, one that never matched is not reported."""
    now = selects(event.obj)
    before = event.old is not None and selects(event.old)
    if event.type == "MODIFIED":
        if before and now:
            return "MODIFIED"
        return "ADDED" if now else ("DELETED" if before else None)
    return event.type if now else None
