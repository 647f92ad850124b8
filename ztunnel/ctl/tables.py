"""The tables of ``istioctl ztunnel-config``, from the raw dump entries.

Columns, order, sorting and cell values follow istioctl's writers
(``istioctl/pkg/writer/ztunnel/configdump/*.go``); the layout follows Go's
``text/tabwriter`` as istioctl sets it up: each column but the last padded
to its widest cell plus 1 space (5 for certificates).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from ztunnel.ctl.document import Dump, Entry


def tabwrite(rows: Sequence[Sequence[str]], padding: int = 1) -> str:
    """Go's ``tabwriter`` (flags 0) for rows of equal length: the last cell is not padded."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) + padding for i in range(len(rows[0]) - 1)]
    lines = [
        "".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + row[-1] for row in rows
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Filters:
    namespace: str = ""
    address: str = ""
    node: str = ""  # the workloads' node (istioctl's --workload-node)
    direction: str = ""  # connections: inbound | outbound
    raw: bool = False  # connections: addresses, not names


def _fold(a: object, b: str) -> bool:
    return isinstance(a, str) and a.casefold() == b.casefold()


def _s(entry: Entry, key: str) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else ""


def _list(entry: Entry, key: str) -> list[str]:
    value = entry.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# --- workloads ---------------------------------------------------------------


def select_workloads(dump: Dump, f: Filters) -> list[Entry]:
    """Filtered as istioctl's ``WorkloadFilter``, sorted by namespace.name, then node."""
    chosen = [
        w
        for w in dump.workloads()
        if (not f.namespace or _fold(w.get("namespace"), f.namespace))
        and (not f.address or any(_fold(ip, f.address) for ip in _list(w, "workloadIps")))
        and (not f.node or _fold(w.get("node"), f.node))
    ]
    return sorted(chosen, key=lambda w: (f"{_s(w, 'namespace')}.{_s(w, 'name')}", _s(w, "node")))


def workloads_table(dump: Dump, workloads: list[Entry]) -> str:
    rows = [["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]]
    services = dump.services()
    for w in workloads:
        address = ",".join(_list(w, "workloadIps")) or _s(w, "hostname")
        rows.append(
            [
                _s(w, "namespace"),
                _s(w, "name"),
                address,
                _s(w, "node"),
                waypoint_name(w, services),
                _s(w, "protocol"),
            ]
        )
    return tabwrite(rows)


def waypoint_name(entry: Entry, services: list[Entry]) -> str:
    """The waypoint's service name: ``None`` without one, ``NA`` if no service matches."""
    waypoint = entry.get("waypoint")
    if not isinstance(waypoint, dict):
        return "None"
    destination = waypoint.get("destination")
    for svc in services:
        if f"{_s(svc, 'namespace')}/{_s(svc, 'hostname')}" == destination:
            return _s(svc, "name")
        if destination in _list(svc, "vips"):
            return _s(svc, "name")
    return "NA"


# --- services ----------------------------------------------------------------


def select_services(dump: Dump, f: Filters) -> list[Entry]:
    chosen = [
        s for s in dump.services() if not f.namespace or _fold(s.get("namespace"), f.namespace)
    ]
    return sorted(chosen, key=lambda s: (_s(s, "namespace"), _s(s, "name"), _s(s, "hostname")))


def services_table(dump: Dump, services: list[Entry]) -> str:
    """ENDPOINTS is healthy/total over the service's endpoints *and* the workloads that
    list it: ztunnel leaves unhealthy endpoints out of ``endpoints`` (unless the
    service allows all), and an operator wants to see them counted."""
    rows = [["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"]]
    workloads = dump.workloads()
    by_uid = {_s(w, "uid"): w for w in workloads}
    all_services = dump.services()
    for svc in services:
        key = f"{_s(svc, 'namespace')}/{_s(svc, 'hostname')}"
        endpoints = svc.get("endpoints")
        uids = set(endpoints) if isinstance(endpoints, dict) else set()
        uids |= {_s(w, "uid") for w in workloads if key in _list(w, "services")}
        healthy = sum(1 for uid in uids if _s(by_uid.get(uid, {}), "status") == "Healthy")
        vips = [v.partition("/")[2] for v in _list(svc, "vips")]
        rows.append(
            [
                _s(svc, "namespace"),
                _s(svc, "name"),
                ",".join(vips),
                waypoint_name(svc, all_services),
                f"{healthy}/{len(uids)}",
            ]
        )
    return tabwrite(rows)


# --- policies ----------------------------------------------------------------


def select_policies(dump: Dump, f: Filters) -> list[Entry]:
    chosen = [
        p for p in dump.policies() if not f.namespace or _fold(p.get("namespace"), f.namespace)
    ]
    return sorted(chosen, key=lambda p: (_s(p, "namespace"), _s(p, "name")))


def policies_table(policies: list[Entry]) -> str:
    rows = [["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]]
    rows += [[_s(p, "namespace"), _s(p, "name"), _s(p, "action"), _s(p, "scope")] for p in policies]
    return tabwrite(rows)


# --- certificates ------------------------------------------------------------


def certificates_table(certs: list[Entry], now: datetime.datetime | None = None) -> str:
    """One row per certificate of each identity: Leaf, Intermediate..., Root."""
    now = now or datetime.datetime.now(datetime.UTC)
    header = "CERTIFICATE NAME|TYPE|STATUS|VALID CERT|SERIAL NUMBER|NOT AFTER|NOT BEFORE"
    rows = [header.split("|")]
    for entry in certs:
        identity, state = _s(entry, "identity"), _s(entry, "state")
        if "Unavailable" in state:
            state = "Unavailable"
        chain = _certs(entry, "certChain")
        roots = _certs(entry, "rootCerts")
        if not chain:
            rows.append([identity, "NA", state, "false", "NA", "NA", "NA"])
            continue
        legacy = not roots  # the root used to be the chain's last element
        for i, cert in enumerate(chain):
            last = i == len(chain) - 1
            kind = "Leaf" if i == 0 else "Root" if last and legacy else "Intermediate"
            rows.append(_cert_row(identity, kind, state, cert, now))
        rows += [_cert_row(identity, "Root", state, cert, now) for cert in roots]
    return tabwrite(rows, padding=5)


def _certs(entry: Entry, key: str) -> list[Entry]:
    value = entry.get(key)
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def _cert_row(
    identity: str, kind: str, state: str, cert: Entry, now: datetime.datetime
) -> list[str]:
    serial = _s(cert, "serialNumber")
    shown = format(int(serial), "x") if serial.isdigit() else serial or "NA"
    not_after, not_before = _s(cert, "expirationTime"), _s(cert, "validFrom")
    valid = cert_valid(cert, now)
    return [identity, kind, state, str(valid).lower(), shown, not_after or "NA", not_before or "NA"]


def cert_valid(cert: Entry, now: datetime.datetime) -> bool:
    """Whether ``now`` is inside the certificate's validity (False if a time is unreadable)."""
    try:
        start = datetime.datetime.fromisoformat(_s(cert, "validFrom"))
        end = datetime.datetime.fromisoformat(_s(cert, "expirationTime"))
    except ValueError:
        return False
    if start.tzinfo is None or end.tzinfo is None:
        return False
    return start < now < end


# --- connections -------------------------------------------------------------


def select_connections(conns: list[Entry], f: Filters) -> list[Entry]:
    """Filtered by the workload's namespace and direction, grouped by workload."""
    chosen = [
        c
        for c in conns
        if (not f.namespace or _s(c, "workload").partition("/")[0] == f.namespace)
        and (not f.direction or _s(c, "direction") == f.direction)
    ]
    order = {"inbound": 0, "outbound": 1}

    def key(c: Entry) -> tuple[str, str, int]:
        namespace, _, name = _s(c, "workload").partition("/")
        return namespace, name, order.get(_s(c, "direction"), 2)

    return sorted(chosen, key=key)


def connections_table(dump: Dump | None, conns: list[Entry], raw: bool = False) -> str:
    """istioctl's connections table; addresses become ``host:port`` names unless ``raw``."""
    names: dict[str, str] = {}
    if dump is not None and not raw:
        for w in dump.workloads():
            ips = _list(w, "workloadIps")
            names[ips[0] if ips else "None"] = f"{_s(w, 'name')}.{_s(w, 'namespace')}"
        for svc in dump.services():  # a service name wins over a workload's
            vips = _list(svc, "vips")
            names[vips[0].partition("/")[2] if vips else "None"] = _s(svc, "hostname")

    def name(addr: str) -> str:
        host, sep, port = addr.rpartition(":")
        known = names.get(host.strip("[]")) if sep else None
        return f"{known}:{port}" if known else addr

    rows = [["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL"]]
    for c in conns:
        namespace, _, pod = _s(c, "workload").partition("/")
        workload = f"{pod}.{namespace}"
        src, original, actual = _s(c, "src"), _s(c, "originalDst"), _s(c, "actualDst")
        if _s(c, "direction") == "inbound":
            rows.append([workload, "Inbound", name(actual), name(src), original, _s(c, "protocol")])
        else:
            rows.append(
                [workload, "Outbound", name(src), name(actual), name(original), _s(c, "protocol")]
            )
    return tabwrite(rows)
