"""Rendering ``deploy/`` and reading what it says: shared by the tests of this package.

``kubectl kustomize`` renders offline; without kubectl (or with a kustomize
older than v5, which lacks what the overlays use) every test that needs a
render is skipped with the reason. Renders are cached per directory.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("default", "dev", "ebpf")
GOLDEN = Path(__file__).resolve().parent / "golden"
# The Kubernetes versions the objects are validated against (schemas shipped by
# kubernetes-validate): 1.30 is the oldest the manifests can target
# (securityContext.appArmorProfile; the node name in bound tokens, which meshd's
# CA checks, is on by default from 1.30), 1.34 the newest Istio 1.28 supports.
KUBERNETES_VERSIONS = ("1.30", "1.34")

Obj = dict[str, Any]


@functools.cache
def kubectl() -> str | None:
    """Why renders cannot run here, or None when they can."""
    exe = shutil.which("kubectl")
    if exe is None:
        return "kubectl is not installed (it renders deploy/ with `kubectl kustomize`)"
    out = subprocess.run(
        [exe, "version", "--client", "-o", "yaml"], capture_output=True, text=True, check=False
    )
    version = (yaml.safe_load(out.stdout) or {}).get("kustomizeVersion", "")
    if not re.match(r"v?([5-9]|\d\d)\.", str(version)):
        return f"kubectl's kustomize is {version or 'unknown'}; the overlays need v5 or newer"
    return None


def need_kubectl() -> None:
    reason = kubectl()
    if reason is not None:
        pytest.skip(reason)


@functools.cache
def render_text(directory: Path) -> str:
    """``kubectl kustomize DIRECTORY``: the YAML stream, as kubectl prints it."""
    need_kubectl()
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{out.stderr}")
    return out.stdout


def render(overlay: str) -> list[Obj]:
    """The objects an overlay (a name in OVERLAYS, or a directory) renders to. Shared
    between tests: read them, never change them."""
    directory = DEPLOY / "overlays" / overlay if overlay in OVERLAYS else Path(overlay)
    return _parse(render_text(directory))


@functools.cache
def _parse(text: str) -> list[Obj]:
    return [d for d in yaml.load_all(text, Loader=_LOADER) if d]


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when built with it


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name}"
    c: Obj = found[0]
    return c


def containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """Every (workload, container) pair of the Deployments and DaemonSets."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "DaemonSet"):
            for c in pod_spec(obj)["containers"]:
                yield obj, c


# Kubernetes' $(VAR) references in command and args (a `$$` escapes a `$`).
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# What the downward API gives, for the references made to it.
FIELD_VALUES = {
    "spec.nodeName": "node-1",
    "metadata.name": "pod-1",
    "metadata.namespace": "istio-system",
}


def env_values(c: Obj) -> dict[str, str]:
    """The container's env as the kubelet would set it (fieldRefs: FIELD_VALUES)."""
    out = {}
    for var in c.get("env") or ():
        if "value" in var:
            out[var["name"]] = str(var["value"])
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            out[var["name"]] = FIELD_VALUES[field]
    return out


def referenced(c: Obj) -> set[str]:
    """The env vars the container's command and args refer to with $(VAR)."""
    words = [*(c.get("command") or ()), *(c.get("args") or ())]
    return {m.group(1) for w in words for m in _REFERENCE.finditer(w) if m.group(1)}


def expand(words: list[str], env: Mapping[str, str]) -> list[str]:
    """``words`` with $(VAR) references expanded as the kubelet expands them: a
    reference to an undefined variable is left as it is."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return [_REFERENCE.sub(one, w) for w in words]


def args_of(c: Obj) -> list[str]:
    """The container's args with the kubelet's expansion done."""
    return expand(list(c.get("args") or ()), env_values(c))


def mounts(workload: Obj, c: Obj) -> dict[str, Obj]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or ()}
    return {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts") or ()}


def mounted(workload: Obj, c: Obj, path: str | Path) -> tuple[str, Obj] | None:
    """(mountPath, volume) of the mount that holds ``path``, or None."""
    path = Path(path)
    best = None
    for where, volume in mounts(workload, c).items():
        holds = path == Path(where) or Path(where) in path.parents
        if holds and (best is None or len(where) > len(best[0])):
            best = (where, volume)
    return best
