"""``ztunnel-node-agent``: capture this node's mesh pods and hand them to ztunnel.

    ztunnel-node-agent --source meshlab:NAME --run-dir /var/run/ztunnel

The run directory holds the plugin socket (``plugin.sock``), the ZDS socket
(``zds.sock``), the CNI plugin's pod records (``pods/``) and the ambient
namespaces hint; the ``ztunnel-cni`` plugin's ``runDir`` names it.
``--readiness-address`` (istio-cni's ``:8000`` by default) serves ``/readyz``
and ``/healthz``. SIGTERM stops the agent and leaves capture in place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from ztunnel.capture.backend import BACKENDS, DEFAULT_BPF_DIR, choose
from ztunnel.nodeagent.discover import ProcFinder
from ztunnel.nodeagent.health import DEFAULT_ADDRESS, HealthServer
from ztunnel.nodeagent.install import CniInstaller
from ztunnel.nodeagent.service import NodeAgent, ViewSource
from ztunnel.nodeagent.view import MeshlabView

log = logging.getLogger("ztunnel.nodeagent")
UNINSTALL = ("never", "on-exit", "when-removed")
DAEMONSET = "ztunnel-node-agent"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ztunnel-node-agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        help="meshlab:NAME, or kubernetes (with --node; in-cluster unless --kubeconfig)",
    )
    p.add_argument(
        "--node",
        help="this node's name (default $NODE_NAME; needed with kubernetes): with it, the "
        "node's mesh pods that ztunnel-cni never saw are found and enrolled too",
    )
    p.add_argument(
        "--host-proc",
        type=Path,
        help="the node's /proc, as mounted: where pods' network namespaces are found by "
        "their processes (kubernetes)",
    )
    p.add_argument("--kubeconfig", help="with --source kubernetes, instead of in-cluster")
    p.add_argument(
        "--pod-namespace",
        default=os.environ.get("POD_NAMESPACE") or "istio-system",
        help="the agent's own namespace (default $POD_NAMESPACE, else istio-system)",
    )
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument(
        "--dns-capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="redirect the pods' DNS to ztunnel's proxy on 15053",
    )
    p.add_argument(
        "--capture",
        choices=BACKENDS,
        default=os.environ.get("CAPTURE_BACKEND") or "iptables",
        help="how pods' traffic is sent to ztunnel: Istio's in-pod iptables rules, or eBPF "
        "programs on each pod's cgroup and interfaces (a node that cannot run them is "
        "refused with the reason and stays on iptables)",
    )
    p.add_argument(
        "--bpf-dir",
        type=Path,
        default=DEFAULT_BPF_DIR,
        help="with --capture ebpf: where the node's programs and maps are pinned (bpffs; "
        "ztunnel's --bpf-dir)",
    )
    p.add_argument(
        "--cgroup-root",
        type=Path,
        help="with --capture ebpf: the cgroup v2 tree the pods' cgroups are found in "
        "(default: where cgroup2 is mounted)",
    )
    p.add_argument("--poll-seconds", type=float, default=0.5)
    p.add_argument(
        "--readiness-address",
        type=_listen,
        default="{}:{}".format(*DEFAULT_ADDRESS),
        help="HOST:PORT of /readyz and /healthz, or 'off' (default %(default)s, istio-cni's)",
    )
    cni = p.add_argument_group(
        "CNI installation",
        "With --cni-conf-dir the agent installs ztunnel-cni on the node, as istio-cni does: "
        "the binary into --cni-bin-dir, its entry appended to the primary network "
        "configuration, put back whenever the primary CNI rewrites it.",
    )
    cni.add_argument("--cni-conf-dir", type=Path, help="the node's CNI conf dir, as mounted")
    cni.add_argument("--cni-bin-dir", type=Path, help="the node's CNI bin dir, as mounted")
    cni.add_argument(
        "--cni-plugin",
        type=Path,
        default=Path(sys.executable).parent / "ztunnel-cni",
        help="the plugin binary to install (default: ztunnel-cni beside this program)",
    )
    cni.add_argument(
        "--cni-exclude-namespaces",
        default="",
        help="comma-separated namespaces whose pods start while the agent is away "
        "(default: this agent's own, --pod-namespace, and kube-system)",
    )
    cni.add_argument(
        "--cni-uninstall",
        choices=UNINSTALL,
        default="never",
        help="when to remove the entry and the binary on SIGTERM: never (they stay, so pods "
        "started while the agent is away fail closed), on-exit, or when-removed: only when "
        "--daemonset is gone or being deleted, as istio-cni (kubernetes; default %(default)s)",
    )
    cni.add_argument(
        "--daemonset",
        default=DAEMONSET,
        help="the agent's own DaemonSet, in --pod-namespace (default %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _listen(text: str) -> tuple[str, int] | None:
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or 'off'")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_source(args: argparse.Namespace) -> ViewSource:
    kind, _, value = args.source.partition(":")
    if kind == "meshlab" and value:
        return MeshlabView(value)
    if kind == "kubernetes":
        node = args.node or os.environ.get("NODE_NAME")
        if not node:
            raise SystemExit("ztunnel-node-agent: --source kubernetes needs --node (or NODE_NAME)")
        from ztunnel.nodeagent.kube import KubernetesView, api_client

        view = KubernetesView(node, api_client(args.kubeconfig))
        view.start()
        return view
    raise SystemExit(
        f"ztunnel-node-agent: unknown --source {args.source!r} (meshlab:NAME or kubernetes)"
    )


def make_installer(args: argparse.Namespace) -> CniInstaller | None:
    if args.cni_conf_dir is None:
        return None
    if args.cni_uninstall == "when-removed" and args.source != "kubernetes":
        raise SystemExit(
            "ztunnel-node-agent: --cni-uninstall when-removed needs --source kubernetes "
            "(it asks the API server for --daemonset)"
        )
    if args.cni_bin_dir is None:
        raise SystemExit("ztunnel-node-agent: --cni-conf-dir needs --cni-bin-dir")
    exclude = [n for n in args.cni_exclude_namespaces.split(",") if n] or [
        args.pod_namespace,
        "kube-system",
    ]
    # The run dir is mounted at the same path on the host, where the plugin runs.
    entry = {"runDir": str(args.run_dir), "excludeNamespaces": exclude}
    return CniInstaller(
        bin_dir=args.cni_bin_dir, conf_dir=args.cni_conf_dir, plugin=args.cni_plugin, entry=entry
    )


def should_uninstall(args: argparse.Namespace, source: ViewSource) -> bool:
    """Whether this exit removes ztunnel-cni from the node (``--cni-uninstall``)."""
    if args.cni_uninstall == "on-exit":
        return True
    if args.cni_uninstall == "never":
        return False
    removed = getattr(source, "daemonset_removed", None)
    if removed is None:  # refused at start; kept here for any other source
        return False
    gone, why = removed(args.pod_namespace, args.daemonset)
    log.info("node agent: %s: %s ztunnel-cni", why, "removing" if gone else "keeping")
    return bool(gone)


async def run(args: argparse.Namespace) -> int:
    installer = make_installer(args)
    node = args.node or os.environ.get("NODE_NAME") or None
    agent = NodeAgent(
        node=node,
        finder=None if args.host_proc is None else ProcFinder(args.host_proc),
        run_dir=args.run_dir,
        source=make_source(args),
        dns_capture=args.dns_capture,
        poll_s=args.poll_seconds,
        installer=installer,
        capture=await asyncio.to_thread(
            choose,
            args.capture,
            dns=args.dns_capture,
            bpf_dir=args.bpf_dir,
            cgroup_root=args.cgroup_root,
        ),
    )
    health = HealthServer(agent.ready)
    if args.readiness_address is not None:
        try:
            await health.start(*args.readiness_address)  # 503 until the agent is ready
        except OSError as e:
            await agent.close()
            host, port = args.readiness_address
            raise SystemExit(
                f"ztunnel-node-agent: cannot listen on {host}:{port} for /readyz: {e.strerror} "
                "(another process on the port? --readiness-address moves it, 'off' drops it)"
            ) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(agent.run())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return 1
        return 0
    finally:
        stopper.cancel()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await health.close()
        if installer is not None and await asyncio.to_thread(should_uninstall, args, agent.source):
            installer.uninstall()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
