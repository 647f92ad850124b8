"""Istio's in-pod capture rules: iptables and a routing rule inside the pod's netns.

* outbound TCP (not to loopback, not from ztunnel) is REDIRECTed to 15001;
* inbound TCP (except to 15008, HBONE, and except from ztunnel) to 15006;
* DNS (UDP and TCP port 53, not from ztunnel) to 15053, when DNS capture is on;
* kubelet's probes, SNATed to 169.254.7.127, pass untouched;
* ztunnel's own sockets carry the mark ``0x539/0xfff``; the connections it
  opens are connmarked ``0x111/0xfff`` and replies to them are routed back
  to ztunnel (``ip rule fwmark 0x111/0xfff lookup 100``, ``local default dev
  lo`` in table 100), so it can connect to the app with the client's own
  source address.

Everything lives in chains of our own (``ISTIO_PRERT``, ``ISTIO_OUTPUT``)
reached by one jump from each built-in chain, so removal takes away exactly
what installation added.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from ztunnel.netns import in_netns

INPOD_MARK = 0x539
INPOD_TPROXY_MARK = 0x111
MARK_MASK = 0xFFF
ROUTE_TABLE = 100
RULE_PRIORITY = 32764
PROBE_SNAT_IP = "169.254.7.127"
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
CHAINS = ("ISTIO_PRERT", "ISTIO_OUTPUT")


class CaptureError(Exception):
    """Installing or removing capture failed; the message says where and why."""


def iptables_rules(*, dns: bool = True) -> str:
    """The rules, as ``iptables-restore --noflush`` input (IPv4)."""
    mark = f"0x{INPOD_MARK:x}/0x{MARK_MASK:x}"
    tproxy = f"0x{INPOD_TPROXY_MARK:x}/0x{MARK_MASK:x}"
    dns_rules = (
        [
            f"-A ISTIO_OUTPUT -p udp -m mark ! --mark {mark} -m udp --dport 53 "
            f"-j REDIRECT --to-ports {DNS_PORT}",
            f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {mark} -m tcp "
            f"--dport 53 -j REDIRECT --to-ports {DNS_PORT}",
        ]
        if dns
        else []
    )
    lines = [
        "*mangle",
        ":ISTIO_PRERT - [0:0]",
        ":ISTIO_OUTPUT - [0:0]",
        "-A PREROUTING -j ISTIO_PRERT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_PRERT -m mark --mark {mark} -j CONNMARK --set-xmark {tproxy}",
        f"-A ISTIO_OUTPUT -m connmark --mark {tproxy} -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff",
        "COMMIT",
        "*nat",
        ":ISTIO_PRERT - [0:0]",
        ":ISTIO_OUTPUT - [0:0]",
        "-A PREROUTING -j ISTIO_PRERT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_PRERT -s {PROBE_SNAT_IP}/32 -p tcp -m tcp -j ACCEPT",
        f"-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport {HBONE_PORT} "
        f"-m mark ! --mark {mark} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
        f"-A ISTIO_OUTPUT -d {PROBE_SNAT_IP}/32 -p tcp -m tcp -j ACCEPT",
        *dns_rules,
        f"-A ISTIO_OUTPUT -p tcp -m mark --mark {tproxy} -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {mark} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


_JUMPS = ("-A PREROUTING -j ISTIO_PRERT", "-A OUTPUT -j ISTIO_OUTPUT")


def _removal(dumps: dict[str, str]) -> str:
    """What takes our chains out of each table, given its ``iptables-save`` dump:
    only the jumps that are there (someone may have flushed them)."""
    lines = []
    for table, dump in dumps.items():
        present = set(dump.splitlines())
        lines += [
            f"*{table}",
            *("-D" + jump[2:] for jump in _JUMPS if jump in present),
            *(f"-F {c}" for c in CHAINS),
            *(f"-X {c}" for c in CHAINS),
            "COMMIT",
        ]
    return "\n".join(lines) + "\n"


def _expected(dns: bool) -> dict[str, list[list[str]]]:
    """The rules of :func:`iptables_rules`, per table, as ``iptables -C`` arguments."""
    table = ""
    rules: dict[str, list[list[str]]] = {}
    for line in iptables_rules(dns=dns).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            rules.setdefault(table, []).append(shlex.split(line[3:]))
    return rules


def missing(netns: Path, *, dns: bool = False) -> list[str]:
    """What of the capture is not in place in ``netns``: each absent rule (checked
    with ``iptables -C``, so formatting does not matter), the reply routing rule and
    route. Empty when all is there. DNS rules are checked only with ``dns``."""
    absent = []
    for table, rules in _expected(dns).items():
        for rule in rules:
            check = ["nsenter", f"--net={netns}", "iptables", "-w", "-t", table, "-C", *rule]
            try:
                done = subprocess.run(check, capture_output=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise CaptureError(f"iptables in {netns}: {e}") from e
            if done.returncode != 0:
                absent.append(f"{table}: -A {shlex.join(rule)}")
    try:
        with netlink_in(netns) as ns:
            rules = [
                r
                for r in ns.get_rules(family=socket.AF_INET, priority=RULE_PRIORITY)
                if r.get_attr("FRA_TABLE") == ROUTE_TABLE
            ]
            routes = ns.get_routes(family=socket.AF_INET, table=ROUTE_TABLE)
    except (NetlinkError, OSError) as e:
        raise CaptureError(f"reading the routing of {netns}: {e}") from e
    if not rules:
        absent.append(
            f"ip rule fwmark 0x{INPOD_TPROXY_MARK:x}/0x{MARK_MASK:x} lookup {ROUTE_TABLE}"
        )
    if not any(r.get_attr("RTA_TABLE") == ROUTE_TABLE for r in routes):
        absent.append(f"ip route local default dev lo table {ROUTE_TABLE}")
    return absent


def _run(netns: Path, argv: list[str], stdin: str = "") -> str:
    try:
        done = subprocess.run(
            ["nsenter", f"--net={netns}", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaptureError(f"{argv[0]} in {netns}: {e}") from e
    if done.returncode != 0:
        raise CaptureError(f"{argv[0]} in {netns} failed: {done.stderr.strip()}")
    return done.stdout


def installed_tables(netns: Path) -> list[str]:
    """The tables (of mangle, nat) in which our chains exist in ``netns``."""
    found = []
    for table in ("mangle", "nat"):
        dump = _run(netns, ["iptables-save", "-t", table])
        if any(line.startswith(f":{CHAINS[1]} ") for line in dump.splitlines()):
            found.append(table)
    return found


def install(netns: Path, *, dns: bool = True) -> None:
    """Capture ``netns``'s traffic; idempotent (an earlier capture is replaced)."""
    uninstall(netns)
    _run(netns, ["iptables-restore", "--noflush"], iptables_rules(dns=dns))
    try:
        with netlink_in(netns) as ns:
            lo = ns.link_lookup(ifname="lo")
            if not lo:
                raise CaptureError(f"{netns} has no loopback interface")
            ns.rule(
                "add",
                family=socket.AF_INET,
                fwmark=INPOD_TPROXY_MARK,
                fwmask=MARK_MASK,
                table=ROUTE_TABLE,
                priority=RULE_PRIORITY,
            )
            ns.route("add", dst="0.0.0.0/0", type="local", scope=254, table=ROUTE_TABLE, oif=lo[0])
    except (NetlinkError, OSError) as e:
        uninstall(netns)
        raise CaptureError(f"routing for replies in {netns}: {e}") from e


