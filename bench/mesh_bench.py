"""Pod to pod across two meshlab nodes: no mesh, our ztunnels (iptables or eBPF capture),
an Envoy HBONE pair.

    python -m bench.mesh_bench [--seconds 8] [--rounds 3] [--json out.json]
                               [--record RESULTS.md] [--logs DIR] [--default-cipher]

Needs root, the CNI plugins meshlab uses, iperf3, wrk, nginx-light and
Envoy (`make bench` installs them). The defaults take about 5 to 6 minutes (a
third more than with three placements: each round has four).

A 2-node meshlab cluster with the mesh (meshd, and on each node the node
agent and ztunnel); a client pod on node1 and a server pod on node2, each in
a namespace of its own, running ``sleep infinity``. In the server pod's
network namespace and cgroup this tool starts iperf3 (port 5201) and nginx
(8080); the clients (iperf3, wrk, curl) run in the client pod's (every process
the tool starts in a pod joins the pod's cgroup first, as a container's would:
the eBPF capture only acts on those). The same two pods are measured in four
placements, one after the other in every round:

* ``floor``: the namespaces are not ambient: plain pod-to-pod across the
  underlay, nothing in between;
* ``ours``: both namespaces labelled ``istio.io/dataplane-mode=ambient``: the
  node agents capture the pods (in-pod iptables), the client node's ztunnel
  carries each connection over HBONE to the server node's ztunnel;
* ``ebpf``: the same ztunnels, the node agents running ``--capture ebpf``:
  no iptables rule in the pods; cgroup connect4/sockops programs on each
  pod's cgroup send its outbound connections to ztunnel's 15001 in the pod,
  a tc ingress filter (``zt_ingress``, bpf_sk_assign) on its eth0 hands
  inbound to ztunnel's 15006/15008. Switching between ``ours`` and ``ebpf``
  restarts both node agents with the other backend (the node's ``capture``
  in the cluster state changed too) while no pod is enrolled: every change
  of placement releases the pods first, as for the floor;
* ``envoy``: the namespaces not ambient again; instead an iptables REDIRECT
  in the client pod sends its outbound TCP (except Envoy's own, marked
  ``0x539``) to an Envoy in the client pod (``original_dst`` listener,
  ``tcp_proxy`` with ``tunneling_config``: CONNECT over mTLS HTTP/2 to the
  destination pod's IP:15008), and an Envoy in the server pod terminates
  CONNECT on 15008 and connects to the app. Both Envoys ``--concurrency 1``
  (ours is one process per node), configs from :mod:`bench.envoy` (TLS 1.3,
  X25519, the same HTTP/2 windows as ours).

Before each placement is measured, the tool checks that the traffic takes
the intended path: capture rules (the pods' iptables chains, the tc filter)
and listeners present or absent, the node agents on the intended backend
(an agent that refused eBPF stops the run with its reason), and a request
that succeeds with an established connection to the server pod's 15008 held
by the right process (the client node's ztunnel, or the client Envoy).
ztunnel negotiates OpenSSL's default TLS 1.3 suite (TLS_AES_256_GCM_SHA384)
where Envoy's BoringSSL picks TLS_AES_128_GCM_SHA256; so the ciphers match,
as in ``bench.hbone_bench``, each node's ztunnel is restarted once, before
any pod is enrolled, with an OpenSSL config pinning TLS_AES_128_GCM_SHA256 /
X25519 (``--default-cipher`` keeps them as meshlab
started them); like meshlab's, the restarted ztunnels see the host's /sys/fs
(the eBPF maps).

Figures, each the median over ``--rounds`` rounds of the four placements
in turn (floor, ours, ebpf, envoy; the order turning each round), each
placement warmed up by one second of new connections first:

* iperf3 throughput, one stream, client pod -> server pod, ``--seconds``;
* wrk keep-alive (1 thread, 50 connections) requests/s, p50 and p99 latency
  to nginx;
* wrk with ``Connection: close``: new connections per second;
* added p99 latency: a placement's keep-alive p99 minus the floor's;
* CPU of both proxies (both ztunnels, or both Envoys, all threads) per new
  connection during the ``Connection: close`` run (a target since issue 14);
* without a target, to read the others by: their CPU-seconds per GB during
  iperf3, and the TIME_WAITs the ``Connection: close`` run left in the client
  pod per connection (the ones wrk closed first because the answer's FIN came
  after it had read the answer; each holds one of the pod's ephemeral ports
  toward the server for 60 s, and once they are all held the client's
  connects crawl).

Both backends of ours are reported against Envoy (``ratios``: iptables/envoy,
``ratios_ebpf``: eBPF/envoy, each judged against the same targets) and
against each other (``ebpf_vs_iptables``, no target).

The logs of the cluster (meshd, node agents, ztunnels) and of the Envoys are
kept (``--logs``) and ztunnel's, the node agents' and meshd's warnings and
errors are counted at the end. Expected there: one refused handshake in the
server node's ztunnel (the cipher probe above) and, with the cipher pinned,
one "proxy disconnected" per node agent (each backend switch starts the node
agents again: their logs go on in the same files).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from bench.envoy import envoy_binary
from bench.hbone_bench import machine
from bench.mesh.measure import measure
from bench.mesh.report import describe, record, table
from bench.mesh.shell import venv_bin


def _missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool, package in (
        ("iperf3", "iperf3"),
        ("wrk", "wrk"),
        ("nginx", "nginx-light"),
        ("curl", "curl"),
        ("ss", "iproute2"),
        ("iptables-restore", "iptables"),
        ("openssl", "openssl"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package}; `make bench` installs it)"
    if envoy_binary() is None:
        return "envoy is missing (`make envoy`)"
    if not Path(venv_bin("meshlab")).is_file():
        return f"{venv_bin('meshlab')} is missing (`make deps`)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mesh_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8, help="each load (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--record", type=Path, help="append the table to this markdown file")
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep each run's cluster and Envoy logs in DIR/<cluster> (default: a new "
        "directory in /tmp)",
    )
    parser.add_argument(
        "--default-cipher",
        action="store_true",
        help="leave ztunnel's TLS suite to OpenSSL (TLS_AES_256_GCM_SHA384) instead of "
        "pinning the one Envoy picks",
    )
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    missing = _missing_tools()
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 1

    def log(line: str) -> None:
        if line:
            print(line, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so the cluster still goes down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    result = measure(
        args.seconds, args.rounds, log, pin_cipher=not args.default_cipher, logs=args.logs
    )
    result["machine"] = machine()
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["wall_s"] = time.monotonic() - started
    print("\n".join(describe(result)))
    print()
    print(table(result))
    for name, found in result["mesh_logs"].items():
        total = sum(found["messages"].values())
        if total or found["tracebacks"]:
            log(f"{name}: {total} warnings/errors, {found['tracebacks']} tracebacks")
            for message, count in sorted(found["messages"].items(), key=lambda kv: -kv[1])[:8]:
                log(f"  {count:6} x {message[:200]}")
    log(f"logs kept in {result['logs']}; whole run {result['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        record(args.record, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
