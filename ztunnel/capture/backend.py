"""The capture backends behind one interface, and the node's choice between them.

``iptables`` (the default, Istio's in-pod rules: :mod:`ztunnel.capture.inpod`)
or ``ebpf`` (:mod:`ztunnel.capture.ebpf`). A node asked for eBPF that lacks
what it needs (no cgroup v2, no bpffs, no libbpf, programs the kernel
refuses) is refused with the reason and stays on iptables: never a
half-captured pod. Either backend takes out the other's capture of a pod
before installing its own, so a node that switches never double-redirects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ebpf import capture as bpf
from ztunnel.capture import inpod
from ztunnel.capture.ebpf import EbpfCapture

log = logging.getLogger("ztunnel.capture")
BACKENDS = ("iptables", "ebpf")
DEFAULT_BPF_DIR = Path("/sys/fs/bpf/ztunnel")


class Capture(Protocol):
    name: str

    def install(self, netns: Path, pod_uid: str) -> None: ...

    def uninstall(self, netns: Path, pod_uid: str) -> None: ...

    def installed(self, netns: Path, pod_uid: str) -> bool: ...


class IptablesCapture:
    """Istio's in-pod iptables rules; an eBPF capture of the pod found is removed first."""

    name = "iptables"

    def __init__(self, *, dns: bool = True, ebpf: EbpfCapture | None = None) -> None:
        self.dns = dns
        self.ebpf = ebpf  # the node's eBPF pins, when it has some: for switching pods over

    def _drop_ebpf(self, netns: Path, pod_uid: str) -> None:
        if self.ebpf is not None and self.ebpf.holds(netns):
            log.info("capture: %s had eBPF capture: replacing it with iptables", netns)
            self.ebpf.uninstall(netns, pod_uid)

    def install(self, netns: Path, pod_uid: str) -> None:
        self._drop_ebpf(netns, pod_uid)
        inpod.install(netns, dns=self.dns)

    def uninstall(self, netns: Path, pod_uid: str) -> None:
        inpod.uninstall(netns)
        self._drop_ebpf(netns, pod_uid)

    def installed(self, netns: Path, pod_uid: str) -> bool:
        return inpod.installed_tables(netns) == ["mangle", "nat"]


@dataclass(frozen=True, slots=True)
class Choice:
    backend: Capture
    requested: str
    refused: str = ""  # why the requested backend is not the one in use


def choose(
    requested: str, *, dns: bool, bpf_dir: Path = DEFAULT_BPF_DIR, cgroup_root: Path | None = None
) -> Choice:
    """The node's backend: ``requested`` when the node can run it, else iptables."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown capture backend {requested!r} (one of {', '.join(BACKENDS)})")
    if requested == "iptables":
        leftover = None
        if (bpf_dir / "zt_pods").exists():
            root = cgroup_root or bpf.cgroup2_mount()
            if root is not None:
                leftover = EbpfCapture(bpf_dir, root, dns=dns)
        return Choice(IptablesCapture(dns=dns, ebpf=leftover), requested)
    bpf.ensure_bpffs(bpf_dir.parent)
    lacking = bpf.requirements(bpf_dir.parent)
    root = cgroup_root or bpf.cgroup2_mount()
    if not lacking and root is not None:
        ebpf = EbpfCapture(bpf_dir, root, dns=dns)
        try:
            ebpf.prepare()
        except inpod.CaptureError as e:
            lacking.append(str(e))
        else:
            return Choice(ebpf, requested)
    why = "; ".join(lacking) or "no cgroup v2 hierarchy"
    log.error("capture: eBPF refused on this node, staying on iptables: this node lacks %s", why)
    return Choice(IptablesCapture(dns=dns), requested, f"this node lacks {why}")
