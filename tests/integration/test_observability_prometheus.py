"""examples/observability/ against a real Prometheus (Debian's), on the bookstore cluster.

The bookstore of test_waypoint_meshlab.py (client/sleep -> ztunnel -> the shop
waypoint -> reviews), with Prometheus run as a user runs it on meshlab: in
node1's network namespace (from where every node and pod is routed), on that
namespace's loopback, with prometheus-meshlab.yaml and the targets
meshlab_targets.py writes. Checked:

* both scrape configs pass ``promtool check config``; the Kubernetes one's
  relabelings, fed the targets Kubernetes' pod discovery would hand them for
  this cluster, keep exactly each ztunnel's and each waypoint's port 15020,
  with the target labels the meshlab config gives them too;
* Prometheus scrapes every ztunnel and the waypoint on /stats/prometheus;
* after traffic through the waypoint (served, denied by policy, rate-limited,
  and a bypass ztunnel refuses), every query of grafana-dashboard.json, its
  variables filled in, is valid and returns data, except the panels listed in
  NO_DATA_HERE, which are only checked to be valid queries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import MESHLAB, meshlab, status

# The bookstore cluster and its helpers.
from tests.integration.test_waypoint_meshlab import (
    EXAMPLES,
    REVIEWS,
    bookstore,
    count,
    eventually,
)
from tests.support import netns_http

OBS = EXAMPLES / "observability"
ROOT = EXAMPLES.parent
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
METRICS_PORT = 15020
# What the dashboard's variables are set to (values the bookstore's traffic has).
VARIABLES = {
    "$namespace": "shop",
    "$service": "reviews-v1.shop.svc.cluster.local",  # the canary's 90%
    # Grafana's, at least 4 scrape intervals: here a window over all the test's traffic.
    "$__rate_interval": "1m",
}
# Panels whose series this traffic cannot make: their queries are checked to be
# valid only. (A waypoint that NACKs an xDS resource.)
NO_DATA_HERE = {"Waypoint config refused (xDS NACKs)"}

pytestmark = [
    pytest.mark.skipif(
        not (PROMETHEUS.is_file() and PROMTOOL.is_file()),
        reason=f"needs prometheus and promtool ({PROMETHEUS}; Debian package prometheus)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) to create network namespaces"
    ),
]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def dashboard() -> dict[str, Any]:
    return dict(json.loads((OBS / "grafana-dashboard.json").read_text()))


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with the variables filled in), every panel's targets."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], target["refId"], expr))
    return out


# -- the Kubernetes config, with a stand-in for Kubernetes' pod discovery -------------------


def k8s_pod_targets(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets Prometheus' ``kubernetes_sd_configs: [{role: pod}]`` would discover
    if this cluster were Kubernetes: one per declared container port of each pod, with
    the ``__meta_kubernetes_pod_*`` labels. ztunnel is the DaemonSet of
    deploy/base/ztunnel.yaml (its labels and ports), one pod per node at the node's IP
    (meshlab runs it in the node's namespace); the waypoint's ports are the Deployment's
    meshd makes (hbone 15008, metrics 15020, status-port 15021); a finished ztunnel pod
    and the apps' pods are there to be dropped."""
    (daemonset,) = (
        d
        for d in yaml.safe_load_all((ROOT / "deploy/base/ztunnel.yaml").read_text())
        if d and d["kind"] == "DaemonSet"
    )
    template = daemonset["spec"]["template"]
    zt_labels = template["metadata"]["labels"]
    zt_ports = [(p["name"], p["containerPort"]) for p in template["spec"]["containers"][0]["ports"]]

    def pod(
        ip: str,
        namespace: str,
        name: str,
        node: str,
        labels: dict[str, str],
        ports: list[tuple[str, int]],
        phase: str = "Running",
    ) -> list[dict[str, Any]]:
        meta = {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_node_name": node,
            "__meta_kubernetes_pod_phase": phase,
        }
        for key, value in labels.items():
            safe = re.sub(r"[^a-zA-Z0-9_]", "_", key)
            meta[f"__meta_kubernetes_pod_label_{safe}"] = str(value)
            meta[f"__meta_kubernetes_pod_labelpresent_{safe}"] = "true"
        return [
            {
                "targets": [f"{ip}:{number}"],
                "labels": {
                    **meta,
                    "__meta_kubernetes_pod_container_port_name": port_name,
                    "__meta_kubernetes_pod_container_port_number": str(number),
                },
            }
            for port_name, number in ports
        ]

    groups = []
    for node in state["nodes"]:
        name = f"ztunnel-{node['name']}"
        groups += pod(node["ip"], "istio-system", name, node["name"], zt_labels, zt_ports)
        groups += pod(
            node["ip"],
            "istio-system",
            f"{name}-old",
            node["name"],
            zt_labels,
            zt_ports,
            "Succeeded",
        )
    for p in state["pods"]:
        if "gateway.networking.k8s.io/gateway-name" in p["labels"]:
            ports = [("hbone", 15008), ("metrics", METRICS_PORT), ("status-port", 15021)]
        else:
            ports = [("http", 8080)]
        groups += pod(p["ip"], p["namespace"], p["name"], p["node"], p["labels"], ports)
    return groups


