"""ztunnel's admin, metrics and readiness after real traffic through real pods.

Reuses the pods, in-process meshd and ztunnel of test_ztunnel_pods; the
servers listen on loopback ports picked free.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mesh.xds import XdsClient
from tests.integration.test_ztunnel_pods import (
    CLIENT_IP,
    SERVER_IP,
    Echo,
    Pods,
    Talk,
    ask,
    mesh,
    pods,
)
from tests.unit.hbone.conftest import run
from ztunnel.admin.server import AdminServers
from ztunnel.runtime import Ztunnel

LOCAL = ("127.0.0.1", 0)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as answer:
        return answer.status, await answer.text()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found


def test_readiness_waits_for_the_feed(tmp_path: Path) -> None:
    async def body() -> None:
        xds = XdsClient("127.0.0.1:1", node_id="ztunnel~n1")  # nobody there
        ztunnel = Ztunnel(xds=xds, fetch_certificate=_never, zds_path=str(tmp_path / "z"))
        servers = AdminServers(ztunnel)
        await servers.start(admin=None, metrics=None, readiness=LOCAL)
        try:
            host, port = servers.bound["readiness"]
            async with aiohttp.ClientSession() as s:
                status, text = await get(s, f"http://{host}:{port}/healthz/ready")
            assert status == 503 and "xDS" in text
        finally:
            await servers.close()

    run(body, timeout_s=20)


async def _never(_: Any) -> Any:
    raise AssertionError("no certificate is fetched here")


def test_admin_metrics_and_readiness_tell_what_the_traffic_did(tmp_path: Path) -> None:
    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            quits: list[bool] = []
            servers = AdminServers(m.ztunnel, node="n1", quit=lambda: quits.append(True))
            await servers.start(admin=LOCAL, metrics=LOCAL, readiness=LOCAL)
            app = Echo(m.fds[names.server], keep_open=True)
            await app.start(8080)
            talk: Talk | None = None
            level = logging.getLogger().level
            try:
                url = {k: f"http://{h}:{p}" for k, (h, p) in servers.bound.items()}
                # Three connections, one still open, each saying known bytes.
                for _ in range(2):
                    assert await ask(m.fds[names.client], SERVER_IP) == (
                        f"{CLIENT_IP} said hello".encode()
                    )
                talk = await Talk.open(m.fds[names.client], SERVER_IP, 8080)
                assert await talk.say("hi") == f"{CLIENT_IP} said hi"
                async with aiohttp.ClientSession() as s:
                    status, text = await get(s, url["readiness"] + "/healthz/ready")
                    assert status == 200, text

                    # The live one is listed from both sides: outbound at the client,
                    # inbound HBONE at the server.
                    status, text = await get(s, url["admin"] + "/connections")
                    live = json.loads(text)["connections"]
                    sides = {(c["workload"], c["direction"], c["protocol"]) for c in live}
                    assert sides == {
                        ("shop/client", "outbound", "HBONE"),
                        ("shop/server", "inbound", "HBONE"),
                    }
                    inbound = next(c for c in live if c["direction"] == "inbound")
                    assert inbound["srcIdentity"] == "spiffe://cluster.local/ns/shop/sa/client"
                    assert inbound["originalDst"] == f"{SERVER_IP}:8080"

                    # The dump: the snapshot, certificates, and the pods with their state.
                    status, text = await get(s, url["admin"] + "/config_dump")
                    dump = json.loads(text)
                    assert {w["name"] for w in dump["workloads"]} >= {"client", "server"}
                    identities = {c["identity"]: c for c in dump["certificates"]}
                    client_cert = identities["spiffe://cluster.local/ns/shop/sa/client"]
                    assert client_cert["state"] == "Available"
                    assert client_cert["certChain"][0]["serialNumber"]
                    assert client_cert["rootCerts"][0]["pem"].startswith("-----BEGIN")
                    states = dump["workloadState"]
                    assert {v["info"]["name"] for v in states.values()} >= {"client", "server"}
                    assert dump["config"]["synced"] is True

                    # Metrics: the two finished connections, counted once per side,
                    # with their bytes; the open one is opened but not closed. (Each
                    # side counts a connection when both its sockets have closed.)
                    async with asyncio.timeout(5):
                        while True:
                            _, text = await get(s, url["metrics"] + "/metrics")
                            done = samples(text, "istio_tcp_connections_closed_total")
                            if sum(v for _, v in done) >= 4:
                                break
                            await asyncio.sleep(0.05)
                    _, same = await get(s, url["metrics"] + "/stats/prometheus")
                    assert "istio_tcp_connections_opened_total" in same
                    opened = samples(text, "istio_tcp_connections_opened_total")
                    closed = samples(text, "istio_tcp_connections_closed_total")
                    by = {lab["reporter"]: v for lab, v in opened}
                    assert by == {"source": 3.0, "destination": 3.0}
                    assert {lab["reporter"]: v for lab, v in closed} == {
                        "source": 2.0,
                        "destination": 2.0,
                    }
                    for labels, _ in opened:
                        assert labels["connection_security_policy"] == "mutual_tls"
                        assert labels["source_principal"].endswith("/ns/shop/sa/client")
                        assert labels["destination_workload"] == "server"
                        assert labels["source_workload_namespace"] == "shop"
                    got = {
                        lab["reporter"]: v
                        for lab, v in samples(text, "istio_tcp_received_bytes_total")
                    }
                    sent = {
                        lab["reporter"]: v for lab, v in samples(text, "istio_tcp_sent_bytes_total")
                    }
                    reply = len(f"{CLIENT_IP} said hello")
                    assert got == {"source": 10.0, "destination": 10.0}  # 2 x "hello"
                    assert sent == {"source": 2.0 * reply, "destination": 2.0 * reply}

                    # Health beside the traffic: the feed, the pods, each certificate.
                    assert samples(text, "ztunnel_xds_connected") == [({}, 1.0)]
                    assert samples(text, "ztunnel_xds_connections_total") == [({}, 1.0)]
                    assert samples(text, "ztunnel_enrolled_pods") == [({}, 2.0)]  # not "outside"
                    expiry = dict(
                        (lab["identity"], v)
                        for lab, v in samples(
                            text, "ztunnel_certificate_expiration_timestamp_seconds"
                        )
                    )
                    client_leaf = client_cert["certChain"][0]["expirationTime"]
                    assert expiry["spiffe://cluster.local/ns/shop/sa/client"] == (
                        datetime.fromisoformat(client_leaf.replace("Z", "+00:00")).timestamp()
                    )
                    assert samples(text, "process_resident_memory_bytes")

                    # Logging: read, changed, refused when unknown.
                    _, text = await get(s, url["admin"] + "/logging")
                    assert text.startswith("current log level is")
                    async with s.post(url["admin"] + "/logging?level=debug") as answer:
                        assert answer.status == 200
                        assert "debug" in await answer.text()
                    async with s.post(url["admin"] + "/logging?level=loud") as answer:
                        assert answer.status == 400
                    _, text = await get(s, url["admin"] + "/logging?level=info")
                    assert text == "current log level is info\n"
                    assert logging.getLogger().level == logging.INFO
                    async with s.post(url["admin"] + "/quitquitquit") as answer:
                        assert answer.status == 200
                    assert quits == [True]
            finally:
                if talk is not None:
                    talk.close()
                app.close()
                await servers.close()
                logging.getLogger().setLevel(level)

    with pods() as names:
        run(lambda: body(names), timeout_s=60)
