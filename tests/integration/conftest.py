"""Helpers for tests that build real clusters of network namespaces.

They need root and the host tools; without them each test is skipped with a
reason naming what is missing. Every cluster a test makes has a unique name
(its prefix) and is torn down afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebpf.capture import cgroup2_mount, ensure_bpffs, requirements

MESHLAB = str(Path(sys.executable).parent / "meshlab")
CNI_PLUGIN = Path("/usr/lib/cni/ptp")
# The image the mesh's tests run the mesh from (`meshlab up --mesh --image`); unset,
# the mesh runs as host processes.
IMAGE_ENV = "MESHLAB_IMAGE"


def mesh_args() -> list[str]:
    """What a test's `meshlab up` adds to run the mesh: ``--mesh``, and ``--image IMAGE``
    when MESHLAB_IMAGE names one."""
    image = os.environ.get(IMAGE_ENV)
    return ["--mesh", "--image", image] if image else ["--mesh"]


def skip_unless_backend_runs(backend: str) -> None:
    """Skip, naming what is missing, when this host cannot run the capture ``backend``
    (eBPF: cgroup v2, bpffs, libbpf, the compiled programs)."""
    if backend != "ebpf":
        return
    ensure_bpffs()
    lacking = requirements()
    if lacking:
        pytest.skip("the eBPF capture needs " + "; ".join(lacking))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool, package in (("ip", "iproute2"), ("curl", "curl"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            return f"needs {tool!r} (Debian package {package})"
    if not CNI_PLUGIN.is_file():
        return f"needs the CNI plugins ({CNI_PLUGIN}; Debian package containernetworking-plugins)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def unique_name() -> str:
    return "t" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))


def meshlab(
    *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [MESHLAB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"meshlab {' '.join(args)} exited {done.returncode}\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done


def status(name: str) -> dict[str, Any]:
    return dict(json.loads(meshlab("status", "--name", name, "-o", "json").stdout))


def http_get(name: str, pod: str, url: str) -> dict[str, Any]:
    """GET ``url`` from inside ``pod`` with curl; the echo app answers JSON."""
    done = meshlab(
        "exec",
        "--name",
        name,
        pod,
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--retry",
        "30",
        "--retry-connrefused",
        "--retry-delay",
        "0",
        "--retry-max-time",
        "30",
        url,
    )
    return dict(json.loads(done.stdout))


def leftovers(name: str) -> dict[str, list[str]]:
    """Everything on this host that still carries the cluster's prefix or marker.

    Written independently of meshlab's own sweep, so a bug there shows here.
    """
    prefix = f"{name}-"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    rules = (
        subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout
        if shutil.which("iptables")
        else ""
    )
    marker = f"MESHLAB_CLUSTER={name}".encode()
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] not in "ZX":
                    procs.append(entry.name)
        except OSError:
            continue
    containers = (
        subprocess.run(
            ["podman", "ps", "--all", "--filter", f"label=io.meshlab.cluster={name}",
             "--format", "{{.Names}}"],
            capture_output=True, text=True,
        ).stdout.split()
        if shutil.which("podman")
        else []
    )  # fmt: skip
    root = Path(os.environ.get("MESHLAB_STATE_DIR", "/run/meshlab"))
    state = [str(p) for p in (root / name, root / f".{name}.lock") if p.exists()]
    cgroup2 = cgroup2_mount()
    cgroups = [str(p) for p in cgroup2.glob(f"{prefix}*")] if cgroup2 is not None else []
    bpffs = Path("/sys/fs/bpf")
    pins = [str(p) for p in bpffs.glob(f"{prefix}*")] if bpffs.is_dir() else []
    return {
        "netns": [line.split()[0] for line in netns.splitlines() if line.startswith(prefix)],
        "links": [
            line.split(":")[1].strip().split("@")[0]
            for line in links.splitlines()
            if line.split(":")[1].strip().startswith(prefix)
        ],
        "iptables": [line for line in rules.splitlines() if f"meshlab:{name}" in line],
        "processes": procs,
        "containers": containers,
        "state": state,
        "cgroups": cgroups,
        "bpf pins": pins,
    }


def assert_nothing_left(name: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        left = {k: v for k, v in leftovers(name).items() if v}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == {}, f"cluster {name} left behind: {left}"


@pytest.fixture
def cluster_name() -> Iterator[str]:
    """A unique cluster name, torn down after the test whatever happened."""
    name = unique_name()
    yield name
    meshlab("down", "--name", name, check=False)
