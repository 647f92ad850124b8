"""``verify``: does each enrolled pod have what ztunnel promised it?

For every pod in the dump's ``workloadState`` (the pods ztunnel holds), in
the pod's network namespace (the ``netns`` path the admin server gives,
``/proc/<ztunnel pid>/fd/<n>``, openable by root on the node):

* every capture rule is in place (each checked with ``iptables -C``) and
  the reply routing too (:func:`ztunnel.capture.inpod.missing`), else the
  node agent must reinstall them; for a pod the node's eBPF programs capture
  (the dump's ``capture``), its entry in ``zt_pods``, the tc filter on each of
  its interfaces, the programs on its cgroup and the reply routing
  (:meth:`ztunnel.capture.ebpf.EbpfCapture.missing`, the pins in the dump's
  ``bpfDir``);
* ztunnel listens on 15001, 15006 and 15008 (TCP), and 15053 (DNS; a
  warning only, as DNS capture may be off), read from the namespace's
  ``/proc/thread-self/net/{tcp,udp}`` (connecting would be a connection);
* the pod's identity has an ``Available`` certificate whose leaf is valid now;

and, for the node, that ztunnel has synced with meshd. Any error is drift
(exit code 1); each says the fix.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpf.capture import cgroup2_mount
from ztunnel.capture.ebpf import EbpfCapture
from ztunnel.capture.inpod import CaptureError, missing
from ztunnel.ctl.document import Dump, Entry
from ztunnel.ctl.tables import cert_valid
from ztunnel.netns import in_netns

Doc = dict[str, Any]
LISTENERS = {15001: "outbound", 15006: "inbound plaintext", 15008: "HBONE"}
DNS_PORT = 15053
TCP_LISTEN = "0A"


def listening(netns: Path) -> set[tuple[str, int]]:
    """``("tcp" | "udp", port)`` of the listening TCP and bound UDP sockets in ``netns``."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(fd, _sockets_here)
    finally:
        os.close(fd)


def _sockets_here() -> set[tuple[str, int]]:
    # /proc/thread-self: this thread is the one inside the namespace.
    found: set[tuple[str, int]] = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            text = Path(f"/proc/thread-self/net/{proto}").read_text()
        except FileNotFoundError:  # no IPv6
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or (proto.startswith("tcp") and fields[3] != TCP_LISTEN):
                continue
            found.add((proto[:3], int(fields[1].rsplit(":", 1)[1], 16)))
    return found


def ebpf_missing(netns: Path, bpf_dir: Path) -> list[str]:
    """What of a pod's eBPF capture is absent (the node's pins under ``bpf_dir``)."""
    root = cgroup2_mount()
    if root is None:
        raise CaptureError("this host has no cgroup v2 mount to check the pod's cgroup in")
    # Read-only: what the agent pinned, never this build's programs loaded instead.
    # (DNS capture may be off on the node: the listener check says what matters.)
    capture = EbpfCapture(bpf_dir, root, dns=False, load=False)
    try:
        return capture.missing(netns, None)
    finally:
        capture.programs.close()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Probes:
    """How the node is inspected; tests pass fakes."""

    capture: Callable[[Path], list[str]] = missing  # what of the capture is absent
    ebpf_capture: Callable[[Path, Path], list[str]] = ebpf_missing  # (netns, bpf dir)
    sockets: Callable[[Path], set[tuple[str, int]]] = listening
    now: Callable[[], datetime.datetime] = _now
    exists: Callable[[Path], bool] = Path.exists
    # The dump's netns path as this host sees it (ztunnel in a container: hostpid.py).
    host_path: Callable[[str], str] = str


def _check(name: str, ok: bool, detail: str, fix: str = "", severity: str = "error") -> Doc:
    return {
        "check": name,
        "ok": ok,
        "severity": severity,
        "detail": detail,
        "fix": "" if ok else fix,
    }


def verify(dump: Dump, probes: Probes | None = None) -> Doc:
    probes = probes or Probes()
    node = dump.config.get("node") or "?"
    synced = dump.config.get("synced")
    node_checks = [
        _check(
            "xds",
            synced is not False,
            "synced with meshd" if synced is not False else "not synced with meshd",
            "ztunnel has no complete xDS state: check that meshd is reachable from the node "
            "(ztunnel's log names the address it tries)",
        )
    ]
    certs = {c.get("identity"): c for c in dump.certificates()}
    now = probes.now()
    pods = []
    states = sorted(
        dump.workload_state().items(),
        key=lambda kv: (_info(kv[1]).get("namespace", ""), _info(kv[1]).get("name", "")),
    )
    bpf_dir = dump.config.get("bpfDir") or "/sys/fs/bpf/ztunnel"
    for uid, state in states:
        info = _info(state)
        capture = str(state.get("capture") or "iptables")
        checks = []
        if state.get("state", "Up") != "Up":
            checks.append(
                _check(
                    "state",
                    False,
                    f"ztunnel reports the pod {state.get('state')!r}",
                    "ztunnel has not finished setting the pod up: see its log",
                )
            )
        netns = state.get("netns")
        if isinstance(netns, str) and netns:
            netns = probes.host_path(netns)
        if not isinstance(netns, str) or not netns:
            checks.append(
                _check(
                    "netns",
                    False,
                    "the dump gives no netns for the pod",
                    "ztunnel's admin server must report each pod's netns",
                )
            )
        elif not probes.exists(Path(netns)):
            checks.append(
                _check(
                    "netns",
                    False,
                    f"{netns} does not exist",
                    "run verify as root on the node's host; if it still fails, ztunnel lost "
                    "the pod's netns: restart ztunnel",
                )
            )
        else:
            checks += _netns_checks(Path(netns), probes, capture, bpf_dir)
        checks.append(_cert_check(info, certs, now))
        pods.append(
            {
                "pod": f"{info.get('namespace', '')}/{info.get('name', '')}",
                "uid": uid,
                "netns": netns,
                "capture": capture,
                "ok": all(c["ok"] or c["severity"] != "error" for c in checks),
                "checks": checks,
            }
        )
    drift = not all(c["ok"] for c in node_checks) or not all(p["ok"] for p in pods)
    return {"node": node, "checks": node_checks, "pods": pods, "drift": drift}


