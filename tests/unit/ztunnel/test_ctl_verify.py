"""``verify``: drift between what ztunnel says it holds and the pods' namespaces.

The checks run on the saved dump with fake probes (what the namespaces would
show); the real probes are tried on a scratch namespace when run as root.
A live node is the integration tests' business.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.ztunnel.test_ctl_fixture import SLEEP_ID, dump_copy
from ztunnel.capture.inpod import CaptureError, install, installed_tables, missing
from ztunnel.ctl import cli
from ztunnel.ctl.document import Dump
from ztunnel.ctl.verify import Probes, listening, render, verify
from ztunnel.netns import in_netns

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
ALL_LISTENERS = {("tcp", 15001), ("tcp", 15006), ("tcp", 15008), ("udp", 15053)}


def probes(
    absent: dict[str, list[str]] | None = None,
    sockets: dict[str, set[tuple[str, int]]] | None = None,
    missing: tuple[str, ...] = (),
) -> Probes:
    """Every netns healthy, unless ``absent`` (capture rules missing) or ``sockets``
    say otherwise (by netns path)."""
    return Probes(
        capture=lambda p: (absent or {}).get(str(p), []),
        sockets=lambda p: (sockets or {}).get(str(p), ALL_LISTENERS),
        now=lambda: NOW,
        exists=lambda p: str(p) not in missing,
    )


def healthy_dump() -> dict[str, Any]:
    """The fixture with echo-1's certificate made Available too."""
    doc = dump_copy()
    sleep = next(c for c in doc["certificates"] if c["identity"] == SLEEP_ID)
    echo = next(c for c in doc["certificates"] if c["identity"].endswith("/sa/echo"))
    echo.update(state="Available", certChain=sleep["certChain"], rootCerts=sleep["rootCerts"])
    return doc


