"""meshd at scale: 10,000 workloads, 1,000 services, 1,000 policies, 50 subscribers.

    python -m bench.meshd_bench [--pods 10000] [--services 1000] [--policies 1000]
                                [--subscribers 50] [--trials 30] [--json out.json]
                                [--record RESULTS.md]

meshd runs as its own process with ``--source kubernetes`` against the local
API server of the tests (``tests/support/fake_kube/``: the real list and
watch wire format, kind-shaped objects), so every change travels the whole
way: a watch event, the source, translation, the snapshot cache, Delta ADS
to every subscriber. The subscribers are our xDS client, in this process.

Figures:
* time until every subscriber holds the full state (meshd already ready);
  the subscribers hold names and versions and ACK at once (see
  :class:`Subscriber`), so the figure is meshd's, not theirs;
* p50/p99 time from one pod added at the API server until every subscriber
  has it (one trial per pod);
* meshd's time to its first state, peak RSS and CPU-seconds over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench.envoy import free_port
from bench.hbone_bench import cpu_seconds, peak_rss_mb
from mesh.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from tests.support import fake_kube
from tests.support.fake_kube import FakeKube

TARGETS = {
    "full_state_s": ("<", 5.0),
    "incremental_p99_ms": ("<", 100.0),
    "peak_rss_mb": ("<", 500.0),
}


def populate(kube: FakeKube, pods: int, services: int, policies: int, namespaces: int) -> None:
    for n in range(namespaces):
        kube.add(
            "namespaces", fake_kube.namespace(f"ns{n}", {"istio.io/dataplane-mode": "ambient"})
        )
    for i in range(pods):
        kube.add(
            "pods",
            fake_kube.pod(
                f"p{i}",
                f"ns{i % namespaces}",
                ip=_ip(i),
                node=f"kind-worker{i % 20}",
                service_account=f"sa{i % 100}",
                labels={"app": f"app{i % services}"},
            ),
        )
    for j in range(services):
        kube.add(
            "services",
            fake_kube.service(
                f"s{j}",
                f"ns{j % namespaces}",
                cluster_ip=f"10.96.{j // 250}.{j % 250 + 1}",
                ports=[(80, 8080)],
                selector={"app": f"app{j}"},
            ),
        )
    for k in range(policies):
        kube.add(
            "authorizationpolicies",
            fake_kube.authorization_policy(
                f"pol{k}",
                f"ns{k % namespaces}",
                {
                    "selector": {"matchLabels": {"app": f"app{k % services}"}},
                    "rules": [
                        {"from": [{"source": {"principals": [f"cluster.local/ns/x/sa/y{k}"]}}]}
                    ],
                },
            ),
        )


class Subscriber:
    """A minimal Delta ADS subscriber: holds names and versions, ACKs at once.

    The proxies' full client converts every resource into model values; fifty
    of them in one Python process would measure this process, not meshd. A
    ztunnel per node does that work on its own CPU.
    """

    def __init__(self, target: str, node: str, on_names: Any) -> None:
        self.target = target
        self.node = node
        self.on_names = on_names
        self.held: dict[str, dict[str, str]] = {ADDRESS_TYPE_URL: {}, AUTHORIZATION_TYPE_URL: {}}

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()
            for type_url in self.held:
                queue.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        node=base_pb2.Node(id=self.node),
                        type_url=type_url,
                        resource_names_subscribe=["*"],
                    )
                )

            async def requests() -> Any:
                while True:
                    yield await queue.get()

            async for response in stub.DeltaAggregatedResources(requests()):
                held = self.held[response.type_url]
                for resource in response.resources:
                    held[resource.name] = resource.version
                for name in response.removed_resources:
                    held.pop(name, None)
                queue.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=response.type_url, response_nonce=response.nonce
                    )
                )
                self.on_names(self, [r.name for r in response.resources])

    def count(self) -> tuple[int, int]:
        return len(self.held[ADDRESS_TYPE_URL]), len(self.held[AUTHORIZATION_TYPE_URL])


def _ip(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"


async def wait_ready(status_port: int, timeout_s: float) -> float:
    started = time.perf_counter()
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if await asyncio.to_thread(_ready, status_port):
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"meshd not ready after {timeout_s}s")


async def measure(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    kube = FakeKube().start()
    process = None
    tasks: list[asyncio.Task[None]] = []
    try:
        log(
            f"populating the API server: {args.pods} pods, {args.services} services, "
            f"{args.policies} policies"
        )
        populate(kube, args.pods, args.services, args.policies, args.namespaces)
        kubeconfig = kube.write_kubeconfig(work / "kubeconfig")
        port, status = free_port(), free_port()
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane.meshd",
            "--source",
            "kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-listen",
            "off",
            "--status-listen",
            f"127.0.0.1:{status}",
            "--log-level",
            "warning",
        )
        await wait_ready(status, 120)
        first_state_s = time.perf_counter() - started
        log(f"meshd ready (first state) after {first_state_s:.2f} s")
        cpu0 = cpu_seconds(process.pid)

        expected = args.pods + args.services
        pending: dict[str, set[int]] = {}
        arrivals: dict[str, float] = {}
        subscribers: list[Subscriber] = []

        def seen(subscriber: Subscriber, names: list[str]) -> None:
            index = subscribers.index(subscriber)
            for name in names:
                waiting = pending.get(name)
                if waiting is not None and index in waiting:
                    waiting.discard(index)
                    if not waiting:
                        arrivals[name] = time.perf_counter()

        t0 = time.perf_counter()
        for i in range(args.subscribers):
            subscriber = Subscriber(f"127.0.0.1:{port}", f"ztunnel~node{i}", seen)
            subscribers.append(subscriber)
            tasks.append(asyncio.ensure_future(subscriber.run()))

        def all_full() -> bool:
            return all(s.count() >= (expected, args.policies) for s in subscribers)

        while not all_full():
            await asyncio.sleep(0.01)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("subscribers did not get the full state in 120 s")
        full_state_s = time.perf_counter() - t0
        # The 50 subscribers stand in for 50 nodes; this harness's own collector
        # pausing over their 550,000 held names is not meshd's latency.
        gc.freeze()
        log(f"{args.subscribers} subscribers hold the full state after {full_state_s:.2f} s")

        latencies = []
        for trial in range(args.trials):
            name = f"new{trial}"
            uid = f"Kubernetes//Pod/ns0/{name}"
            pending[uid] = set(range(args.subscribers))
            added = time.perf_counter()
            kube.add(
                "pods",
                fake_kube.pod(
                    name,
                    "ns0",
                    ip=_ip(args.pods + trial),
                    node="kind-worker0",
                    labels={"app": "app0"},
                ),
            )
            while uid not in arrivals:
                await asyncio.sleep(0.001)
                if time.perf_counter() - added > 30:
                    raise RuntimeError(f"pod {name} did not reach every subscriber in 30 s")
            latencies.append((arrivals[uid] - added) * 1000)
            await asyncio.sleep(0.05)
        cpu = cpu_seconds(process.pid) - cpu0
        rss = peak_rss_mb(process.pid)
        latencies.sort()
        log("incremental (ms): " + " ".join(f"{x:.0f}" for x in latencies))
        return {
            "pods": args.pods,
            "services": args.services,
            "policies": args.policies,
            "subscribers": args.subscribers,
            "trials": args.trials,
            "first_state_s": first_state_s,
            "full_state_s": full_state_s,
            "incremental_p50_ms": statistics.median(latencies),
            "incremental_p99_ms": latencies[
                min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))
            ],
            "peak_rss_mb": rss,
            "cpu_s": cpu,
        }
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()
        kube.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def table(result: dict[str, Any]) -> str:
    rows = ["| figure | meshd | target |", "| --- | ---: | --- |"]
    for key, label in (
        ("first_state_s", "meshd's first state (list of everything), s"),
        ("full_state_s", f"full state to {result['subscribers']} subscribers, s"),
        ("incremental_p50_ms", "one pod added -> every subscriber, p50 ms"),
        ("incremental_p99_ms", "one pod added -> every subscriber, p99 ms"),
        ("peak_rss_mb", "meshd peak RSS, MB"),
        ("cpu_s", "meshd CPU-seconds over the run"),
    ):
        target = ""
        if key in TARGETS:
            op, bound = TARGETS[key]
            ok = result[key] < bound
            target = f"{'pass' if ok else 'MISS'} ({op} {bound:g})"
        rows.append(f"| {label} | {result[key]:.2f} | {target} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.meshd_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = asyncio.run(measure(args, log))
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["cores"] = os.cpu_count()
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        from bench.hbone_bench import machine

        m = machine()
        text = args.record.read_text() if args.record.exists() else "# Benchmark results\n"
        section = (
            f"\n\n## meshd, {result['date']}\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python "
            f"{m['python']}. {result['pods']} pods, {result['services']} services, "
            f"{result['policies']} policies, {result['subscribers']} subscribers (our xDS "
            f"client, one process), meshd `--source kubernetes` against the tests' local API "
            f"server; {result['trials']} single-pod trials. `make bench` "
            f"(`python -m bench.meshd_bench`).\n\n{table(result)}\n"
        )
        args.record.write_text(text.rstrip() + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