def _info(state: Entry) -> Entry:
    info = state.get("info")
    return info if isinstance(info, dict) else {}


def _netns_checks(netns: Path, probes: Probes, capture: str, bpf_dir: str) -> list[Doc]:
    checks = []
    try:
        if capture == "ebpf":
            gone = probes.ebpf_capture(netns, Path(bpf_dir))
        else:
            gone = probes.capture(netns)
    except (CaptureError, OSError) as e:
        what = "the eBPF capture" if capture == "ebpf" else "iptables"
        checks.append(
            _check("capture", False, f"cannot read {what} in {netns}: {e}", "run as root")
        )
    else:
        shown = "; ".join(gone[:3]) + (f"; and {len(gone) - 3} more" if len(gone) > 3 else "")
        checks.append(
            _check(
                "capture",
                not gone,
                (
                    "the eBPF programs, maps and the reply routing in place"
                    if capture == "ebpf"
                    else "every capture rule and the reply routing in place"
                )
                if not gone
                else f"missing: {shown}",
                "restart the node agent to reinstall capture",
            )
        )
    try:
        sockets = probes.sockets(netns)
    except OSError as e:
        checks.append(_check("listeners", False, f"cannot enter {netns}: {e}", "run as root"))
        return checks
    absent = [p for p in LISTENERS if ("tcp", p) not in sockets]
    if len(absent) == len(LISTENERS):
        detail = "the pod is enrolled but ztunnel has no listeners in its netns"
    elif absent:
        detail = "not listening on " + ", ".join(f"{p} ({LISTENERS[p]})" for p in absent)
    else:
        detail = "listening on " + ", ".join(str(p) for p in LISTENERS)
    checks.append(_check("listeners", not absent, detail, "restart ztunnel"))
    dns = ("udp", DNS_PORT) in sockets or ("tcp", DNS_PORT) in sockets
    checks.append(
        _check(
            "dns",
            dns,
            f"DNS proxy on {DNS_PORT}" if dns else f"nothing listens on {DNS_PORT}",
            "if DNS capture is on, the pod's queries go nowhere: restart ztunnel",
            severity="warning",
        )
    )
    return checks


def _cert_check(info: Entry, certs: dict[Any, Entry], now: datetime.datetime) -> Doc:
    identity = (
        f"spiffe://{info.get('trustDomain') or 'cluster.local'}/ns/{info.get('namespace', '')}"
        f"/sa/{info.get('serviceAccount') or 'default'}"
    )
    cert = certs.get(identity)
    ca_hint = "check that meshd's CA is reachable from the node and the node's token is valid"
    if cert is None:
        return _check("certificate", False, f"no certificate for {identity}", ca_hint)
    state = str(cert.get("state", ""))
    if state != "Available":
        return _check("certificate", False, f"{identity}: {state or 'no state'}", ca_hint)
    chain = cert.get("certChain")
    leaf = chain[0] if isinstance(chain, list) and chain and isinstance(chain[0], dict) else None
    if leaf is None:
        return _check("certificate", False, f"{identity}: Available, but no chain", ca_hint)
    expiry = leaf.get("expirationTime", "?")
    if not cert_valid(leaf, now):
        return _check(
            "certificate",
            False,
            f"{identity}: not valid now (valid {leaf.get('validFrom', '?')} to {expiry})",
            f"renewal is failing: {ca_hint}; restarting ztunnel fetches it again",
        )
    return _check("certificate", True, f"{identity}, valid until {expiry}")


def render(result: Doc) -> str:
    lines = [f"node {result['node']}: {len(result['pods'])} enrolled pod(s)"]

    def show(check: Doc, indent: str) -> None:
        mark = "ok" if check["ok"] else ("WARN" if check["severity"] == "warning" else "FAIL")
        lines.append(f"{indent}{mark:<5} {check['check']:<12} {check['detail']}")
        if check["fix"]:
            lines.append(f"{indent}{'':<5} {'':<12} fix: {check['fix']}")

    for check in result["checks"]:
        show(check, "  ")
    for pod in result["pods"]:
        lines.append(f"  {pod['pod']} ({pod['capture']}, netns {pod['netns'] or '?'})")
        for check in pod["checks"]:
            show(check, "    ")
    problems = sum(not c["ok"] for c in result["checks"]) + sum(
        not c["ok"] and c["severity"] == "error" for p in result["pods"] for c in p["checks"]
    )
    lines.append(f"drift: {problems} problem(s)" if result["drift"] else "no drift")
    return "\n".join(lines) + "\n"
