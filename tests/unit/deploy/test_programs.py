"""The manifests run the programs as the programs really are: flags, env, ports and paths.

Each container's args (with Kubernetes' ``$(VAR)`` expansion done) are parsed
by the program's own ``build_parser()``; each env var must either be expanded
into those args or change what the parser reads (its defaults come from the
environment); each port the manifests declare (containerPort, readiness
probe, Service targetPort) must be one the program listens on, per the
parsed args, on an address other pods can reach, and the probe's path must be
one the program serves; each file or socket path given in the args must lie
on a volume of the right kind, and what two programs share (the ZDS socket,
meshd's address) must agree.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from controlplane import ca_service, kube_waypoints, serving
from controlplane import meshd as meshd_program
from tests.unit.deploy.render import (
    OVERLAYS,
    Obj,
    args_of,
    container,
    containers,
    env_values,
    find,
    mounted,
    mounts,
    pod_spec,
    referenced,
    render,
)
from ztunnel import cli as ztunnel_program
from ztunnel.admin.server import AdminServers
from ztunnel.nodeagent import cli as node_agent_program
from ztunnel.nodeagent import service
from ztunnel.nodeagent.health import HealthServer

# Which program each container runs (its `command`), and that program's parser.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "meshd": meshd_program.build_parser,
    "ztunnel": ztunnel_program.build_parser,
    "ztunnel-node-agent": node_agent_program.build_parser,
}


def _listens(program: str, args: argparse.Namespace) -> dict[int, str]:
    """port -> host of every socket the program listens on, per its parsed args."""
    if program == "meshd":
        addresses = [args.listen, args.tls_listen, args.status_listen]
    elif program == "ztunnel":
        addresses = [args.admin_address, args.metrics_address, args.readiness_address]
    else:
        addresses = [args.readiness_address]  # and its unix sockets
    return {port: host for host, port in (a for a in addresses if a is not None)}


def _parse(program: str, argv: list[str]) -> argparse.Namespace:
    try:
        return PARSERS[program]().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{program} refuses the manifest's args {argv} (its stderr says why)")


def _programs(overlay: str) -> list[tuple[Obj, Obj, str]]:
    out = []
    for workload, c in containers(render(overlay)):
        (program,) = c["command"]
        assert program in PARSERS, f"{c['name']} runs {program}, which no test knows"
        out.append((workload, c, program))
    return out


def _parsed(overlay: str, program: str) -> tuple[Obj, Obj, argparse.Namespace]:
    for workload, c, name in _programs(overlay):
        if name == program:
            return workload, c, _parse(program, args_of(c))
    raise AssertionError(f"no container runs {program}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_a_program_with_args_it_accepts(overlay: str) -> None:
    programs = _programs(overlay)
    assert sorted(p for _, _, p in programs) == sorted(PARSERS)
    for _, c, program in programs:
        argv = args_of(c)
        assert not [a for a in argv if "$(" in a], f"{c['name']}: unexpanded reference in {argv}"
        _parse(program, argv)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_is_expanded_into_the_args_or_read_by_the_program(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _, c, program in _programs(overlay):
        argv = args_of(c)
        used = referenced(c)
        for name in env_values(c):
            if name in used:
                continue
            # Read by the parser (a default from the environment) iff a probe value shows up.
            probe = f"probe-{name.lower()}"
            monkeypatch.setenv(name, probe)
            parsed = vars(_parse(program, argv))
            monkeypatch.delenv(name)
            assert probe in parsed.values(), (
                f"{c['name']}: env {name} is neither expanded into the args nor read by {program}"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_declared_ports_are_the_ones_the_programs_listen_on(overlay: str) -> None:
    objects = render(overlay)
    for _, c, program in _programs(overlay):
        listening = _listens(program, _parse(program, args_of(c)))
        declared = {p["containerPort"] for p in c.get("ports") or ()}
        reachable = {p for p, host in listening.items() if not host.startswith("127.")}
        assert declared == reachable, f"{c['name']}: declares {declared}, listens on {listening}"
        probe = (c.get("readinessProbe") or {}).get("httpGet")
        if probe is not None:
            assert probe["port"] in reachable
    meshd = container(find(objects, "Deployment", "meshd"), "meshd")
    service_ports = find(objects, "Service", "istiod")["spec"]["ports"]
    assert {p["targetPort"] for p in service_ports} == {p["containerPort"] for p in meshd["ports"]}
    assert {p["port"] for p in service_ports} == {15010, 15012, 15014}


def _get(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_meshd_serves_its_readiness_probe_path() -> None:
    _, c, args = _parsed("default", "meshd")
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == args.status_listen[1]

    async def scenario() -> tuple[int, int]:
        server = await meshd_program.serve_status(meshd_program.Meshd(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return (
                await asyncio.to_thread(_get, port, probe["path"]),
                await asyncio.to_thread(_get, port, "/no-such-path"),
            )
        finally:
            server.close()
            await server.wait_closed()

    # Not ready yet (no state): 503, where an unknown path is 404.
    assert asyncio.run(scenario()) == (503, 404)


class _NotReady:
    def ready(self) -> tuple[bool, str]:
        return False, "not synced"


def test_ztunnel_serves_its_readiness_probe_path() -> None:
    _, c, args = _parsed("default", "ztunnel")
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == args.readiness_address[1]

    async def scenario() -> tuple[int, int]:
        servers = AdminServers(cast(Any, _NotReady()))
        await servers.start(admin=None, metrics=None, readiness=("127.0.0.1", 0))
        port = servers.bound["readiness"][1]
        try:
            return (
                await asyncio.to_thread(_get, port, probe["path"]),
                await asyncio.to_thread(_get, port, "/no-such-path"),
            )
        finally:
            await servers.close()

    assert asyncio.run(scenario()) == (503, 404)


def test_node_agent_serves_its_readiness_probe_path() -> None:
    _, c, args = _parsed("default", "ztunnel-node-agent")
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == args.readiness_address[1]

    async def scenario() -> tuple[int, int]:
        health = HealthServer(_NotReady().ready)
        await health.start("127.0.0.1", 0)
        assert health.bound is not None
        try:
            return (
                await asyncio.to_thread(_get, health.bound[1], probe["path"]),
                await asyncio.to_thread(_get, health.bound[1], "/no-such-path"),
            )
        finally:
            await health.close()

    assert asyncio.run(scenario()) == (503, 404)


def test_ztunnel_finds_the_root_cert_the_token_and_the_zds_socket() -> None:
    ztunnel_ds, ztunnel_c, zt = _parsed("default", "ztunnel")
    agent_ds, agent_c, agent = _parsed("default", "ztunnel-node-agent")

    where, volume = mounted(ztunnel_ds, ztunnel_c, zt.root_cert) or ("", {})
    assert volume["configMap"]["name"] == kube_waypoints.ROOT_CERT_CONFIGMAP
    assert zt.root_cert.relative_to(where) == Path(kube_waypoints.ROOT_CERT_KEY)

    where, volume = mounted(ztunnel_ds, ztunnel_c, zt.token_file) or ("", {})
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert zt.token_file.relative_to(where) == Path(token["path"])
    # The same audience as the waypoint pods meshd makes present to its CA.
    assert token["audience"] == kube_waypoints.DeployerSettings().token_audience

    # The agent serves ZDS in its run dir; ztunnel dials the same host directory.
    assert zt.zds_socket == agent.run_dir / service.ZDS_SOCKET
    zt_where, zt_volume = mounted(ztunnel_ds, ztunnel_c, zt.zds_socket) or ("", {})
    agent_where, agent_volume = mounted(agent_ds, agent_c, agent.run_dir) or ("", {})
    assert zt_volume["hostPath"]["path"] == agent_volume["hostPath"]["path"]
    assert zt_where == agent_where  # and at the same path, the one the CNI plugin's runDir names


def test_node_agent_mounts_are_read_by_it_or_reserved_for_the_cni_installer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds, c, agent = _parsed("default", "ztunnel-node-agent")
    volumes = mounts(ds, c)
    # Read: the run dir (sockets, the plugin's pod records), the pods' netns paths
    # (CNI_NETNS as the runtime gives it, e.g. /var/run/netns/cni-1234), and the
    # node's CNI dirs the installer writes.
    read = {str(agent.run_dir), "/var/run/netns", str(agent.cni_bin_dir), str(agent.cni_conf_dir)}
    assert volumes[str(agent.cni_bin_dir)]["hostPath"]["path"] == "/opt/cni/bin"
    assert volumes[str(agent.cni_conf_dir)]["hostPath"]["path"] == "/etc/cni/net.d"
    # istio-cni's mount for what issue 11 adds next: entering pods that started
    # before the agent.
    reserved = {"/host/proc"}
    assert set(volumes) == read | reserved
    # The plugin's run dir on the host is the agent's: mounted at the same path.
    assert volumes[str(agent.run_dir)]["hostPath"]["path"] == str(agent.run_dir)
    for name, value in env_values(c).items():  # POD_NAMESPACE among them
        monkeypatch.setenv(name, value)
    installer = node_agent_program.make_installer(agent)
    assert installer is not None
    assert installer.entry["excludeNamespaces"] == ["istio-system", "kube-system"]
    netns = volumes["/var/run/netns"]["hostPath"]["path"]
    assert netns == "/var/run/netns"  # mounted where the host's paths point


def test_everyone_dials_meshd_where_its_service_and_certificate_say() -> None:
    objects = render("default")
    _, _, meshd_args = _parsed("default", "meshd")
    _, _, zt = _parsed("default", "ztunnel")
    svc = find(objects, "Service", "istiod")
    by_port = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
    for address in (zt.xds_address, meshd_args.waypoint_xds_address):
        host, _, port = address.rpartition(":")
        assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
        assert host in serving.DNS_NAMES  # meshd's serving certificate names it
        assert by_port[int(port)] == meshd_args.tls_listen[1]  # TLS: xDS and the CA
    assert meshd_args.waypoint_xds_address == kube_waypoints.DEFAULT_XDS_ADDRESS


def test_ztunnels_service_account_is_the_one_meshds_ca_trusts_as_node_agent() -> None:
    ds = find(render("default"), "DaemonSet", "ztunnel")
    assert (ds["metadata"]["namespace"], pod_spec(ds)["serviceAccountName"]) == (
        ca_service.NODE_AGENT_SERVICE_ACCOUNT
    )
