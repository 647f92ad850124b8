"""Which of the node's pods should be enrolled: a pure decision over one view.

A pod the CNI plugin recorded is wanted in the mesh when the view knows it
and :func:`mesh.ambient.in_ambient` says so for its labels and its
namespace's. A recorded pod the view does not know yet is left as it is
(neither enrolled nor dropped on a guess). An enrolled pod whose record is
gone (CNI DEL) or whose network namespace no longer exists is un-enrolled.

Each enrolled pod's redirection state is reported on it as istio-cni does,
in the annotation ``ambient.istio.io/redirection``: ``enabled`` once its
traffic is captured and ztunnel has it, ``pending`` while it is captured but
no ztunnel has taken it yet; removed when the pod leaves the mesh.
:func:`redirection_changes` says which pods' annotations differ from that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mesh.ambient import in_ambient
from ztunnel.nodeagent.records import PodRecord
from ztunnel.nodeagent.view import ClusterView
from ztunnel.zds.protocol import PodInfo

REDIRECTION = "ambient.istio.io/redirection"
ENABLED = "enabled"
PENDING = "pending"
Key = tuple[str, str]  # (namespace, name)


class Unknown:
    """The view does not know the pod (yet)."""


UNKNOWN = Unknown()


def wanted(view: ClusterView, record: PodRecord) -> PodInfo | Unknown | None:
    """The pod's info when it belongs in the mesh, None when not, UNKNOWN when unsure."""
    facts = view.pods.get((record.namespace, record.name))
    if facts is None:
        return UNKNOWN
    if not in_ambient(facts.labels, view.namespaces.get(record.namespace, {})):
        return None
    return PodInfo(
        name=facts.name, namespace=facts.namespace, service_account=facts.service_account
    )


def ambient_namespaces(view: ClusterView) -> list[str]:
    """Namespaces whose pods join the mesh by default (the CNI plugin's fallback hint)."""
    return sorted(ns for ns, labels in view.namespaces.items() if in_ambient({}, labels))


@dataclass(frozen=True, slots=True)
class Plan:
    enroll: tuple[tuple[PodRecord, PodInfo], ...] = ()
    unenroll: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()  # records of pods whose network namespace is gone

    def __bool__(self) -> bool:
        return bool(self.enroll or self.unenroll or self.forget)


def plan(
    view: ClusterView,
    records: Mapping[str, PodRecord],
    enrolled: Mapping[str, PodInfo],
    netns_exists: Callable[[str], bool],
) -> Plan:
    enroll: list[tuple[PodRecord, PodInfo]] = []
    unenroll: list[str] = []
    forget: list[str] = []
    for uid, record in sorted(records.items()):
        if not netns_exists(record.netns):
            forget.append(uid)
            if uid in enrolled:
                unenroll.append(uid)
            continue
        want = wanted(view, record)
        if isinstance(want, Unknown):
            continue
        if want is None:
            if uid in enrolled:
                unenroll.append(uid)
        elif uid not in enrolled:
            enroll.append((record, want))
    unenroll.extend(uid for uid in sorted(enrolled) if uid not in records)
    return Plan(tuple(enroll), tuple(unenroll), tuple(forget))


def redirection_changes(
    view: ClusterView, desired: Mapping[Key, str]
) -> list[tuple[Key, str | None]]:
    """The annotation each pod of the view should get (None: removed) to say what
    ``desired`` says of it; a pod ``desired`` does not name is not in the mesh. A value
    the agent never writes (an old Istio's opt-out ``disabled``, say) is left alone."""
    changes: list[tuple[Key, str | None]] = []
    for key, facts in sorted(view.pods.items()):
        want = desired.get(key)
        if want is None and facts.redirection not in (ENABLED, PENDING):
            continue
        if want != facts.redirection:
            changes.append((key, want))
    return changes