def failing(result: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """The errors (not the warnings) of each pod."""
    return {
        p["pod"]: [
            (c["check"], c["detail"], c["fix"])
            for c in p["checks"]
            if not c["ok"] and c["severity"] == "error"
        ]
        for p in result["pods"]
    }


def test_no_drift_when_every_pod_has_its_capture_listeners_and_certificate() -> None:
    result = verify(Dump(healthy_dump(), "dump"), probes())
    assert result["drift"] is False
    assert [p["pod"] for p in result["pods"]] == ["client/sleep", "server/echo-1"]
    assert failing(result) == {"client/sleep": [], "server/echo-1": []}
    assert [c["check"] for c in result["pods"][0]["checks"]] == [
        "capture",
        "listeners",
        "dns",
        "certificate",
    ]
    assert render(result) == (
        "node node1: 2 enrolled pod(s)\n"
        "  ok    xds          synced with meshd\n"
        "  client/sleep (iptables, netns /proc/1234/fd/7)\n"
        "    ok    capture      every capture rule and the reply routing in place\n"
        "    ok    listeners    listening on 15001, 15006, 15008\n"
        "    ok    dns          DNS proxy on 15053\n"
        f"    ok    certificate  {SLEEP_ID}, valid until 2099-01-02T00:00:00Z\n"
        "  server/echo-1 (iptables, netns /proc/1234/fd/8)\n"
        "    ok    capture      every capture rule and the reply routing in place\n"
        "    ok    listeners    listening on 15001, 15006, 15008\n"
        "    ok    dns          DNS proxy on 15053\n"
        "    ok    certificate  spiffe://cluster.local/ns/server/sa/echo, "
        "valid until 2099-01-02T00:00:00Z\n"
        "no drift\n"
    )


def test_drift_is_reported_with_the_fix() -> None:
    result = verify(
        Dump(dump_copy(), "dump"),  # echo's certificate is Unavailable
        probes(
            absent={"/proc/1234/fd/7": ["nat: -A OUTPUT -j ISTIO_OUTPUT"]},
            sockets={"/proc/1234/fd/8": {("udp", 15053)}},
        ),
    )
    assert result["drift"] is True
    assert failing(result) == {
        "client/sleep": [
            (
                "capture",
                "missing: nat: -A OUTPUT -j ISTIO_OUTPUT",
                "restart the node agent to reinstall capture",
            )
        ],
        "server/echo-1": [
            (
                "listeners",
                "the pod is enrolled but ztunnel has no listeners in its netns",
                "restart ztunnel",
            ),
            (
                "certificate",
                "spiffe://cluster.local/ns/server/sa/echo: Unavailable: "
                "the CA at 10.0.0.1:15012 is unreachable",
                "check that meshd's CA is reachable from the node and the node's token is valid",
            ),
        ],
    }
    assert render(result).endswith("drift: 3 problem(s)\n")


def test_a_pod_the_ebpf_programs_capture_is_checked_for_them_not_for_iptables() -> None:
    doc = healthy_dump()
    doc["config"]["bpfDir"] = "/sys/fs/bpf/node1"
    sleep_uid = next(u for u, s in doc["workloadState"].items() if s["info"]["name"] == "sleep")
    doc["workloadState"][sleep_uid]["capture"] = "ebpf"
    asked: list[tuple[str, str]] = []

    def ebpf(netns: Path, pins: Path) -> list[str]:
        asked.append((str(netns), str(pins)))
        return ["tc ingress filter zt_ingress on eth0"]

    checks = Probes(
        capture=lambda p: pytest.fail(f"iptables checked for {p}"),
        ebpf_capture=ebpf,
        sockets=lambda _: ALL_LISTENERS,
        now=lambda: NOW,
        exists=lambda _: True,
    )
    only_sleep = {uid: s for uid, s in doc["workloadState"].items() if uid == sleep_uid}
    doc["workloadState"] = only_sleep
    result = verify(Dump(doc, "dump"), checks)
    assert asked == [("/proc/1234/fd/7", "/sys/fs/bpf/node1")]
    assert failing(result) == {
        "client/sleep": [
            (
                "capture",
                "missing: tc ingress filter zt_ingress on eth0",
                "restart the node agent to reinstall capture",
            )
        ]
    }
    assert "client/sleep (ebpf, netns /proc/1234/fd/7)" in render(result)


def test_a_missing_listener_an_expired_certificate_and_an_unsynced_ztunnel() -> None:
    doc = healthy_dump()
    doc["config"]["synced"] = False
    doc["certificates"][1]["certChain"][0]["expirationTime"] = "2025-06-01T00:00:00Z"
    result = verify(
        Dump(doc, "dump"),
        probes(sockets={"/proc/1234/fd/8": {("tcp", 15001), ("tcp", 15008)}}),
    )
    assert result["checks"][0]["ok"] is False and "meshd is reachable" in result["checks"][0]["fix"]
    problems = failing(result)
    assert problems["client/sleep"][0][0] == "certificate"
    assert (
        "not valid now (valid 2025-01-01T00:00:00Z to 2025-06-01T00:00:00Z)"
        in (problems["client/sleep"][0][1])
    )
    assert problems["server/echo-1"][0][:2] == (
        "listeners",
        "not listening on 15006 (inbound plaintext)",
    )
    # DNS: a warning, not drift by itself.
    dns = next(c for c in result["pods"][1]["checks"] if c["check"] == "dns")
    assert (dns["ok"], dns["severity"]) == (False, "warning")


def test_a_dns_warning_alone_is_no_drift_and_a_vanished_netns_is() -> None:
    no_dns = ALL_LISTENERS - {("udp", 15053)}
    result = verify(Dump(healthy_dump(), "dump"), probes(sockets={"/proc/1234/fd/7": no_dns}))
    assert result["drift"] is False
    assert "WARN  dns          nothing listens on 15053" in render(result)
    result = verify(Dump(healthy_dump(), "dump"), probes(missing=("/proc/1234/fd/8",)))
    assert result["drift"] is True
    assert failing(result)["server/echo-1"][0][:2] == ("netns", "/proc/1234/fd/8 does not exist")


def test_capture_that_cannot_be_read_is_drift_with_the_reason() -> None:
    def broken(_: Path) -> list[str]:
        raise CaptureError("iptables-save in /proc/1234/fd/7 failed: no such table")

    result = verify(
        Dump(healthy_dump(), "dump"),
        Probes(capture=broken, sockets=lambda _: ALL_LISTENERS, now=lambda: NOW, exists=bool),
    )
    assert "cannot read iptables in /proc/1234/fd/7" in failing(result)["client/sleep"][0][1]


def test_verify_json_and_exit_code() -> None:
    out = io.StringIO()
    args = argparse.Namespace(output="json")
    assert cli._verified(args, Dump(dump_copy(), "dump"), out, probes()) == 1
    assert json.loads(out.getvalue())["drift"] is True
    out = io.StringIO()
    assert cli._verified(args, Dump(healthy_dump(), "dump"), out, probes()) == 0


# --- the real probes, on a scratch namespace ---------------------------------


@pytest.fixture
def scratch_netns() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"zctl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_listening_reads_the_sockets_of_that_namespace_only(scratch_netns: Path) -> None:
    assert listening(scratch_netns) == set()
    fd = os.open(scratch_netns, os.O_RDONLY)
    try:
        tcp, udp = in_netns(
            fd,
            lambda: (
                socket.create_server(("0.0.0.0", 15008)),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            ),
        )
    finally:
        os.close(fd)
    with tcp, udp:
        udp.bind(("127.0.0.1", 15053))
        assert listening(scratch_netns) == {("tcp", 15008), ("udp", 15053)}


def test_missing_sees_the_capture_the_node_agent_installs_and_what_is_lost(
    scratch_netns: Path,
) -> None:
    if shutil.which("iptables-save") is None or shutil.which("nsenter") is None:
        pytest.skip("needs iptables and nsenter")
    assert installed_tables(scratch_netns) == []
    assert len(missing(scratch_netns)) > 10  # nothing there
    install(scratch_netns)
    assert installed_tables(scratch_netns) == ["mangle", "nat"]
    assert missing(scratch_netns) == [] and missing(scratch_netns, dns=True) == []
    # Someone flushes the nat table: the chains are still there, the rules are not.
    run = ["nsenter", f"--net={scratch_netns}", "iptables", "-t", "nat", "-F"]
    subprocess.run(run, check=True)
    assert installed_tables(scratch_netns) == ["mangle", "nat"]
    lost = missing(scratch_netns)
    assert "nat: -A PREROUTING -j ISTIO_PRERT" in lost
    assert all(line.startswith("nat: ") for line in lost)
    install(scratch_netns)  # reinstalling over the damage works, and is whole again
    assert missing(scratch_netns) == []
    result = verify(
        Dump(healthy_dump() | {"workloadState": {"u": _enrolled(scratch_netns)}}, "dump"),
        Probes(now=lambda: NOW),
    )
    assert failing(result) == {
        "client/sleep": [
            (
                "listeners",
                "the pod is enrolled but ztunnel has no listeners in its netns",
                "restart ztunnel",
            )
        ]
    }


def _enrolled(netns: Path) -> dict[str, Any]:
    return {
        "state": "Up",
        "info": {"name": "sleep", "namespace": "client", "serviceAccount": "sleep"},
        "netns": str(netns),
        "connections": {"inbound": [], "outbound": []},
    }
