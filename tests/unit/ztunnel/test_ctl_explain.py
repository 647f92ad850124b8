"""``authz-check`` and ``trace``: ztunnel's own decisions replayed on a saved dump."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.ztunnel.test_ctl_fixture import CURL_ID, ECHO_ID, SLEEP_ID, saved
from ztunnel.ctl import explain
from ztunnel.ctl.cli import main

WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"


@pytest.fixture
def dump(tmp_path: Path) -> str:
    return saved(tmp_path)


def ask(capsys: pytest.CaptureFixture[str], dump: str, *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["-f", dump, *argv, "-o", "json"])
    return code, json.loads(capsys.readouterr().out)


# --- authz-check -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "allowed", "policy", "rule", "reason"),
    [
        (SLEEP_ID, "10.244.0.3:8080", True, "server/allow-echo", 1, "allowed by an ALLOW"),
        (CURL_ID, "10.244.0.3:9999", True, "server/allow-echo", 0, "allowed by an ALLOW"),
        (CURL_ID, "10.244.0.3:8080", False, None, None, "no ALLOW policy matched"),
        ("10.244.0.2", "10.244.1.2:8080", True, "server/allow-echo", 1, "allowed by an ALLOW"),
        ("10.244.1.9", "10.244.0.3:8080", False, None, None, "no ALLOW policy matched"),
        (SLEEP_ID, "10.244.0.3:9090", False, "server/deny-9090", 0, "denied by a DENY"),
        (
            "spiffe://cluster.local/ns/attic/sa/x",
            "10.244.0.3:8080",
            False,
            "istio-system/deny-attic",
            0,
            "denied by a DENY",
        ),
        (WAYPOINT_ID, "10.244.1.4:8080", True, "shop/allow-waypoint", 0, "allowed by an ALLOW"),
        # Not through the waypoint the pod is bound to, and no ALLOW names the client.
        (SLEEP_ID, "10.244.1.4:8080", False, None, None, "bound to waypoint 10.96.0.9:15008"),
        (SLEEP_ID, "10.244.1.9:5432", True, None, None, "is not in the mesh"),
        (SLEEP_ID, "192.0.2.1:443", True, None, None, "is not in the mesh"),
    ],
)
def test_authz_check_names_the_deciding_policy_and_rule(
    capsys: pytest.CaptureFixture[str],
    dump: str,
    source: str,
    target: str,
    allowed: bool,
    policy: str | None,
    rule: int | None,
    reason: str,
) -> None:
    code, result = ask(capsys, dump, "authz-check", "--from", source, "--to", target)
    assert (code, result["allowed"], result["policy"], result["rule"]) == (
        0 if allowed else 1,
        allowed,
        policy,
        rule,
    )
    assert reason in result["reason"]


def test_a_source_ip_takes_the_identity_of_its_mesh_workload_and_says_so(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    _, result = ask(capsys, dump, "authz-check", "--from", "10.244.0.2", "--to", "10.244.0.3:8080")
    assert result["sourceIdentity"] == SLEEP_ID
    assert result["destination"] == {
        "workload": "server/echo-1",
        "uid": "Kubernetes//Pod/server/echo-1",
    }
    assert result["applicable"] == [
        "istio-system/deny-attic",
        "server/deny-9090",
        "server/allow-echo",
    ]
    assert result["notes"] == [
        f"source 10.244.0.2 is client/sleep, in the mesh: identity {SLEEP_ID}",
        explain.L4_ONLY,  # policies apply: what ztunnel cannot see is said
    ]
    _, result = ask(capsys, dump, "authz-check", "--from", "10.244.1.9", "--to", "10.244.0.3:8080")
    assert result["sourceIdentity"] == ""
    assert "legacy/db, not in the mesh: no identity" in result["notes"][0]
    _, result = ask(capsys, dump, "authz-check", "--from", SLEEP_ID, "--to", "10.244.1.9:5432")
    assert result["applicable"] == [] and explain.L4_ONLY not in result["notes"]


def test_a_spiffe_source_takes_the_ip_of_a_workload_with_that_identity(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    _, result = ask(capsys, dump, "authz-check", "--from", CURL_ID, "--to", "10.244.0.3:8080")
    assert result["sourceIp"] == "10.244.0.5"
    _, result = ask(
        capsys,
        dump,
        "authz-check",
        "--from",
        "spiffe://cluster.local/ns/x/sa/y",
        "--to",
        "10.244.0.3:8080",
    )
    assert result["sourceIp"] == "0.0.0.0"
    assert "source IP assumed 0.0.0.0" in result["notes"][0]


def test_authz_check_for_people(capsys: pytest.CaptureFixture[str], dump: str) -> None:
    code = main(["-f", dump, "authz-check", "--from", SLEEP_ID, "--to", "10.244.0.3:9090"])
    assert code == 1
    assert capsys.readouterr().out == (
        "DENY: denied by a DENY policy\n"
        "  policy:      server/deny-9090, rule 0\n"
        f"  source:      {SLEEP_ID} from 10.244.0.2\n"
        "  destination: 10.244.0.3:9090 (server/echo-1)\n"
        "  applicable:  istio-system/deny-attic, server/deny-9090, server/allow-echo\n"
        "  note: source IP assumed: 10.244.0.2, client/sleep's\n"
        f"  note: {explain.L4_ONLY}\n"
    )


def test_a_service_vip_is_not_where_authorization_happens(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code = main(["-f", dump, "authz-check", "--from", SLEEP_ID, "--to", "10.96.0.20:80"])
    err = capsys.readouterr().err
    assert code == 3
    assert "10.96.0.20 is the VIP of service server/echo" in err
    assert "10.244.0.3 (server/echo-1)" in err and "use trace" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "not-an-ip", "--to", "10.244.0.3:80"], "'not-an-ip' is not an IP address"),
        (["--from", "spiffe://cluster.local/oops", "--to", "10.244.0.3:80"], "--from"),
        (["--from", SLEEP_ID, "--to", "10.244.0.3"], "expected HOST:PORT"),
        (["--from", SLEEP_ID, "--to", "host:80"], "'host' is not an IP address"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], dump: str, argv: list[str], message: str
) -> None:
    code = main(["-f", dump, "authz-check", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


# --- trace -------------------------------------------------------------------


def trace(capsys: pytest.CaptureFixture[str], dump: str, pod: str, to: str) -> tuple[int, Any]:
    return ask(capsys, dump, "trace", "--from", pod, "--to", to)


def test_trace_to_a_workload_outside_the_mesh_is_passthrough(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, result = trace(capsys, dump, "client/sleep", "10.244.1.9:5432")
    assert code == 0 and result["outcome"] == "passthrough"
    assert result["route"]["kind"] == "passthrough"
    assert result["route"]["connect"] == "10.244.1.9:5432"
    assert result["authorization"] == []
    _, result = trace(capsys, dump, "client/sleep", "192.0.2.1:443")
    assert result["route"]["reason"] == "192.0.2.1 is not a mesh address"


def test_trace_to_a_mesh_workload_goes_over_hbone_and_is_authorized_there(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, result = trace(capsys, dump, "client/sleep", "10.244.0.3:8080")
    assert code == 0 and result["outcome"] == "allowed"
    assert result["source"] == {
        "pod": "client/sleep",
        "uid": "Kubernetes//Pod/client/sleep",
        "ip": "10.244.0.2",
        "identity": SLEEP_ID,
        "node": "node1",
        "captured": True,
    }
    route = result["route"]
    assert (route["kind"], route["connect"], route["authority"], route["expectedIdentity"]) == (
        "hbone",
        "10.244.0.3:15008",
        "10.244.0.3:8080",
        ECHO_ID,
    )
    (hop,) = result["authorization"]
    assert (hop["at"], hop["allowed"], hop["policy"], hop["rule"]) == (
        "server/echo-1",
        True,
        "server/allow-echo",
        1,
    )


def test_trace_to_a_service_name_resolves_the_vip_and_maps_the_port(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, result = trace(capsys, dump, "client/sleep", "echo.server:80")
    assert code == 0
    assert result["destination"] == {
        "requested": "echo.server:80",
        "address": "10.96.0.20:80",
        "service": "server/echo",
    }
    assert result["route"]["authority"] == "10.244.0.3:8080"  # 80 -> 8080 on the endpoint
    assert result["route"]["destination"] == "server/echo-1"
    assert any("at random" in n for n in result["notes"])
    _, by_vip = trace(capsys, dump, "client/sleep", "10.96.0.20:80")
    assert by_vip["route"] == result["route"]


def test_trace_through_a_waypoint_judges_the_destination_against_the_waypoints_identity(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, result = trace(capsys, dump, "client/sleep", "10.244.1.4:8080")
    assert code == 0 and result["outcome"] == "allowed"
    route = result["route"]
    assert (route["kind"], route["connect"], route["authority"], route["expectedIdentity"]) == (
        "waypoint",
        "10.244.1.5:15008",
        "10.244.1.4:8080",
        WAYPOINT_ID,
    )
    (hop,) = result["authorization"]
    assert (hop["at"], hop["sourceIdentity"], hop["policy"]) == (
        "shop/cart",
        WAYPOINT_ID,
        "shop/allow-waypoint",
    )
    # A service behind the waypoint: the waypoint picks the endpoint; said, not guessed.
    _, result = trace(capsys, dump, "client/sleep", "cart.shop.svc.cluster.local:80")
    assert result["route"]["authority"] == "10.96.0.8:80"
    assert result["authorization"] == []
    assert any(f"authz-check --from {WAYPOINT_ID}" in n for n in result["notes"])


def test_trace_refused_says_why(capsys: pytest.CaptureFixture[str], dump: str) -> None:
    code, result = trace(capsys, dump, "client/sleep", "local.server:80")
    assert code == 1 and result["outcome"] == "refused"
    assert "internalTrafficPolicy is Local" in result["route"]["reason"]


def test_trace_from_a_pod_ztunnel_does_not_capture_arrives_as_plaintext(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    code, result = trace(capsys, dump, "client/curl", "10.244.0.3:8080")
    assert code == 1 and result["outcome"] == "denied"
    assert result["source"]["captured"] is False and result["route"] is None
    (hop,) = result["authorization"]
    assert hop["sourceIdentity"] == "" and not hop["allowed"]


def test_trace_from_another_nodes_pod_assumes_capture_and_says_so(
    capsys: pytest.CaptureFixture[str], dump: str
) -> None:
    _, result = trace(capsys, dump, "server/echo-2", "10.244.0.3:8080")
    assert result["source"]["captured"] is None
    assert "ask --node node2" in result["notes"][-1]


def test_trace_for_people(capsys: pytest.CaptureFixture[str], dump: str) -> None:
    code = main(["-f", dump, "trace", "--from", "client/sleep", "--to", "10.244.0.3:8080"])
    assert code == 0
    assert capsys.readouterr().out == (
        "trace client/sleep -> 10.244.0.3:8080\n"
        f"  source:      client/sleep 10.244.0.2 ({SLEEP_ID}) on node1, captured\n"
        "  destination: 10.244.0.3:8080\n"
        "  route:       HBONE to 10.244.0.3:15008, :authority 10.244.0.3:8080, "
        f"expecting {ECHO_ID}\n"
        "               (workload Kubernetes//Pod/server/echo-1 server/echo-1 speaks HBONE)\n"
        "  authorize:   at server/echo-1 (10.244.0.3:8080): allow, allowed by an ALLOW policy "
        "[server/allow-echo, rule 1]\n"
        "  outcome:     allowed\n"
    )


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--from", "sleep", "--to", "10.0.0.1:80"], 2, "expected NAMESPACE/POD"),
        (["--from", "client/nope", "--to", "10.0.0.1:80"], 3, "has no workload client/nope"),
        (["--from", "client/sleep", "--to", "nope:80"], 3, "no service is named 'nope'"),
    ],
)
def test_trace_errors(
    capsys: pytest.CaptureFixture[str], dump: str, argv: list[str], code: int, message: str
) -> None:
    assert main(["-f", dump, "trace", *argv]) == code
    assert message in capsys.readouterr().err
