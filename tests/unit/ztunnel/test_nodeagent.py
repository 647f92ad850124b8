"""The node agent's pure parts and the CNI plugin, without namespaces.

The plugin binary (ztunnel-cni, built by make) is run as the runtime runs it
(environment, config on stdin, result or error on stdout), alone and against
a real agent on a unix socket; capture
itself needs root and is covered by tests/integration/test_mesh_meshlab.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tests.unit.hbone.conftest import run
from ztunnel.nodeagent import plugin, reconcile
from ztunnel.nodeagent.records import PodRecord, RecordError, RecordStore
from ztunnel.nodeagent.service import NodeAgent
from ztunnel.nodeagent.view import ClusterView, PodFacts
from ztunnel.zds.protocol import PodInfo

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0"}],
    "ips": [{"address": "10.244.0.7/24", "interface": 0}],
}


def view(
    namespaces: dict[str, dict[str, str]], pods: dict[str, dict[str, str]], version: int = 1
) -> ClusterView:
    facts = {}
    for key, labels in pods.items():
        ns, name = key.split("/")
        facts[(ns, name)] = PodFacts(ns, name, "node1", f"sa-{name}", labels)
    return ClusterView(version, MappingProxyType(namespaces), MappingProxyType(facts))


def record(key: str, uid: str | None = None) -> PodRecord:
    ns, name = key.split("/")
    return PodRecord(uid or f"uid-{name}", ns, name, f"/run/netns/{name}", ("10.244.0.7",))


# -- reconcile ---------------------------------------------------------------------------


def test_a_pod_is_wanted_by_its_namespace_label_and_opts_out_by_its_own() -> None:
    v = view(
        {"a": AMBIENT, "b": {}},
        {"a/x": {}, "a/out": {"istio.io/dataplane-mode": "none"}, "b/y": {}, "b/in": AMBIENT},
    )
    assert reconcile.wanted(v, record("a/x")) == PodInfo("x", "a", "sa-x")
    assert reconcile.wanted(v, record("a/out")) is None
    assert reconcile.wanted(v, record("b/y")) is None
    assert reconcile.wanted(v, record("b/in")) == PodInfo("in", "b", "sa-in")
    assert reconcile.wanted(v, record("c/z")) is reconcile.UNKNOWN
    assert reconcile.ambient_namespaces(v) == ["a"]


def test_plan_enrolls_unenrolls_and_forgets() -> None:
    v = view({"a": AMBIENT, "b": {}}, {"a/x": {}, "a/gone": {}, "b/y": {}, "a/stays": {}})
    records = {r.uid: r for r in (record("a/x"), record("b/y"), record("a/gone"), record("c/u"))}
    records["uid-stays"] = record("a/stays")
    enrolled = {
        "uid-y": PodInfo("y", "b", "sa-y"),  # its namespace lost the label
        "uid-del": PodInfo("del", "a", "sa-del"),  # CNI DEL removed its record
        "uid-gone": PodInfo("gone", "a", "sa-gone"),  # its netns vanished
        "uid-stays": PodInfo("stays", "a", "sa-stays"),
    }
    step = reconcile.plan(v, records, enrolled, lambda path: not path.endswith("/gone"))
    assert [(r.uid, i.name) for r, i in step.enroll] == [("uid-x", "x")]
    assert set(step.unenroll) == {"uid-y", "uid-del", "uid-gone"}
    assert step.forget == ("uid-gone",)
    # A pod the view does not know yet (c/u) is neither enrolled nor dropped.
    assert "uid-u" not in step.unenroll and all(r.uid != "uid-u" for r, _ in step.enroll)
    assert not reconcile.plan(v, {"uid-stays": record("a/stays")}, enrolled, lambda _: True).enroll


def test_redirection_is_written_where_it_differs_and_removed_only_if_the_agents() -> None:
    said = {"x": None, "y": "pending", "z": "enabled", "was": "enabled", "old": "disabled"}
    facts = {
        ("a", name): PodFacts("a", name, "node1", "sa", {}, redirection=value)
        for name, value in {**said, "w": None}.items()
    }
    v = ClusterView(1, MappingProxyType({"a": AMBIENT}), MappingProxyType(facts))
    desired = {
        ("a", "x"): reconcile.PENDING,  # captured, no ztunnel has it yet
        ("a", "y"): reconcile.ENABLED,  # ztunnel took it
        ("a", "z"): reconcile.ENABLED,  # already says so
        ("a", "absent"): reconcile.ENABLED,  # not in the view (yet): nothing to patch
    }
    assert reconcile.redirection_changes(v, desired) == [
        (("a", "was"), None),  # left the mesh
        (("a", "x"), "pending"),
        (("a", "y"), "enabled"),
    ]  # "old" (an opt-out the agent never writes) and "w" (never in the mesh) untouched


# -- records ----------------------------------------------------------------------------


def test_records_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "pods")
    store.put(record("a/x"))
    (tmp_path / "pods" / "junk.json").write_text("{not json")
    (tmp_path / "pods" / "uid-z.json").write_text(record("a/y").to_json())  # wrong file
    good, bad = store.all()
    assert good == {"uid-x": record("a/x")}
    assert set(bad) == {"junk.json", "uid-z.json"}
    assert "not JSON" in bad["junk.json"] and "holds uid" in bad["uid-z.json"]
    with pytest.raises(RecordError, match="plain identifier"):
        store.path("../../etc/passwd")
    store.remove("uid-x")
    assert store.all()[0] == {}


# -- the plugin, alone --------------------------------------------------------------------

PLUGIN_BINARY = Path(sys.executable).parent / "ztunnel-cni"
needs_plugin = pytest.mark.skipif(
    not PLUGIN_BINARY.is_file(), reason=f"{PLUGIN_BINARY} is not built (make cni-plugin)"
)


def invoke(
    command: str, config: dict[str, Any], env: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Run the ztunnel-cni binary as a runtime does: environment, config on stdin."""
    full = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=x",
        "CNI_PATH": "/opt/cni/bin",
        **(env or {}),
    }
    done = subprocess.run(
        [str(PLUGIN_BINARY)],
        input=json.dumps(config),
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    text = done.stdout
    return done.returncode, json.loads(text) if text.strip() else None


def conf(run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "ztunnel-cni",
        "runDir": str(run_dir),
        "timeoutSeconds": 2,
        **extra,
    }


@needs_plugin
def test_plugin_refuses_bad_configs_and_answers_version_alone(tmp_path: Path) -> None:
    code, err = invoke("ADD", {"cniVersion": "1.0.0", "prevResult": PREV})
    assert code == 1 and err["code"] == plugin.ERR_DECODING and "runDir" in err["msg"]
    code, err = invoke("ADD", conf(tmp_path, timeoutSeconds="soon", prevResult=PREV))
    assert code == 1 and "timeoutSeconds" in err["msg"]
    code, out = invoke("VERSION", {"cniVersion": "0.4.0"})
    assert code == 0 and out["supportedVersions"] == plugin.SUPPORTED_VERSIONS
    assert out["cniVersion"] == "0.4.0"
    done = subprocess.run(
        [str(PLUGIN_BINARY)],
        input="{not json",
        env={"CNI_COMMAND": "ADD"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "not a JSON object" in json.loads(done.stdout)["msg"]


@needs_plugin
def test_plugin_without_agent_starts_pods_outside_the_mesh_and_holds_back_mesh_ones(
    tmp_path: Path,
) -> None:
    # No hint yet: the agent never ran, the plugin cannot know: it fails, to be retried.
    code, err = invoke("ADD", conf(tmp_path, prevResult=PREV))
    assert code == 1 and err["code"] == plugin.ERR_TRY_AGAIN and "cannot be reached" in err["msg"]
    assert "a/x" in err["msg"] and "No such file" in err["details"]
    # ...except pods of the excluded namespaces (the agent's own): it must always start.
    code, out = invoke("ADD", conf(tmp_path, prevResult=PREV, excludeNamespaces=["kube", "a"]))
    assert code == 0 and out == PREV
    # The agent said namespace "a" is ambient: pods there fail; others start untouched.
    (tmp_path / plugin.AMBIENT_HINT).write_text(json.dumps(["a"]))
    assert invoke("ADD", conf(tmp_path, prevResult=PREV))[0] == 1
    other = {"CNI_ARGS": "K8S_POD_NAMESPACE=b;K8S_POD_NAME=y", "CNI_CONTAINERID": "b0b"}
    code, out = invoke("ADD", conf(tmp_path, prevResult=PREV), other)
    assert code == 0 and out == PREV
    # The pods that started are kept for the agent; the held-back one is not.
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["b0b.json", "c0ffee.json"]
    # DEL, CHECK, STATUS succeed without an agent (a failing STATUS would stop the node).
    for command in ("DEL", "CHECK", "STATUS", "GC"):
        assert invoke(command, conf(tmp_path)) == (0, None)


# -- the plugin against a running agent ----------------------------------------------------


class FixedView:
    def __init__(self, v: ClusterView) -> None:
        self.v = v

    def describe(self) -> str:
        return "a fixed view"

    def read(self) -> ClusterView:
        return self.v


def ask(sock: Path, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(s.makefile().readline())
        return answer


@needs_plugin
def test_plugin_asks_the_agent_which_answers_for_pods_outside_the_mesh(tmp_path: Path) -> None:
    """Outside the mesh: passed through at once; unknown pod in an unknown namespace:
    refused with the agent's reason (the mesh pods' path needs root: integration)."""
    v = view({"a": {}, "b": AMBIENT}, {"a/x": {}})

    async def body() -> None:
        agent = NodeAgent(run_dir=tmp_path, source=FixedView(v))
        await agent.start()
        try:
            code, out = await asyncio.to_thread(invoke, "ADD", conf(tmp_path, prevResult=PREV))
            assert (code, out) == (0, PREV)
            code, err = await asyncio.to_thread(
                invoke,
                "ADD",
                conf(tmp_path, prevResult=PREV),
                {"CNI_ARGS": "K8S_POD_NAMESPACE=b;K8S_POD_NAME=new", "CNI_CONTAINERID": "b0b"},
            )
            assert code == 1 and err["code"] == plugin.ERR_ENROLL
            assert "not known to the node agent" in err["details"]
            # The agent checks the call as the binary forwarded it.
            code, err = await asyncio.to_thread(
                invoke, "ADD", conf(tmp_path, cniVersion="9.9.9", prevResult=PREV)
            )
            assert code == 1 and err["code"] == plugin.ERR_INCOMPATIBLE_VERSION
            code, err = await asyncio.to_thread(invoke, "ADD", conf(tmp_path))
            assert code == 1 and err["code"] == plugin.ERR_UNSUPPORTED_FIELD
            assert "chained" in err["msg"]
            code, err = await asyncio.to_thread(
                invoke, "ADD", conf(tmp_path, prevResult=PREV), {"CNI_ARGS": "K8S_POD_NAME=x"}
            )
            assert code == 1 and "K8S_POD_NAMESPACE" in err["msg"]
            assert await asyncio.to_thread(invoke, "DEL", conf(tmp_path)) == (0, None)
            sock = tmp_path / plugin.SOCKET_NAME
            status = await asyncio.to_thread(ask, sock, {"cmd": "status"})
            assert status["ok"] and status["enrolled"] == [] and status["ztunnel"] is False
            bad = await asyncio.to_thread(ask, sock, {"cmd": "rm -rf"})
            assert not bad["ok"] and "unknown command" in bad["error"]
            # The reconcile pass writes the hint the plugin falls back on, and records
            # the pods the plugin let start while the agent was away.
            pending = tmp_path / "pending"
            pending.mkdir()
            (pending / "0ld.json").write_text(
                json.dumps(
                    {
                        "cmd": "cni",
                        "env": {
                            "CNI_COMMAND": "ADD",
                            "CNI_CONTAINERID": "0ld",
                            "CNI_NETNS": str(tmp_path),  # a path that exists
                            "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=old",
                        },
                        "config": json.dumps(conf(tmp_path, prevResult=PREV)),
                    }
                )
            )
            (pending / "junk.json").write_text("{")
            await agent.reconcile()
            assert json.loads((tmp_path / plugin.AMBIENT_HINT).read_text()) == ["b"]
            assert list(pending.iterdir()) == []
            old = agent.records.all()[0]["0ld"]
            assert (old.namespace, old.name, old.ips) == ("a", "old", ("10.244.0.7",))
        finally:
            await agent.close()

    run(body, timeout_s=20)


def test_the_record_keeps_the_pod_uid_the_runtime_passed_for_finding_its_cgroup(
    tmp_path: Path,
) -> None:
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/x",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=x;"
        "K8S_POD_UID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    }
    call = plugin.prepare(env, conf(tmp_path, prevResult=PREV))
    assert call.record is not None
    assert call.record.pod_uid == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    store = RecordStore(tmp_path / "pods")
    store.put(call.record)
    assert store.get("c0ffee") == call.record
    assert store.get("other") is None
    # A record written before the field existed still reads, without it.
    (tmp_path / "pods" / "old.json").write_text(
        json.dumps({"uid": "old", "namespace": "a", "name": "y", "netns": "/run/netns/y"})
    )
    old = store.get("old")
    assert old is not None and old.pod_uid == ""
    (tmp_path / "pods" / "bad.json").write_text(
        json.dumps({"uid": "bad", "namespace": "a", "name": "y", "netns": "/n", "pod_uid": 7})
    )
    with pytest.raises(RecordError, match="pod_uid"):
        store.get("bad")
