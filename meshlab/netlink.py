"""Kernel networking through netlink (pyroute2): namespaces, links, addresses, routes.

Thin, synchronous wrappers with the few operations meshlab needs; each raises
:class:`MeshlabError` naming the object it failed on.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from meshlab.errors import MeshlabError


def list_netns() -> list[str]:
    return sorted(netns.listnetns())


def create_netns(name: str) -> None:
    if name in netns.listnetns():
        raise MeshlabError(f"network namespace {name!r} already exists")
    netns.create(name)
    with _ns(name) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")


def delete_netns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


@contextlib.contextmanager
def _ns(name: str | None) -> Iterator[Any]:
    ipr = IPRoute() if name is None else NetNS(name)
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise MeshlabError(f"network interface {ifname!r} not found")
    return int(found[0])


def list_links(prefix: str, netns_name: str | None = None) -> list[str]:
    """Names of the links starting with ``prefix`` (in the root namespace by default)."""
    with _ns(netns_name) as ipr:
        names = (link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        return sorted(n for n in names if n and n.startswith(prefix))


def delete_link(name: str) -> None:
    with _ns(None) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            # Deleting one end of a veth removes the other: a race, not a failure.
            if e.code != errno.ENODEV:
                raise MeshlabError(f"cannot delete link {name!r}: {e}") from e


def create_bridge(name: str, address: IPv4Address, network: IPv4Network) -> None:
    """An underlay bridge in the root namespace, its gateway address on it."""
    with _ns(None) as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as e:
            raise MeshlabError(f"cannot create bridge {name!r}: {e}") from e
        idx = _index(ipr, name)
        ipr.addr("add", index=idx, address=str(address), prefixlen=network.prefixlen)
        ipr.link("set", index=idx, state="up")


def attach_node(
    *,
    uplink: str,
    bridge: str,
    netns_name: str,
    address: IPv4Address,
    network: IPv4Network,
) -> None:
    """A veth from the bridge into the node namespace, where it is ``eth0``.

    The peer is created directly inside the node namespace, so its name never
    collides with the host's own ``eth0``.
    """
    with _ns(None) as ipr:
        try:
            ipr.link(
                "add", ifname=uplink, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns_name}
            )
        except NetlinkError as e:
            raise MeshlabError(f"cannot create veth {uplink!r} into {netns_name!r}: {e}") from e
        idx = _index(ipr, uplink)
        ipr.link("set", index=idx, master=_index(ipr, bridge))
        ipr.link("set", index=idx, state="up")
    with _ns(netns_name) as ipr:
        idx = _index(ipr, "eth0")
        ipr.addr("add", index=idx, address=str(address), prefixlen=network.prefixlen)
        ipr.link("set", index=idx, state="up")


def add_route(netns_name: str, destination: IPv4Network, gateway: IPv4Address) -> None:
    with _ns(netns_name) as ipr:
        try:
            ipr.route("add", dst=str(destination), gateway=str(gateway))
        except NetlinkError as e:
            raise MeshlabError(
                f"cannot route {destination} via {gateway} in {netns_name!r}: {e}"
            ) from e


def root_networks() -> list[IPv4Network]:
    """Every IPv4 network the root namespace has an address or a route in."""
    nets: list[IPv4Network] = []
    with _ns(None) as ipr:
        for addr in ipr.get_addr(family=2):
            nets.append(
                IPv4Network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
            )
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST")
            if dst:
                nets.append(IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
    return nets


def addresses(netns_name: str, ifname: str) -> list[IPv4Address]:
    with _ns(netns_name) as ipr:
        idx = _index(ipr, ifname)
        return [IPv4Address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx, family=2)]
