"""The whole node on a meshlab cluster: `meshlab up --mesh`, then pods talk.

meshd in the root namespace; on each node the node agent and ztunnel as
separate processes; each node's primary CNI kindnet's (``ptp`` +
``host-local`` + ``portmap``), and the node agent installs ``ztunnel-cni``
into it as on Kubernetes. Everything the
pods do goes through the real capture, ZDS, xDS, CA and HBONE paths, and the
node underlay is sniffed to see what crosses it.

One cluster per capture backend serves the module (it takes a few seconds to
build): every test runs with Istio's in-pod iptables rules and again with the
eBPF programs (``meshlab up --capture ebpf``), where the pods must hold no
iptables rule of ours. Each test leaves its cluster as it found it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from scapy.layers.inet import TCP

from mesh.cluster.model import CAPTURE_BACKENDS, Pod
from mesh.cluster.statefile import cluster_dir, locked, read_state, write_state
from meshlab import cgroups, cni, lifecycle, mesh, names
from tests.integration.conftest import (
    assert_nothing_left,
    http_get,
    mesh_args,
    meshlab,
    skip_unless_backend_runs,
    unique_name,
)
from tests.integration.meshlab_pods import (
    backend_of,
    capture_state,
    captured,
    curl,
    pod_ip,
    seen,
    sniff,
    wait_for,
)
from ztunnel.capture import inpod
from ztunnel.capture.ebpf import EbpfCapture

VIP = "10.96.0.20"
LOCAL_VIP = "10.96.0.21"  # the same pods, internalTrafficPolicy: Local

CLUSTER: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "namespaces": [
        {"name": "client", "labels": {"istio.io/dataplane-mode": "ambient"}},
        {"name": "server", "labels": {"istio.io/dataplane-mode": "ambient"}},
        {"name": "outside"},
        {"name": "later"},
    ],
    "serviceAccounts": [
        {"namespace": "client", "name": "sleep"},
        {"namespace": "server", "name": "echo"},
    ],
    "pods": [
        {
            "name": "sleep",
            "namespace": "client",
            "node": "node1",
            "serviceAccount": "sleep",
            "command": ["sleep", "infinity"],
        },
        *(
            {
                "name": f"echo-{i}",
                "namespace": "server",
                "node": node,
                "serviceAccount": "echo",
                "labels": {"app": "echo"},
                "command": ["meshlab", "app", "echo", "--port", "8080"],
            }
            for i, node in ((1, "node1"), (2, "node2"), (3, "node2"))
        ),
        {
            "name": "web",
            "namespace": "outside",
            "node": "node2",
            "command": ["meshlab", "app", "echo", "--port", "8080"],
        },
        {
            "name": "app",
            "namespace": "later",
            "node": "node2",
            "command": ["meshlab", "app", "echo", "--port", "8080"],
        },
    ],
    "services": [
        {
            "name": "echo",
            "namespace": "server",
            "vip": VIP,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "selector": {"app": "echo"},
        },
        {
            "name": "echo-local",
            "namespace": "server",
            "vip": LOCAL_VIP,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "selector": {"app": "echo"},
            "internalTrafficPolicy": "Local",
        },
    ],
}


@pytest.fixture(scope="module", params=CAPTURE_BACKENDS)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    backend = request.param
    skip_unless_backend_runs(backend)
    name = unique_name()
    spec = tmp_path_factory.mktemp("mesh") / "cluster.yaml"
    spec.write_text(yaml.safe_dump(CLUSTER))
    try:
        meshlab("up", "-f", str(spec), "--name", name, *mesh_args(), "--capture", backend)
        yield name
    finally:
        meshlab("down", "--name", name, check=False)
        assert_nothing_left(name)


def test_pods_talk_over_hbone_across_and_within_nodes_payload_never_in_clear(
    cluster: str,
) -> None:
    client = pod_ip(cluster, "client/sleep")
    marker = f"secret-{secrets.token_hex(8)}"
    sniffer = sniff(cluster)
    far = http_get(cluster, "client/sleep", f"http://{pod_ip(cluster, 'server/echo-2')}:8080/a")
    code, body = curl(
        cluster, "client/sleep", f"http://{pod_ip(cluster, 'server/echo-2')}:8080/b", data=marker
    )
    near = http_get(cluster, "client/sleep", f"http://{pod_ip(cluster, 'server/echo-1')}:8080/c")
    wire = seen(sniffer)
    assert code == 0, body
    # The apps saw the client pod's own address: captured, tunnelled, and delivered from it.
    assert far["pod"] == "echo-2" and far["client"].split(":")[0] == client
    assert json.loads(body)["bodyBytes"] == len(marker)
    assert near["pod"] == "echo-1" and near["client"].split(":")[0] == client
    # Across the underlay: TLS to 15008 only, never the app's port or its bytes.
    assert wire, "nothing crossed the underlay"
    assert {min(p[TCP].sport, p[TCP].dport) for p in wire} == {15008}
    assert not any(marker.encode() in bytes(p[TCP].payload) for p in wire)
    assert any(bytes(p[TCP].payload)[:1] == b"\x17" for p in wire)  # TLS application data
    # Each mesh pod is captured by its node's backend, and only by it.
    for key in ("client/sleep", "server/echo-1", "server/echo-2", "server/echo-3"):
        assert captured(cluster, key), key


def test_a_service_vip_spreads_over_its_three_endpoints(cluster: str) -> None:
    reached = {http_get(cluster, "client/sleep", f"http://{VIP}/")["pod"] for _ in range(30)}
    assert reached == {"echo-1", "echo-2", "echo-3"}
    # internalTrafficPolicy: Local keeps the client (node1) on its own node's endpoint.
    local = {http_get(cluster, "client/sleep", f"http://{LOCAL_VIP}/")["pod"] for _ in range(10)}
    assert local == {"echo-1"}


def test_mesh_and_non_mesh_pods_reach_each_other(cluster: str) -> None:
    web = pod_ip(cluster, "outside/web")
    marker = f"plain-{secrets.token_hex(8)}"
    sniffer = sniff(cluster)
    code, body = curl(cluster, "client/sleep", f"http://{web}:8080/", data=marker)
    wire = seen(sniffer)
    assert code == 0, body
    # Passthrough, as Istio: plain TCP to the app's port, the client's address kept.
    assert json.loads(body)["client"].split(":")[0] == pod_ip(cluster, "client/sleep")
    assert any(marker.encode() in bytes(p[TCP].payload) for p in wire)
    # A client outside the mesh reaches a mesh pod through its ztunnel's 15006.
    answer = http_get(cluster, "outside/web", f"http://{pod_ip(cluster, 'server/echo-3')}:8080/")
    assert answer["pod"] == "echo-3" and answer["client"].split(":")[0] == web


def test_labels_enroll_and_unenroll_running_pods_without_restarting_them(cluster: str) -> None:
    before = {p.key: p.pid for p in read_state(cluster).pods}
    assert not captured(cluster, "later/app")
    meshlab("label", "--name", cluster, "namespace", "later", "istio.io/dataplane-mode=ambient")
    try:
        wait_for("later/app to be captured", lambda: captured(cluster, "later/app"))
        # Now it is a mesh pod: reached over HBONE, it sees the client's address.
        app = pod_ip(cluster, "later/app")
        sniffer = sniff(cluster)
        answer = http_get(cluster, "client/sleep", f"http://{app}:8080/")
        wire = seen(sniffer)
        assert answer["pod"] == "app"
        assert {min(p[TCP].sport, p[TCP].dport) for p in wire} == {15008}
        # A pod opts out by its own label, its namespace still ambient.
        meshlab("label", "--name", cluster, "pod", "later/app", "istio.io/dataplane-mode=none")
        wait_for("later/app to leave", lambda: not captured(cluster, "later/app"))
        meshlab("label", "--name", cluster, "pod", "later/app", "istio.io/dataplane-mode-")
        wait_for("later/app to be back", lambda: captured(cluster, "later/app"))
    finally:
        meshlab("label", "--name", cluster, "namespace", "later", "istio.io/dataplane-mode-")
    wait_for("later/app to be released", lambda: not captured(cluster, "later/app"))
    assert curl(cluster, "client/sleep", f"http://{pod_ip(cluster, 'later/app')}:8080/")[0] == 0
    assert {p.key: p.pid for p in read_state(cluster).pods} == before  # nobody restarted


@contextlib.contextmanager
def policy_in_server(cluster: str, tmp_path: Path, name: str, spec: Any) -> Iterator[None]:
    """An AuthorizationPolicy in namespace server, applied as a user would, deleted after."""
    path = tmp_path / f"{name}.yaml"
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "server"},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(policy))
    meshlab("apply", "--name", cluster, "-f", str(path))
    try:
        yield
    finally:
        meshlab("delete", "--name", cluster, "authorizationpolicy", "-n", "server", name)


def test_policy_applied_through_meshlab_is_enforced_at_the_destination(
    cluster: str, tmp_path: Path
) -> None:
    echo2 = f"http://{pod_ip(cluster, 'server/echo-2')}:8080/"
    deny = {
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}],
    }
    with policy_in_server(cluster, tmp_path, "no-sleep", deny):
        wait_for("the DENY to apply", lambda: curl(cluster, "client/sleep", echo2)[0] != 0)
        # Not from outside the mesh: a plaintext client has no principal, so it is
        # not matched by a principal DENY (Istio's semantics).
        assert curl(cluster, "outside/web", echo2)[0] == 0
    wait_for("the DENY to go", lambda: curl(cluster, "client/sleep", echo2)[0] == 0)

    # An ALLOW by namespace and port: the client namespace on 8080 only. Anyone else,
    # the plaintext pod outside the mesh included, is now denied.
    allow = {
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"namespaces": ["client"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }
        ],
    }
    with policy_in_server(cluster, tmp_path, "from-client", allow):
        wait_for("the ALLOW to apply", lambda: curl(cluster, "outside/web", echo2)[0] != 0)
        assert curl(cluster, "client/sleep", echo2)[0] == 0
    wait_for("the ALLOW to go", lambda: curl(cluster, "outside/web", echo2)[0] == 0)

    # An ALLOW whose rule names an HTTP method: ztunnel cannot see methods, so the rule
    # matches nothing (Istio's semantics, fail closed): the GET it names is denied too,
    # and the policy's status says why.
    get_only = {
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"namespaces": ["client"]}}],
                "to": [{"operation": {"methods": ["GET"]}}],
            }
        ],
    }
    with policy_in_server(cluster, tmp_path, "get-only", get_only):
        wait_for("the ALLOW to apply", lambda: curl(cluster, "client/sleep", echo2)[0] != 0)
        shown = meshlab(
            "get",
            "--name",
            cluster,
            "authorizationpolicy",
            "get-only",
            "-n",
            "server",
            "-o",
            "json",
        )
        (condition,) = json.loads(shown.stdout)["status"]["conditions"]
        assert (condition["type"], condition["reason"]) == ("ZtunnelAccepted", "UnsupportedValue")
        assert condition["message"].startswith(
            "ztunnel does not support HTTP attributes (found: methods)."
        )
    wait_for("the ALLOW to go", lambda: curl(cluster, "client/sleep", echo2)[0] == 0)


def test_a_restarted_ztunnel_readopts_its_pods_and_nothing_bypasses_it_meanwhile(
    cluster: str,
) -> None:
    state = read_state(cluster)
    node2 = state.node("node2")
    echo2 = f"http://{pod_ip(cluster, 'server/echo-2')}:8080/"
    web = f"http://{pod_ip(cluster, 'outside/web')}:8080/"
    old = mesh.pids(cluster)["nodes"]["node2"]["ztunnel"]
    marker = f"down-{secrets.token_hex(8)}"
    # ztunnel of node2 dies; the capture stays (the node agent keeps it).
    subprocess.run(["kill", "-KILL", str(old)], check=True)
    wait_for("ztunnel to die", lambda: not Path(f"/proc/{old}").exists(), 5)
    assert captured(cluster, "server/echo-2")
    sniffer = sniff(cluster)
    from_mesh, _ = curl(cluster, "client/sleep", echo2, data=marker)
    from_outside, _ = curl(cluster, "outside/web", echo2, data=marker)
    # The non-mesh pod on node2 itself is untouched.
    alone = curl(cluster, "outside/web", web)[0]
    wire = seen(sniffer)
    assert from_mesh != 0 and from_outside != 0  # refused, not delivered uncaptured
    assert alone == 0
    assert not any(marker.encode() in bytes(p[TCP].payload) for p in wire)
    # A new ztunnel is handed the pods by the node agent and serves them again.
    new = mesh.start_ztunnel(state, node2)
    mesh.wait_node(state, node2)
    assert new != old
    assert http_get(cluster, "client/sleep", echo2)["pod"] == "echo-2"
    assert http_get(cluster, "outside/web", echo2)["pod"] == "echo-2"


def test_a_restarted_node_agent_keeps_the_capture_and_adds_nothing(cluster: str) -> None:
    """The capture outlives the agent; the new one finds it (eBPF: the pinned
    programs, not loaded again) and leaves it as it was."""
    state = read_state(cluster)
    node2 = state.node("node2")
    key = "server/echo-2"
    before = capture_state(cluster, key)
    old = mesh.pids(cluster)["nodes"]["node2"]["agent"]
    subprocess.run(["kill", "-KILL", str(old)], check=True)
    wait_for("the agent to die", lambda: not Path(f"/proc/{old}").exists(), 5)
    echo2 = f"http://{pod_ip(cluster, key)}:8080/"
    assert http_get(cluster, "client/sleep", echo2)["pod"] == "echo-2"  # ztunnel still serves
    assert capture_state(cluster, key) == before
    mesh.start_agent(state, node2)
    mesh.wait_node(state, node2)
    assert mesh.agent_status(cluster, "node2")["capture"]["backend"] == backend_of(cluster, key)
    assert capture_state(cluster, key) == before
    assert http_get(cluster, "client/sleep", echo2)["pod"] == "echo-2"


def chain_of(cluster: str, node: str) -> list[str]:
    conf = json.loads((mesh.cni_conf_dir(cluster, node) / cni.NETWORK_FILE).read_text())
    return [p["type"] for p in conf["plugins"]]


def test_the_agent_installed_ztunnel_cni_and_puts_it_back_when_kindnet_rewrites_its_conflist(
    cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = read_state(cluster)
    node = state.node("node1")
    assert node.pod_cidr is not None
    installed = mesh.cni_bin_dir(cluster, "node1") / "ztunnel-cni"
    assert installed.read_bytes() == (mesh.bin_dir() / "ztunnel-cni").read_bytes()
    assert chain_of(cluster, "node1") == ["ptp", "portmap", "ztunnel-cni"]
    # kindnet writes its own file again (as it does when it restarts), over and over,
    # while pods start on the node: some ADDs run without our entry in the chain.
    kindnet = cni.node_conflist(
        node.pod_cidr, lifecycle.node_dir(cluster, "node1") / "cni" / "ipam"
    )
    stop = threading.Event()
    rewrites = 0

    def rewrite() -> None:
        nonlocal rewrites
        while not stop.is_set():
            cni.write_conflist(mesh.cni_conf_dir(cluster, "node1"), kindnet, cni.NETWORK_FILE)
            rewrites += 1
            stop.wait(0.2)

    new = [
        Pod(
            name=f"churn-{i}",
            namespace=ns,
            node="node1",
            command=("meshlab", "app", "echo", "--port", "8080"),
        )
        for i, ns in enumerate(["client", "client", "client", "client", "outside"])
    ]
    writer = threading.Thread(target=rewrite, daemon=True)
    try:
        with locked(cluster):
            current = read_state(cluster)
            # The first pod's ADD surely runs on kindnet's own list (the runtime read
            # the file just after a rewrite); the others race the rewrites.
            with monkeypatch.context() as patch:
                patch.setattr(cni, "load_conflist", lambda _: kindnet)
                current = lifecycle.start_pod(current, new[0], cni.find_cni_path())
            writer.start()
            for pod in new[1:]:
                current = lifecycle.start_pod(current, pod, cni.find_cni_path())
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
    try:
        assert rewrites >= 3
        # The entry is back, once and last, within two of the agent's passes.
        wait_for(
            "ztunnel-cni back in the chain",
            lambda: chain_of(cluster, "node1")[-1:] == ["ztunnel-cni"],
            5,
        )
        assert chain_of(cluster, "node1") == ["ptp", "portmap", "ztunnel-cni"]
        # Every pod of the ambient namespace is in the mesh, whether its ADD went
        # through ztunnel-cni or not (the agent enrolls what it sees on its node);
        # the pod of the namespace outside the mesh is not.
        for pod in new[:4]:
            wait_for(f"{pod.key} to be captured", lambda p=pod: captured(cluster, p.key))
        assert not captured(cluster, "outside/churn-4")
        agent_log = (cluster_dir(cluster) / "logs" / "node-agent.node1.log").read_text()
        assert "client/churn-0 runs without ztunnel-cni having seen it" in agent_log
        # ... and recorded as ztunnel-cni would have, under its sandbox's id.
        sandbox = next(
            p.container_id for p in read_state(cluster).pods if p.key == "client/churn-0"
        )
        record = mesh.run_dir(cluster, "node1") / "pods" / f"{sandbox}.json"
        assert json.loads(record.read_text())["name"] == "churn-0"
        sniffer = sniff(cluster)
        answer = http_get(
            cluster, "server/echo-2", f"http://{pod_ip(cluster, 'client/churn-0')}:8080/"
        )
        wire = seen(sniffer)
        assert answer["pod"] == "churn-0"
        assert {min(p[TCP].sport, p[TCP].dport) for p in wire} == {15008}
    finally:
        with locked(cluster):
            current = read_state(cluster)
            for pod in new:
                started = next((p for p in current.pods if p.key == pod.key), None)
                if started is not None:
                    lifecycle.stop_pod(current, started)
            keys = {p.key for p in new}
            write_state(replace(current, pods=tuple(p for p in current.pods if p.key not in keys)))
    # CNI DEL through ztunnel-cni removes the found record (or, had the agent recorded
    # the pod again between DEL and the namespace's removal, its next pass forgets it).
    wait_for("the found record to go", lambda: not record.exists(), 5)


def test_a_mesh_pod_resolves_service_names_through_its_ztunnel(cluster: str) -> None:
    # The pod asks the cluster DNS address a kubelet would give it; its port 53 is
    # captured to ztunnel's proxy in the pod, which knows the services from the feed.
    script = (
        "import dns.message, dns.query, sys\n"
        "q = dns.message.make_query(sys.argv[1], 'A')\n"
        "a = dns.query.udp(q, '10.96.0.10', timeout=3)\n"
        "print(' '.join(r.address for s in a.answer for r in s if hasattr(r, 'address')))\n"
    )
    names_asked = ("echo.server.svc.cluster.local.", "echo.server.client.svc.cluster.local.")
    for name in names_asked:
        done = meshlab(
            "exec", "--name", cluster, "client/sleep", "--", "python3", "-c", script, name
        )
        assert done.stdout.split() == [VIP], (name, done.stdout, done.stderr)
    # The pod's resolv.conf is kubelet's (cluster DNS, search domains, ndots 5), so
    # the short names an app uses work: the libc resolver and curl, through the mesh.
    hosts = meshlab(
        "exec", "--name", cluster, "client/sleep", "--", "getent", "hosts", "echo.server"
    )
    assert hosts.stdout.split()[0] == VIP
    assert http_get(cluster, "client/sleep", "http://echo.server/")["namespace"] == "server"
    # A pod outside the mesh is not captured: nobody answers it at that address.
    outside = meshlab(
        "exec",
        "--name",
        cluster,
        "outside/web",
        "--",
        "python3",
        "-c",
        script,
        names_asked[0],
        check=False,
    )
    assert outside.returncode != 0 and "Timeout" in outside.stderr


CTL = str(Path(sys.executable).parent / "ztunnel-ctl")


def ctl(cluster: str, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CTL, "--cluster", cluster, "--node", node, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ztunnel_ctl_reads_a_live_node_and_verify_finds_drift(cluster: str) -> None:
    workloads = ctl(cluster, "node1", "workloads")
    assert workloads.returncode == 0, workloads.stderr
    header = workloads.stdout.splitlines()[0].split()
    assert header[:4] == ["NAMESPACE", "POD", "NAME", "ADDRESS"]
    assert "sleep" in workloads.stdout and "HBONE" in workloads.stdout
    certs = ctl(cluster, "node1", "certificates", "-o", "json")
    identities = {c["identity"]: c["state"] for c in json.loads(certs.stdout)}
    assert identities["spiffe://cluster.local/ns/client/sa/sleep"] == "Available"
    trace = ctl(cluster, "node1", "trace", "--from", "client/sleep", "--to", f"{VIP}:80")
    assert trace.returncode == 0, trace.stdout + trace.stderr
    assert "HBONE" in trace.stdout
    # Everything in place: verify is quiet and says so in its exit code.
    ok = ctl(cluster, "node1", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"client/sleep ({backend_of(cluster, 'client/sleep')}, netns" in ok.stdout
    # Capture lost in one pod (someone flushed its nat table, or took its tc filter
    # off): verify names it and the fix.
    netns = Path(f"/run/netns/{names.pod_netns(cluster, 'client', 'sleep')}")
    ebpf = backend_of(cluster, "client/sleep") == "ebpf"
    if ebpf:
        loss = ["tc", "filter", "del", "dev", "eth0", "ingress", "pref", "1337"]
    else:
        loss = ["iptables", "-t", "nat", "-F"]
    subprocess.run(["nsenter", f"--net={netns}", *loss], check=True)
    try:
        drift = ctl(cluster, "node1", "verify")
        assert drift.returncode == 1
        assert "client/sleep" in drift.stdout and "node agent" in drift.stdout
        if ebpf:
            assert "tc ingress filter zt_ingress on eth0" in drift.stdout
    finally:
        if ebpf:
            sleep = next(p for p in read_state(cluster).pods if p.key == "client/sleep")
            assert sleep.container_id
            root = cgroups.node_root(cluster, "node1")
            assert root is not None
            backend = EbpfCapture(names.bpf_dir(cluster, "node1"), root)
            backend.install(netns, cgroups.pod_uid(sleep.container_id))
            backend.programs.close()
        else:
            inpod.install(netns)
    assert ctl(cluster, "node1", "verify").returncode == 0


def test_authz_check_agrees_with_what_the_data_path_does(cluster: str, tmp_path: Path) -> None:
    echo2 = pod_ip(cluster, "server/echo-2")
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "sleep-on-8080", "namespace": "server"},
        "spec": {
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        },
    }
    path = tmp_path / "allow.yaml"
    path.write_text(yaml.safe_dump(policy))
    meshlab("apply", "--name", cluster, "-f", str(path))
    sleep_id = "spiffe://cluster.local/ns/client/sa/sleep"
    web = pod_ip(cluster, "outside/web")
    try:
        wait_for(
            "the ALLOW to apply",
            lambda: curl(cluster, "outside/web", f"http://{echo2}:8080/")[0] != 0,
        )
        flows = [
            (sleep_id, "client/sleep", f"{echo2}:8080"),
            (web, "outside/web", f"{echo2}:8080"),
        ]
        for source, pod, to in flows:
            check = ctl(cluster, "node2", "authz-check", "--from", source, "--to", to)
            assert check.returncode in (0, 1), check.stderr
            said_allow = check.returncode == 0
            did_allow = curl(cluster, pod, f"http://{to}/")[0] == 0
            assert said_allow == did_allow, (source, to, check.stdout)
            if not said_allow:
                assert "sleep-on-8080" in check.stdout or "no ALLOW" in check.stdout
        assert (
            ctl(
                cluster, "node2", "authz-check", "--from", sleep_id, "--to", f"{echo2}:8080"
            ).returncode
            == 0
        )
    finally:
        meshlab("delete", "--name", cluster, "authorizationpolicy", "-n", "server", "sleep-on-8080")
    wait_for(
        "the ALLOW to go", lambda: curl(cluster, "outside/web", f"http://{echo2}:8080/")[0] == 0
    )


def ztunnel_metrics(cluster: str, node: str) -> list[tuple[dict[str, str], float]]:
    """The node ztunnel's ``istio_tcp_connections_opened_total`` samples (its 15020, in
    the node's namespace)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = "http://127.0.0.1:15020/metrics"
    text = subprocess.run(
        ["ip", "netns", "exec", names.node_netns(cluster, node), "curl", "-sS", "-m", "5", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "istio_tcp_connections_opened_total"
    ]


def test_the_destination_ztunnel_labels_connections_with_the_service_the_client_asked_for(
    cluster: str,
) -> None:
    """The echo pods back two services (echo, echo-local): only the source knows which
    one a connection was for, and its baggage tells the destination ztunnel."""

    def opened(node: str, service: str) -> float:
        return sum(
            v
            for labels, v in ztunnel_metrics(cluster, node)
            if labels["reporter"] == "destination"
            and labels["destination_workload"].startswith("echo-")
            and labels["destination_service"] == service
        )

    echo, local = "echo.server.svc.cluster.local", "echo-local.server.svc.cluster.local"
    before = {(n, s): opened(n, s) for n in ("node1", "node2") for s in (echo, local, "unknown")}
    # echo-local keeps the client on node1: echo-1, whose ztunnel is node1's.
    for _ in range(3):
        assert http_get(cluster, "client/sleep", f"http://{LOCAL_VIP}/")["pod"] == "echo-1"
    # echo spreads: count the ones that crossed to node2 (echo-2, echo-3).
    far = sum(
        http_get(cluster, "client/sleep", f"http://{VIP}/")["pod"] != "echo-1" for _ in range(12)
    )
    assert far, "no request reached node2"
    assert opened("node1", local) >= before["node1", local] + 3
    assert opened("node2", echo) >= before["node2", echo] + far
    assert opened("node2", local) == before["node2", local]
    for node in ("node1", "node2"):
        assert opened(node, "unknown") == before[node, "unknown"]
    # The rest of the destination's label set, from its own index.
    sample = next(
        labels
        for labels, _ in ztunnel_metrics(cluster, "node1")
        if labels["reporter"] == "destination" and labels["destination_service"] == local
    )
    assert sample["destination_service_name"] == "echo-local"
    assert sample["destination_service_namespace"] == "server"
    assert sample["destination_workload_namespace"] == "server"
    assert sample["source_workload"] == "sleep"
    assert sample["source_workload_namespace"] == "client"
    assert sample["source_principal"] == "spiffe://cluster.local/ns/client/sa/sleep"
