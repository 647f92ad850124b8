"""GAMMA conformance: GRPCRoute (see the package docstring)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.gamma.harness import (
    NS,
    STATE_DIR,
    Case,
    Expect,
    applied,
    assert_split,
    converge,
    eventually,
    grpc,
    indent,
    problems,
    route,
    send,
    to,
)

#
# Upstream's client calls Istio's proto.EchoTestService/Echo; our echo serves
# echo-basic's GrpcEcho (its Echo method). These routes match on headers only,
# never on the service, so the cases are the same. The waypoint speaks h2c to
# the backends' grpc ports (appProtocol grpc).


def test_grpcroute_weight(mesh: str, tmp_path: Path) -> None:
    """MeshGRPCRouteWeight: 70/30 over 500 calls, within 0.05."""
    rules = """
- backendRefs:
  - {name: echo-v1, port: 7070, weight: 70}
  - {name: echo-v2, port: 7070, weight: 30}
"""
    manifest = route("mesh-grpc-weighted-backends", "echo", rules, port=7070, kind="GRPCRoute")
    with applied(mesh, tmp_path, manifest):
        converge(mesh, [Case("echo:7070", grpc(), Expect(status="OK"))])
        assert_split(mesh, grpc(), {"echo-v1": 0.7, "echo-v2": 0.3})


def test_grpcroute_request_header_modifier(mesh: str, tmp_path: Path) -> None:
    """MeshGRPCRouteRequestHeaderModifier (upstream's newer, header-matching version)."""
    modifiers = {
        "set": "set: [{name: x-header-set, value: set-overwrites-values}]",
        "add": "add: [{name: x-header-add, value: add-appends-values}]",
        "remove": "remove: [x-header-remove]",
        "multi": """\
set: [{name: x-header-set-1, value: header-set-1}, {name: x-header-set-2, value: header-set-2}]
add: [{name: x-header-add-1, value: header-add-1}, {name: x-header-add-2, value: header-add-2}]
remove: [x-header-remove-1, x-header-remove-2]""",
    }
    rules = "".join(
        f"- matches: [{{headers: [{{name: x-test-case, value: {case}}}]}}]\n"
        "  filters:\n  - type: RequestHeaderModifier\n    requestHeaderModifier:\n"
        f"{indent(modifier, 6)}"
        f"  backendRefs: [{{name: echo-{'v2' if case == 'multi' else 'v1'}, port: 7070}}]\n"
        for case, modifier in modifiers.items()
    )
    cases = [
        to(
            "echo-v1",
            grpc(
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "this-value-should-be-overwritten"),
            ),
            headers={
                "x-test-case": "set",
                "some-other-header": "this-header-should-be-set",
                "x-header-set": "set-overwrites-values",
            },
        ),
        to(
            "echo-v1",
            grpc(("x-test-case", "add"), ("x-header-add", "this-value-should-be-appended")),
            headers={
                "x-test-case": "add",
                "x-header-add": "this-value-should-be-appended,add-appends-values",
            },
        ),
        to(
            "echo-v1",
            grpc(("x-test-case", "remove"), ("x-header-remove", "this-should-be-removed")),
            headers={"x-test-case": "remove"},
            absent=("x-header-remove",),
        ),
        to(
            "echo-v2",
            grpc(
                ("x-test-case", "multi"),
                ("x-header-set-2", "set-header-2"),
                ("x-header-add-2", "add-header-2"),
                ("x-header-remove-2", "should-be-removed-2"),
            ),
            headers={
                "x-test-case": "multi",
                "x-header-set-1": "header-set-1",
                "x-header-set-2": "header-set-2",
                "x-header-add-1": "header-add-1",
                "x-header-add-2": "add-header-2,header-add-2",
            },
            absent=("x-header-remove-1", "x-header-remove-2"),
        ),
    ]
    manifest = route("grpc-request-header-modifier", "echo", rules, port=7070, kind="GRPCRoute")
    with applied(mesh, tmp_path, manifest):
        converge(mesh, cases)


def _grpc_calls_logged(cluster: str, pod: str) -> int:
    """How many gRPC calls the echo pod ``NS/pod`` has logged (its ``--log`` lines)."""
    log = STATE_DIR / cluster / "logs" / f"{NS}.{pod}.log"
    return sum(" grpc=/" in line for line in log.read_text().splitlines())


def test_grpcroute_request_mirror(mesh: str, tmp_path: Path) -> None:
    """MeshGRPCRouteRequestMirror: echo-v1 answers, echo-v2 receives a copy.

    As upstream, the mirror is seen in the mirror pod's log; beyond upstream,
    every mirrored call is counted there.
    """
    mirror = "- {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 7070}}}"
    rules = f"""
- matches: [{{headers: [{{name: x-mirror-only, value: "true"}}]}}]
  filters:
  {mirror}
  backendRefs: [{{name: echo-v1, port: 7070}}]
- matches: [{{headers: [{{name: x-mirror-and-modify, value: "true"}}]}}]
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{{name: X-Header-Set, value: set-overwrites-values}}]
      add:
      - {{name: X-Header-Add, value: header-val-1}}
      - {{name: X-Header-Add-Append, value: header-val-2}}
      remove: [X-Header-Remove]
  {mirror}
  backendRefs: [{{name: echo-v1, port: 7070}}]
"""
    cases = [
        to("echo-v1", grpc(("x-mirror-only", "true"))),
        to(
            "echo-v1",
            grpc(
                ("x-mirror-and-modify", "true"),
                ("x-header-remove", "remove-val"),
                ("x-header-add-append", "append-val-1"),
            ),
            headers={
                "x-header-set": "set-overwrites-values",
                "x-header-add": "header-val-1",
                "x-header-add-append": "append-val-1,header-val-2",
            },
            absent=("x-header-remove",),
        ),
    ]
    manifest = route("mesh-grpc-request-mirror", "echo", rules, port=7070, kind="GRPCRoute")
    with applied(mesh, tmp_path, manifest):
        converge(mesh, cases)
        # Every primary goes to echo-v1 now: what echo-v2 logs from here on is a mirror.
        before = _grpc_calls_logged(mesh, "echo-v2-1")
        answers = send(mesh, [c.request for c in cases] * 5)
        assert [p for c, a in zip(cases * 5, answers, strict=True) for p in problems(c, a)] == []

        def mirrored() -> bool:
            """echo-v2 logged all 10 mirrored calls"""
            return _grpc_calls_logged(mesh, "echo-v2-1") - before >= 10

        eventually(mirrored, 10)
