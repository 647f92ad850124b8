"""The ClusterRoles grant what the Kubernetes code calls, verb by verb, and nothing more.

The rules meshd and the node agent need are derived from their code's own tables, so a kind added
there fails here until the manifests grant it: the source's and the
deployer's informers (list, watch), what the deployer writes (its objects'
kinds: create, get after a conflict, merge patch; delete for the children it
garbage-collects), the status it writes (get, then a PUT to ``/status``), the
TokenReview, the CA Secret and the leader Lease (the HTTP methods
``controlplane/leader.py`` sends); the node agent's informers (list, watch)
and its reads and pods/status patch. The official client's calls (``read_*``,
``create_*``, ...) are found in the source of each module that makes them and
looked up in :data:`CLIENT_CALLS`; a call the table does not know fails, so
it cannot go ungranted.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from types import ModuleType

from controlplane import ca_secret, deployer, kube_status, kube_waypoints, leader
from controlplane.sources import kube_client, kube_convert, kube_informer, kubernetes
from tests.unit.deploy.render import Obj, find, render
from ztunnel.nodeagent import cli as node_agent_cli
from ztunnel.nodeagent import informer as node_agent_informer
from ztunnel.nodeagent import kube as node_agent_kube

Rules = dict[tuple[str, str], set[str]]  # (apiGroup, resource) -> verbs

# The official client's methods the code calls, and the permission each needs.
CLIENT_CALLS = {
    "create_token_review": ("authentication.k8s.io", "tokenreviews", "create"),
    "read_namespaced_secret": ("", "secrets", "get"),
    "create_namespaced_secret": ("", "secrets", "create"),
    "list_namespace": ("", "namespaces", "list"),
    "read_namespace": ("", "namespaces", "get"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "read_namespaced_pod": ("", "pods", "get"),
    "patch_namespaced_pod_status": ("", "pods/status", "patch"),
    "read_namespaced_daemon_set": ("apps", "daemonsets", "get"),
}
_CALL = re.compile(
    r"\.((?:list|read|create|patch|replace|delete)_"
    r"(?:namespaced_\w+|\w+_for_all_namespaces|namespace|node|token_review))\("
)
_GROUPS = {"CoreV1Api": "", "DiscoveryV1Api": "discovery.k8s.io", "AppsV1Api": "apps"}
# leader.py's requests (raw JSON, not the client's methods): Elector._call("METHOD", ...).
_LEASE_CALL = re.compile(r'self\._call\(\s*"([A-Z]+)"')
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _client_calls(module: ModuleType) -> Rules:
    rules: Rules = defaultdict(set)
    for name in _CALL.findall(inspect.getsource(module)):
        assert name in CLIENT_CALLS, (
            f"{module.__name__} calls {name}: add it to CLIENT_CALLS and grant it in deploy/"
        )
        group, resource, verb = CLIENT_CALLS[name]
        rules[(group, resource)].add(verb)
    return rules


def _lease_calls() -> Rules:
    """What leader.py asks of the API server: every request goes through Elector._call,
    to the leases of its namespace."""
    text = inspect.getsource(leader)
    assert text.count("call_api(") == 1 and "def _call(" in text  # no request but _call's
    assert not _client_calls(leader)
    group = leader.LEASES.removeprefix("/apis/").rpartition("/")[0]
    return {(group, "leases"): {_VERBS[m] for m in _LEASE_CALL.findall(text)}}


def _group(kind: kube_informer.Kind) -> str:
    return kind.args[0] if kind.args else _GROUPS[kind.api]


def _api_group(kind: str) -> tuple[str, str]:
    api = deployer.APIS[kind]
    prefix = api.prefix.removeprefix("/apis/").removeprefix("/api/v1")
    return prefix.rpartition("/")[0], api.plural


def meshd_needs() -> tuple[Rules, Rules]:
    """(cluster-wide rules, rules in istio-system) that meshd's code calls for."""
    rules: Rules = defaultdict(set)
    for kind in (*kube_convert.KINDS, *deployer._KINDS.values()):
        rules[(_group(kind), kind.name)] |= {"list", "watch"}
    ref = kube_waypoints.GatewayRef.of({"metadata": {"namespace": "n", "name": "w", "uid": "u"}})
    settings = kube_waypoints.DeployerSettings()
    written = [o["kind"] for o in kube_waypoints.instance_objects(ref, settings)]
    written.append(kube_waypoints.root_cert_config_map("n", "PEM")["kind"])
    for name in written:  # _ensure: POST; GET after a 409; PATCH when it differs
        rules[_api_group(name)] |= {"create", "get", "patch"}
    for name in deployer.CHILD_KINDS:  # _delete_orphans
        rules[_api_group(name)].add("delete")
    rules[_api_group("ConfigMap")].add("get")  # a Gateway's parameters ConfigMap
    for name in ("Gateway", *kube_status.ROUTE_KINDS):  # _write_status: GET, then PUT /status
        group, plural = _api_group(name)
        rules[(group, plural)].add("get")
        rules[(group, f"{plural}/status")].add("update")
    for module in (kubernetes, kube_informer, kube_convert, kube_client):  # the source
        for (group, resource), verbs in _client_calls(module).items():
            rules[(group, resource)] |= verbs
    namespaced = {**_client_calls(ca_secret), **_lease_calls()}
    assert set(namespaced) == {("", "secrets"), ("coordination.k8s.io", "leases")}
    return dict(rules), namespaced


