"""Which capture backend a node runs, and how the eBPF one finds a pod's cgroup.

The cgroup trees are plain directories laid out as kubelet's two drivers lay
them out; the backend choice is checked with the node's requirements faked
(the real programs are exercised in tests/integration/test_ebpf_capture.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ebpf import capture as bpf
from ztunnel.capture import backend
from ztunnel.capture.backend import IptablesCapture, choose
from ztunnel.capture.cgroups import CgroupNotFound, find_by_id, find_pod_cgroup

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def test_a_pods_cgroup_is_found_by_its_uid_with_either_kubelet_driver(tmp_path: Path) -> None:
    systemd = (
        tmp_path
        / "systemd"
        / "kubepods.slice"
        / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    )
    cgroupfs = tmp_path / "cgroupfs" / "kubepods" / "besteffort" / f"pod{UID}"
    for path in (systemd, cgroupfs, systemd / "cri-containerd-abc.scope"):
        path.mkdir(parents=True)
    (tmp_path / "cgroupfs" / "kubepods" / "besteffort" / "podother").mkdir()
    assert find_pod_cgroup(tmp_path / "systemd", UID) == systemd
    assert find_pod_cgroup(tmp_path / "cgroupfs", UID) == cgroupfs
    assert find_by_id(tmp_path, cgroupfs.stat().st_ino) == cgroupfs
    assert find_by_id(tmp_path, 1) is None


def test_no_cgroup_for_the_pod_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "kubepods").mkdir()
    with pytest.raises(CgroupNotFound, match=f"looked for a directory naming pod{UID}"):
        find_pod_cgroup(tmp_path, UID)
    with pytest.raises(CgroupNotFound, match="no K8S_POD_UID"):
        find_pod_cgroup(tmp_path, "")


def test_without_a_uid_the_cgroup_of_a_process_in_the_netns_is_taken() -> None:
    """A process in a netns of its own, in a cgroup of its own: a pod's sandbox."""
    mount = bpf.cgroup2_mount()
    if os.geteuid() != 0 or mount is None or shutil.which("unshare") is None:
        pytest.skip("needs root, a cgroup v2 mount and unshare (util-linux)")
    root = mount / f"t{secrets.token_hex(3)}"
    pod = root / "sandbox"
    pod.mkdir(parents=True)
    sandbox = subprocess.Popen(
        ["sh", "-c", f'echo $$ > "{pod}/cgroup.procs" && exec unshare --net sleep 30']
    )
    try:
        netns = Path(f"/proc/{sandbox.pid}/ns/net")
        deadline = time.monotonic() + 5
        while netns.readlink() == Path("/proc/self/ns/net").readlink():
            assert time.monotonic() < deadline, "the sandbox never got its netns"
            time.sleep(0.02)
        assert find_pod_cgroup(root, "", netns=netns) == pod
        with pytest.raises(CgroupNotFound, match="no process in"):
            find_pod_cgroup(root, "", netns=Path("/proc/self/ns/net"))
    finally:
        sandbox.kill()
        sandbox.wait()
        for path in (pod, root):
            path.rmdir()


def test_a_node_that_lacks_what_ebpf_needs_stays_on_iptables_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bpf, "ensure_bpffs", lambda _path: None)
    monkeypatch.setattr(
        bpf, "requirements", lambda _parent: ["a cgroup v2 hierarchy (no cgroup2 mount)"]
    )
    choice = choose("ebpf", dns=True, bpf_dir=tmp_path / "pins", cgroup_root=tmp_path)
    assert isinstance(choice.backend, IptablesCapture)
    assert choice.requested == "ebpf"
    assert choice.refused == "this node lacks a cgroup v2 hierarchy (no cgroup2 mount)"


def test_iptables_is_the_default_and_an_unknown_backend_is_refused(tmp_path: Path) -> None:
    choice = choose("iptables", dns=False, bpf_dir=tmp_path / "pins")
    assert choice.backend.name == "iptables" and choice.refused == ""
    # No eBPF pins on the node: nothing of an earlier eBPF capture to take out.
    assert isinstance(choice.backend, IptablesCapture) and choice.backend.ebpf is None
    with pytest.raises(ValueError, match="unknown capture backend 'nft'"):
        choose("nft", dns=True)
    assert backend.BACKENDS == ("iptables", "ebpf")
