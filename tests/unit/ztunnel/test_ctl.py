"""``ztunnel-ctl`` on a saved dump: istioctl's tables, JSON/YAML for scripts, filters, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.ztunnel.test_ctl_fixture import DUMP, dump_copy, saved
from ztunnel.ctl.cli import main
from ztunnel.ctl.tables import tabwrite


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dump(tmp_path: Path) -> str:
    return saved(tmp_path)


def test_workloads_table_as_istioctl_prints_it(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "workloads")
    assert code == 0
    assert out == (
        "NAMESPACE POD NAME ADDRESS    NODE  WAYPOINT PROTOCOL\n"
        "client    curl     10.244.0.5 node1 None     HBONE\n"
        "client    sleep    10.244.0.2 node1 None     HBONE\n"
        "legacy    db       10.244.1.9 node2 None     TCP\n"
        "server    echo-1   10.244.0.3 node1 None     HBONE\n"
        "server    echo-2   10.244.1.2 node2 None     HBONE\n"
        "server    echo-3   10.244.1.3 node2 None     HBONE\n"
        "shop      cart     10.244.1.4 node2 waypoint HBONE\n"
        "shop      waypoint 10.244.1.5 node2 None     HBONE\n"
    )


@pytest.mark.parametrize(
    ("filters", "names"),
    [
        (["-n", "server"], ["echo-1", "echo-2", "echo-3"]),
        (["--workload-namespace", "SHOP"], ["cart", "waypoint"]),  # case-folded, as istioctl
        (["--address", "10.244.1.9"], ["db"]),
        (["--workload-node", "node1", "-n", "client"], ["curl", "sleep"]),
    ],
)
def test_workload_filters(
    capsys: pytest.CaptureFixture[str], dump: str, filters: list[str], names: list[str]
) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "workloads", *filters, "-o", "json")
    assert code == 0
    assert [w["name"] for w in json.loads(out)] == names


def test_json_and_yaml_are_the_dumps_entries(capsys: pytest.CaptureFixture[str], dump: str) -> None:
    _, out, _ = ctl(capsys, "-f", dump, "w", "--address", "10.244.0.3", "-o", "json")
    echo = next(w for w in DUMP["workloads"] if w["name"] == "echo-1")
    assert json.loads(out) == [echo]
    _, out, _ = ctl(capsys, "-f", dump, "policies", "-n", "shop", "-o", "yaml")
    assert yaml.safe_load(out) == [p for p in DUMP["policies"] if p["namespace"] == "shop"]


def test_services_count_healthy_over_all_endpoints(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "services")
    assert code == 0
    assert out == (
        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS\n"
        "legacy    db           10.96.0.30  None     1/1\n"
        "server    echo         10.96.0.20  None     2/3\n"
        "server    local        10.96.0.40  None     1/1\n"
        "shop      cart         10.96.0.8   waypoint 1/1\n"
        "shop      waypoint     10.96.0.9   None     1/1\n"
    )
    _, out, _ = ctl(capsys, "-f", dump, "svc", "--service-namespace", "legacy", "-o", "json")
    assert [s["hostname"] for s in json.loads(out)] == ["db.legacy.svc.cluster.local"]


def test_policies_table(capsys: pytest.CaptureFixture[str], dump: str) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "policies")
    assert code == 0
    assert out == (
        "NAMESPACE    POLICY NAME    ACTION SCOPE\n"
        "istio-system deny-attic     Deny   Global\n"
        "server       allow-echo     Allow  WorkloadSelector\n"
        "server       deny-9090      Deny   Namespace\n"
        "shop         allow-waypoint Allow  WorkloadSelector\n"
    )


def test_certificates_table_with_istioctls_wider_padding(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "certificates")
    assert code == 0
    curl, sleep, echo = (
        f"spiffe://cluster.local/ns/{n}".ljust(46)
        for n in ("client/sa/curl", "client/sa/sleep", "server/sa/echo")
    )
    na = "NA                NA                       NA\n"
    assert out == (
        "CERTIFICATE NAME                              TYPE     STATUS           VALID CERT     "
        "SERIAL NUMBER     NOT AFTER                NOT BEFORE\n"
        f"{curl}NA       Initializing     false          {na}"
        f"{sleep}Leaf     Available        true           ff                "
        "2099-01-02T00:00:00Z     2025-01-01T00:00:00Z\n"
        f"{sleep}Root     Available        true           1000              "
        "2098-01-01T00:00:00Z     2024-01-01T00:00:00Z\n"
        f"{echo}NA       Unavailable      false          {na}"
    )


def test_a_legacy_chain_ends_with_its_root_and_an_expired_cert_is_not_valid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    doc = dump_copy()
    leaf, root = doc["certificates"][1]["certChain"][0], doc["certificates"][1]["rootCerts"][0]
    root = {**root, "expirationTime": "2020-01-01T00:00:00Z", "validFrom": "2019-01-01T00:00:00Z"}
    doc["certificates"] = [{"identity": "i", "state": "Available", "certChain": [leaf, root]}]
    _, out, _ = ctl(capsys, "-f", saved(tmp_path, doc), "certs")
    assert [r.split()[1:4] for r in out.splitlines()[1:]] == [
        ["Leaf", "Available", "true"],
        ["Root", "Available", "false"],
    ]


def test_connections_table_names_the_addresses(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, err = ctl(capsys, "-f", dump, "connections")
    assert code == 0
    assert out == (
        "WORKLOAD      DIRECTION LOCAL              REMOTE              REMOTE TARGET"
        "                    PROTOCOL\n"
        "sleep.client  Outbound  sleep.client:40000 echo-1.server:15008 "
        "echo.server.svc.cluster.local:80 HBONE\n"
        "echo-1.server Inbound   echo-1.server:8080 sleep.client:40000  10.244.0.3:8080"
        "                  HBONE\n"
    )
    assert "as saved in" in err and "live ones need --node or --admin" in err
    _, out, _ = ctl(capsys, "-f", dump, "cons", "--raw", "--direction", "inbound")
    assert out.splitlines()[1].split() == [
        "echo-1.server",
        "Inbound",
        "10.244.0.3:8080",
        "10.244.0.2:40000",
        "10.244.0.3:8080",
        "HBONE",
    ]


def test_connections_json_is_flat_with_workload_and_direction(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    _, out, _ = ctl(capsys, "-f", dump, "connections", "-n", "server", "-o", "json")
    (conn,) = json.loads(out)
    assert conn["workload"] == "server/echo-1" and conn["direction"] == "inbound"
    assert conn["srcIdentity"] == "spiffe://cluster.local/ns/client/sa/sleep"
    assert conn["bytesReceived"] == 34


def test_all_prints_every_table_and_config_dump_the_document(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, _ = ctl(capsys, "-f", dump, "all")
    assert code == 0
    headers = [line for line in out.splitlines() if line.isupper() or line.startswith("NAMESPACE")]
    assert [h.split()[0] for h in headers] == [
        "NAMESPACE",
        "NAMESPACE",
        "NAMESPACE",
        "CERTIFICATE",
        "WORKLOAD",
    ]
    assert out.startswith("\nNAMESPACE POD NAME")
    _, out, _ = ctl(capsys, "-f", dump, "all", "-o", "json")
    assert json.loads(out) == DUMP
    _, out, _ = ctl(capsys, "-f", dump, "config-dump")
    assert json.loads(out) == DUMP
    _, out, _ = ctl(capsys, "-f", dump, "config-dump", "-o", "yaml")
    assert yaml.safe_load(out) == DUMP


def test_source_options_may_follow_the_command(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, out, _ = ctl(capsys, "policies", "-f", dump, "-o", "json")
    assert code == 0 and len(json.loads(out)) == 4
    code, out, _ = ctl(capsys, "-o", "json", "policies", "-f", dump)
    assert code == 0 and len(json.loads(out)) == 4


def test_a_dump_from_istios_ztunnel_shows_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Istio's older shape: entries keyed by address, fields ours lacks, a
    # serviceAccounts match the model cannot hold: the tables still show.
    doc: dict[str, Any] = {
        "workloads": {
            "/10.244.2.58": {
                "workloadIps": ["10.244.2.58"],
                "protocol": "HBONE",
                "uid": "Kubernetes//Pod/default/sleep-1",
                "name": "sleep-1",
                "namespace": "default",
                "node": "ambient-worker2",
                "nativeTunnel": True,
                "status": "Healthy",
                "waypoint": {"destination": "/10.96.65.117", "port": 15008},
            }
        },
        "services": {
            "/10.96.65.117": {
                "name": "namespace-istio-waypoint",
                "namespace": "default",
                "hostname": "namespace-istio-waypoint.default.svc.cluster.local",
                "vips": ["/10.96.65.117"],
                "ports": {"15008": 15008},
                "endpoints": {},
            }
        },
        "policies": [
            {
                "name": "allow-waypoint",
                "namespace": "default",
                "scope": "WorkloadSelector",
                "action": "Allow",
                "rules": [[[{"serviceAccounts": [{"namespace": "d", "serviceAccount": "w"}]}]]],
            }
        ],
    }
    path = saved(tmp_path, doc)
    _, out, _ = ctl(capsys, "-f", path, "workloads")
    assert out.splitlines()[1].split() == [
        "default",
        "sleep-1",
        "10.244.2.58",
        "ambient-worker2",
        "namespace-istio-waypoint",
        "HBONE",
    ]
    # ... but reasoning on a policy the model cannot hold is refused, naming it.
    code, _, err = ctl(capsys, "-f", path, "authz-check", "--from", "10.0.0.1", "--to", "1.2.3.4:5")
    assert code == 3
    assert "policies[0].rules[0][0][0].serviceAccounts" in err


@pytest.mark.parametrize(
    ("argv", "needs"),
    [
        (["log"], "log reads and sets a running ztunnel's level"),
        (["log", "--level", "debug"], "log reads and sets a running ztunnel's level"),
        (["verify"], "verify inspects the enrolled pods' network namespaces"),
    ],
)
def test_live_commands_on_a_saved_dump_say_what_they_need(
    capsys: pytest.CaptureFixture[str], dump: str, argv: list[str], needs: str
) -> None:
    code, out, err = ctl(capsys, "-f", dump, *argv)
    assert code == 3 and out == ""
    assert err.startswith(f"ztunnel-ctl: {needs}") and err.count("\n") == 1
    assert "--node NODE" in err


def test_a_missing_or_broken_dump_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = ctl(capsys, "-f", str(tmp_path / "nope.json"), "workloads")
    assert code == 3 and "cannot read the dump" in err and "No such file" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = ctl(capsys, "-f", str(tmp_path / "bad.json"), "workloads")
    assert code == 3 and "is not JSON" in err
    (tmp_path / "list.json").write_text("[]")
    code, _, err = ctl(capsys, "-f", str(tmp_path / "list.json"), "workloads")
    assert code == 3 and "not a ztunnel config dump" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--node", "n1", "--admin", "http://x", "workloads"],
        ["--cluster", "demo", "workloads"],
        ["workloads", "--direction", "inbound"],
        ["frobnicate"],
        ["authz-check", "--from", "x"],
        [],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage: ztunnel-ctl" in capsys.readouterr().err


def test_tabwrite_pads_every_column_but_the_last_as_gos_tabwriter() -> None:
    assert tabwrite([["A", "BB", "C"], ["long", "", "x"]]) == "A    BB C\nlong    x\n"
    assert tabwrite([["A", "B"], ["a", "b"]], padding=5) == "A     B\na     b\n"