def uninstall(netns: Path) -> None:
    """Remove exactly what :func:`install` added (whatever part of it is there)."""
    tables = installed_tables(netns)
    if tables:
        dumps = {t: _run(netns, ["iptables-save", "-t", t]) for t in tables}
        _run(netns, ["iptables-restore", "--noflush"], _removal(dumps))
    try:
        with netlink_in(netns) as ns:
            for rule in ns.get_rules(family=socket.AF_INET, priority=RULE_PRIORITY):
                if rule.get_attr("FRA_TABLE") == ROUTE_TABLE:
                    ns.rule(
                        "del",
                        family=socket.AF_INET,
                        priority=RULE_PRIORITY,
                        table=ROUTE_TABLE,
                        fwmark=INPOD_TPROXY_MARK,
                        fwmask=MARK_MASK,
                    )
            for route in ns.get_routes(family=socket.AF_INET, table=ROUTE_TABLE):
                if route.get_attr("RTA_TABLE") != ROUTE_TABLE:
                    continue
                ns.route(
                    "del",
                    dst="0.0.0.0/0",
                    type="local",
                    scope=254,
                    table=ROUTE_TABLE,
                    oif=route.get_attr("RTA_OIF"),
                )
    except (NetlinkError, OSError) as e:
        raise CaptureError(f"removing the reply routing in {netns}: {e}") from e


class netlink_in:
    """``with netlink_in(path) as ns``: a netlink socket in the namespace at ``path``.

    Made by a thread that steps into the namespace (not pyroute2's ``NetNS``,
    which forks a helper: unsafe in a process with gRPC's threads running).
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.ns = in_netns(fd, IPRoute)
        finally:
            os.close(fd)

    def __enter__(self) -> IPRoute:
        return self.ns

    def __exit__(self, *exc: object) -> None:
        self.ns.close()