# The node agent's one namespaced call: its own DaemonSet, when it is stopped.
NODE_AGENT_NAMESPACED = {("apps", "daemonsets")}


def node_agent_needs() -> tuple[Rules, Rules]:
    """(cluster-wide rules, rules in istio-system) the node agent's code calls for: its
    informers list and watch each kind; it reads its DaemonSet in its namespace."""
    rules: Rules = defaultdict(set)
    for kind in node_agent_kube.KINDS:
        group, resource, verb = CLIENT_CALLS[kind.method]
        assert (resource, verb) == (kind.name, "list")
        rules[(group, resource)] |= {"list", "watch"}
    for module in (node_agent_kube, node_agent_informer):
        for key, verbs in _client_calls(module).items():
            rules[key] |= verbs
    namespaced = {k: v for k, v in rules.items() if k in NODE_AGENT_NAMESPACED}
    return {k: v for k, v in rules.items() if k not in namespaced}, namespaced


def granted(role: Obj) -> tuple[Rules, set[str]]:
    """The role's (apiGroup, resource) -> verbs, and the resourceNames it names."""
    rules: Rules = defaultdict(set)
    names: set[str] = set()
    for rule in role["rules"]:
        names |= set(rule.get("resourceNames") or ())
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules[(group, resource)] |= set(rule["verbs"])
    return dict(rules), names


def test_meshds_cluster_role_is_exactly_what_its_code_calls() -> None:
    cluster, _ = meshd_needs()
    rules, names = granted(find(render("default"), "ClusterRole", "meshd"))
    missing = {k: v - rules.get(k, set()) for k, v in cluster.items() if v - rules.get(k, set())}
    extra = {k: v - cluster.get(k, set()) for k, v in rules.items() if v - cluster.get(k, set())}
    assert not missing, f"meshd's code needs, and its ClusterRole lacks: {missing}"
    assert not extra, f"meshd's ClusterRole grants what no code calls: {extra}"
    assert not names


def test_meshds_role_is_the_ca_secret_and_the_leader_lease_in_istio_system_only() -> None:
    _, namespaced = meshd_needs()
    objects = render("default")
    role = find(objects, "Role", "meshd")
    rules, _ = granted(role)
    assert rules == namespaced
    assert namespaced == {
        ("", "secrets"): {"get", "create"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    }
    defaults = inspect.signature(ca_secret.load_or_create_ca_secret).parameters
    assert role["metadata"]["namespace"] == defaults["namespace"].default == leader.NAMESPACE
    settings = leader.ElectionSettings()
    assert (settings.namespace, settings.name) == (leader.NAMESPACE, leader.LEASE_NAME)
    # get and update are limited to the object's name; create cannot be limited by name.
    named = {"secrets": defaults["name"].default, "leases": leader.LEASE_NAME}
    for rule in role["rules"]:
        (resource,) = rule["resources"]
        if set(rule["verbs"]) - {"create"}:
            assert rule["resourceNames"] == [named[resource]]
    assert _binds(objects, "RoleBinding", "meshd") == [("istio-system", "meshd")]
    assert _binds(objects, "ClusterRoleBinding", "meshd") == [("istio-system", "meshd")]


def test_node_agents_cluster_role_is_exactly_what_its_code_calls() -> None:
    objects = render("default")
    rules, names = granted(find(objects, "ClusterRole", "ztunnel-node-agent"))
    assert rules == node_agent_needs()[0]
    assert not names
    assert _binds(objects, "ClusterRoleBinding", "ztunnel-node-agent") == [
        ("istio-system", "ztunnel-node-agent")
    ]


def test_node_agents_role_is_get_of_its_own_daemonset_only() -> None:
    objects = render("default")
    role = find(objects, "Role", "ztunnel-node-agent")
    rules, names = granted(role)
    assert rules == node_agent_needs()[1] == {("apps", "daemonsets"): {"get"}}
    # The name it asks for (--daemonset, as the manifest gives it) is the DaemonSet's.
    daemonset = find(objects, "DaemonSet", "ztunnel-node-agent")
    (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert "--cni-uninstall=when-removed" in agent["args"]
    assert f"--daemonset={node_agent_cli.DAEMONSET}" in agent["args"]
    assert names == {node_agent_cli.DAEMONSET} == {daemonset["metadata"]["name"]}
    namespace = daemonset["metadata"]["namespace"]
    assert role["metadata"]["namespace"] == namespace
    assert _binds(objects, "RoleBinding", "ztunnel-node-agent") == [
        (namespace, "ztunnel-node-agent")
    ]


def _binds(objects: list[Obj], kind: str, name: str) -> list[tuple[str, str]]:
    binding = find(objects, kind, name)
    assert binding["roleRef"]["name"] == name
    return [(s["namespace"], s["name"]) for s in binding["subjects"]]