def with_stand_in_discovery(config: dict[str, Any], targets_file: str) -> dict[str, Any]:
    """The Kubernetes config with each job's ``kubernetes_sd_configs`` replaced by a file
    of the targets it would discover; everything else (the relabelings) unchanged."""
    config = json.loads(json.dumps(config))
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job["job_name"]
        job["file_sd_configs"] = [{"files": [targets_file]}]
    return config


def test_both_scrape_configs_pass_promtool(tmp_path: Path) -> None:
    done = promtool("check", "config", str(OBS / "prometheus-meshlab.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr  # (warns: no targets files yet)
    done = promtool("check", "config", str(OBS / "prometheus.yaml"))
    if done.returncode != 0:
        # Debian builds Prometheus without Kubernetes discovery (NEWS.Debian, 1.5.0+ds-1):
        # then that must be the only complaint, and the rest must pass.
        complaints = [
            line.strip()
            for line in (done.stdout + done.stderr).splitlines()
            if re.match(r"\s*line \d+:", line)
        ]
        assert complaints and all(
            c.endswith("field kubernetes_sd_configs not found in type config.ScrapeConfig")
            for c in complaints
        ), done.stdout + done.stderr
        config = yaml.safe_load((OBS / "prometheus.yaml").read_text())
        stand_in = tmp_path / "prometheus.yaml"
        stand_in.write_text(yaml.safe_dump(with_stand_in_discovery(config, "pods.json")))
        (tmp_path / "pods.json").write_text("[]")
        done = promtool("check", "config", str(stand_in))
        assert done.returncode == 0, done.stdout + done.stderr


# -- Prometheus on the cluster ---------------------------------------------------------------


@dataclass
class Prometheus:
    cluster: str
    netns: str  # node1's network namespace: Prometheus listens on its 127.0.0.1
    port: int
    state: dict[str, Any]
    log: Path

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        return netns_http.get_json(self.netns, self.port, f"/api/v1/{path}", params)

    def query(self, expr: str) -> dict[str, Any]:
        return dict(self.api("query", {"query": expr}))


@pytest.fixture(scope="module")
def books() -> Iterator[str]:
    """The bookstore (its capture is not what is watched here: iptables, the default)."""
    with bookstore("iptables") as name:
        yield name


@pytest.fixture(scope="module")
def prom(request: pytest.FixtureRequest) -> Iterator[Prometheus]:
    """A real Prometheus in node1's namespace, scraping the bookstore cluster every second
    with prometheus-meshlab.yaml; killed and its files removed whatever happens."""
    name: str = request.getfixturevalue("books")
    state = status(name)
    node1 = next(n for n in state["nodes"] if n["name"] == "node1")
    with tempfile.TemporaryDirectory(prefix="obs-prometheus-") as tmp:
        work = Path(tmp)
        # As the example says: the targets from the cluster's state, beside the config.
        done = subprocess.run(
            [sys.executable, str(OBS / "meshlab_targets.py"), str(work / "targets")],
            input=json.dumps(state),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load((OBS / "prometheus-meshlab.yaml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")
        (work / "prometheus.yaml").write_text(yaml.safe_dump(config))
        port = netns_http.free_port(node1["netns"])
        log = work / "prometheus.log"
        with log.open("wb") as out:
            # meshlab exec ends in exec: this process is Prometheus itself.
            proc = subprocess.Popen(
                [
                    MESHLAB, "exec", "--name", name, "node/node1", "--", str(PROMETHEUS),
                    f"--config.file={work / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            p = Prometheus(name, node1["netns"], port, state, log)
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (
                    f"prometheus exited {proc.returncode}: {log.read_text()}"
                )
                with contextlib.suppress(OSError):
                    if netns_http.get(p.netns, port, "/-/ready", timeout=2)[0] == 200:
                        break
                assert time.monotonic() < deadline, f"prometheus not ready: {log.read_text()}"
                time.sleep(0.2)
            yield p
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def expected_targets(state: dict[str, Any]) -> dict[str, set[str]]:
    return {
        "ztunnel": {f"http://{n['ip']}:{METRICS_PORT}/stats/prometheus" for n in state["nodes"]},
        "waypoint": {
            f"http://{p['ip']}:{METRICS_PORT}/stats/prometheus"
            for p in state["pods"]
            if "gateway.networking.k8s.io/gateway-name" in p["labels"]
        },
    }


def active_targets(prom: Prometheus) -> list[dict[str, Any]]:
    return list(prom.api("targets", {"state": "active"})["data"]["activeTargets"])


def test_prometheus_scrapes_every_ztunnel_and_the_waypoint(prom: Prometheus) -> None:
    want = expected_targets(prom.state)
    assert want["waypoint"], prom.state["pods"]

    def all_up() -> list[dict[str, Any]]:
        targets = active_targets(prom)
        seen = {
            job: {t["scrapeUrl"] for t in targets if t["scrapePool"] == job and t["health"] == "up"}
            for job in want
        }
        assert seen == want, [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        return targets

    targets = eventually(all_up, 20)
    nodes = {n["ip"]: n["name"] for n in prom.state["nodes"]}
    for t in targets:
        labels = t["labels"]
        if t["scrapePool"] == "ztunnel":
            ip = labels["instance"].split(":")[0]
            assert (labels["app"], labels["node"]) == ("ztunnel", nodes[ip]), labels
        else:
            assert (labels["namespace"], labels["pod"]) == ("shop", "waypoint"), labels
            assert labels["gateway_networking_k8s_io_gateway_name"] == "waypoint", labels


def test_the_kubernetes_relabelings_keep_the_metrics_ports_with_the_same_labels(
    prom: Prometheus, tmp_path: Path
) -> None:
    """prometheus.yaml's relabelings, on what pod discovery would find for this cluster
    (``promtool check service-discovery`` applies them): exactly the ztunnels' and the
    waypoint's :15020, each with at least the target labels the meshlab config gives."""
    (tmp_path / "pods.json").write_text(json.dumps(k8s_pod_targets(prom.state)))
    config = with_stand_in_discovery(
        yaml.safe_load((OBS / "prometheus.yaml").read_text()), "pods.json"
    )
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    meshlab_labels = {
        t["scrapeUrl"]: {k: v for k, v in t["labels"].items() if k not in ("job", "instance")}
        for t in active_targets(prom)
    }
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"ztunnel", "waypoint"}
    runs = {
        job: subprocess.Popen(
            [str(PROMTOOL), "check", "service-discovery", "--timeout=1s", "prometheus.yaml", job],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in sorted(jobs)
    }
    want = expected_targets(prom.state)
    for job, run in runs.items():
        stdout, stderr = run.communicate(timeout=30)
        assert run.returncode == 0, stderr
        kept = [t["labels"] for t in json.loads(stdout) if t["labels"]]
        urls = {f"http://{t['__address__']}{t['__metrics_path__']}" for t in kept}
        assert urls == want[job] and len(kept) == len(urls), (job, kept)
        for labels in kept:
            url = f"http://{labels['__address__']}{labels['__metrics_path__']}"
            assert {"namespace", "pod", "node"} <= labels.keys(), labels
            missing = {k: v for k, v in meshlab_labels[url].items() if labels.get(k) != v}
            assert not missing, (job, labels, missing)


# -- the dashboard ---------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in ("namespace", "service"):
        assert variables[var]["type"] == "query" and "label_values(" in variables[var]["definition"]
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"] == ds and p["targets"], p["title"]
        assert all(t["datasource"] == ds and t["expr"] for t in p["targets"]), p["title"]
    assert {p["title"] for p in panels} >= NO_DATA_HERE


@pytest.fixture(scope="module")
def traffic(prom: Prometheus) -> Prometheus:
    """Through the waypoint while Prometheus scrapes: served, denied by
    examples/waypoint-policy.yaml, an attempt to bypass the waypoint (ztunnel refuses
    it), and over examples/waypoint-ratelimit.yaml's limit; then until Prometheus has
    scraped the last of it."""
    name = prom.cluster
    eventually(lambda: sum(1 for t in active_targets(prom) if t["health"] == "up") >= 3, 20)
    served = count(name, 20)
    assert served.keys() <= {"v1", "v2"} and "v1" in served, served
    meshlab("apply", "--name", name, "-f", str(EXAMPLES / "waypoint-policy.yaml"))
    eventually(lambda: count(name, 5, url=REVIEWS + "admin/users") == {"403": 5})
    reviews_pod = next(p["ip"] for p in prom.state["pods"] if p["name"] == "reviews-v1-1")
    bypass = count(name, 2, url=f"http://{reviews_pod}:8080/")
    assert "v1" not in bypass, bypass
    meshlab("apply", "--name", name, "-f", str(EXAMPLES / "waypoint-ratelimit.yaml"))
    eventually(lambda: "429" in count(name, 15), 60)
    # Two scrapes of the last counters, so every rate over the window has them.
    eventually(
        lambda: prom.query('count_over_time(istio_requests_total{response_code="429"}[1m]) >= 2')[
            "data"
        ]["result"],
        20,
    )
    time.sleep(1.5)
    return prom


def test_the_dashboard_variables_list_the_mesh(traffic: Prometheus) -> None:
    """What Grafana's label_values() asks: /api/v1/label/NAME/values?match[]=SELECTOR."""
    namespaces = traffic.api(
        "label/destination_service_namespace/values", {"match[]": "istio_requests_total"}
    )["data"]
    assert "shop" in namespaces, namespaces
    services = traffic.api(
        "label/destination_service/values",
        {"match[]": 'istio_requests_total{destination_service_namespace=~"shop"}'},
    )["data"]
    assert VARIABLES["$service"] in services, services


QUERIES = queries()


@pytest.mark.parametrize(
    ("title", "ref", "expr"), QUERIES, ids=[f"{title} {ref}" for title, ref, _ in QUERIES]
)
def test_every_dashboard_query_returns_data(
    traffic: Prometheus, title: str, ref: str, expr: str
) -> None:
    answer = traffic.query(expr)
    assert answer["status"] == "success", (title, ref, expr, answer)
    if title in NO_DATA_HERE:
        return
    series = answer["data"]["result"]
    assert series, f"{title} ({ref}): no series for {expr}"
    values = [float(s["value"][1]) for s in series]
    assert any(not math.isnan(v) for v in values), (title, ref, expr, series)


def test_prometheus_logged_no_errors(traffic: Prometheus) -> None:
    errors = [line for line in traffic.log.read_text().splitlines() if "level=error" in line]
    assert not errors, errors


def _value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_promql_answers_what_was_sent(traffic: Prometheus) -> None:
    """Request count per destination service, error ratio and p99, as PromQL answers them,
    against exactly what this test sends: 7 requests the policy denies (403), after the
    rate limit's bucket is full again (so none is a 429)."""
    denied = (
        'sum(istio_requests_total{reporter="waypoint",response_code="403",'
        'destination_service="reviews.shop.svc.cluster.local"})'
    )
    time.sleep(5.5)  # the bucket of examples/waypoint-ratelimit.yaml: full again
    before = _value(traffic, denied)
    assert count(traffic.cluster, 7, url=REVIEWS + "admin/users") == {"403": 7}
    eventually(lambda: _value(traffic, denied) - before == 7, 20)
    errors = (
        'sum(rate(istio_requests_total{reporter="waypoint",response_code=~"5.."}[1m])) '
        '/ sum(rate(istio_requests_total{reporter="waypoint"}[1m]))'
    )
    assert _value(traffic, f"({errors}) or vector(0)") == 0.0  # nothing here failed
    p99 = _value(
        traffic,
        "histogram_quantile(0.99, sum by (le) "
        '(rate(istio_request_duration_milliseconds_bucket{reporter="waypoint"}[1m])))',
    )
    assert 0 < p99 <= 1000, p99  # within Istio's buckets, under a second on loopback hops
