"""The mesh's processes as containers of the image: ``meshlab up --mesh --image IMAGE``.

Each mesh process (meshd, each node's agent and ztunnel, each waypoint pod)
runs in a podman container instead of as a host process, joined to the
network namespace the process would live in (``--network ns:/run/netns/...``;
meshd, in the root namespace, ``--network host``), with the security settings
of its container in the manifests, read at ``up`` from the rendered default
overlay (``kubectl kustomize deploy/overlays/default``) and, for waypoints,
from the Deployment meshd would make (``python -m controlplane.kube_waypoints``):
capabilities, privilege, no-new-privileges, user and group, read-only root,
seccomp and AppArmor, and ``emptyDir`` volumes as tmpfs. Their other volumes
(projected tokens, ConfigMaps, hostPaths) are Kubernetes' ways to give what
meshlab gives by bind mounts at meshlab's own paths: the cluster's dir, and
``/run/netns`` (recursive, following the host's mounts) for the node agent.

Every container is named with the cluster's prefix and carries the label
``LABEL=<cluster>``, so ``down`` removes them all, also after a crash. The
recorded pid is the container's process on the host (``.State.Pid``): the
program itself, pid 1 of its container. Output goes to the same log files as
the host processes' (podman's ``passthrough`` log driver).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mesh.cluster.statefile import cluster_dir, state_root
from meshlab.errors import MeshlabError

LABEL = "io.meshlab.cluster"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OVERLAY = DEPLOY / "overlays" / "default"
# (kind, name, container) in the rendered overlay, for each role meshlab runs.
MANIFEST_CONTAINERS = {
    "meshd": ("Deployment", "meshd", "meshd"),
    "ztunnel": ("DaemonSet", "ztunnel", "ztunnel"),
    "agent": ("DaemonSet", "ztunnel-node-agent", "node-agent"),
}
# This sandbox refuses raising rlimits: podman must keep the host's (`--ulimit host`)
# and set no defaults of its own (containers.conf `default_ulimits = []`).
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Security:
    """What a container's manifest says of its privileges, as podman options."""

    user: int | None = None
    group: int | None = None
    run_as_non_root: bool = False
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    privileged: bool = False
    no_new_privileges: bool = False
    read_only: bool = False
    tmpfs: tuple[str, ...] = ()
    seccomp_default: bool = False  # RuntimeDefault; otherwise Unconfined, Kubernetes' default
    apparmor_unconfined: bool = False

    @classmethod
    def of(cls, pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> Security:
        pod_sc = pod_spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}

        def pick(key: str) -> Any:
            return sc.get(key, pod_sc.get(key))

        caps = sc.get("capabilities") or {}
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or ()}
        tmpfs = tuple(
            m["mountPath"]
            for m in container.get("volumeMounts") or ()
            if "emptyDir" in volumes.get(m["name"], {})
        )
        seccomp = (pick("seccompProfile") or {}).get("type", "Unconfined")
        apparmor = (pick("appArmorProfile") or {}).get("type", "RuntimeDefault")
        return cls(
            user=pick("runAsUser"),
            group=pick("runAsGroup"),
            run_as_non_root=bool(pick("runAsNonRoot")),
            cap_drop=tuple(caps.get("drop") or ()),
            cap_add=tuple(caps.get("add") or ()),
            privileged=bool(sc.get("privileged")),
            no_new_privileges=sc.get("allowPrivilegeEscalation") is False,
            read_only=bool(sc.get("readOnlyRootFilesystem")),
            tmpfs=tmpfs,
            seccomp_default=seccomp == "RuntimeDefault",
            apparmor_unconfined=apparmor == "Unconfined",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Security:
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # type: ignore[arg-type]
        )

    def to_dict(self) -> Obj:
        return asdict(self)

    def podman_args(self) -> list[str]:
        if self.run_as_non_root and self.user == 0:
            raise MeshlabError("the manifest says runAsNonRoot with runAsUser 0")
        args: list[str] = []
        if self.user is not None:
            args += ["--user", f"{self.user}:{self.group if self.group is not None else 0}"]
        args += [a for c in self.cap_drop for a in ("--cap-drop", c)]
        args += [a for c in self.cap_add for a in ("--cap-add", c)]
        if self.privileged:
            args.append("--privileged")
        if self.no_new_privileges:
            args += ["--security-opt", "no-new-privileges"]
        if self.read_only:
            # Only the manifest's emptyDirs are writable, not podman's default tmpfs set.
            args += ["--read-only", "--read-only-tmpfs=false"]
        args += [a for t in self.tmpfs for a in ("--tmpfs", t)]
        if not self.seccomp_default:
            args += ["--security-opt", "seccomp=unconfined"]
        if self.apparmor_unconfined:
            args += ["--security-opt", "apparmor=unconfined"]
        return args


def podman() -> str:
    exe = shutil.which("podman")
    if exe is None:
        raise MeshlabError("--image needs podman (Debian package podman)")
    return exe


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = state_root() / ".containers.conf"
        if not conf.is_file():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    return env


def _run(argv: Sequence[str], *, timeout_s: float = 60.0) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=_env(), timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise MeshlabError(f"{' '.join(argv[:3])} timed out after {timeout_s:g} s") from e
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()
        raise MeshlabError(f"{' '.join(argv[:3])} failed ({done.returncode}): {why}")
    return done.stdout


def render_overlay() -> list[Obj]:
    """The objects of the default overlay, as ``kubectl apply -k deploy/`` would send them."""
    import yaml

    if shutil.which("kubectl") is None:
        raise MeshlabError(
            "--image reads the containers' privileges from the manifests, rendered with "
            "`kubectl kustomize`: install kubectl (Debian package kubernetes-client)"
        )
    if not OVERLAY.is_dir():
        raise MeshlabError(f"--image needs the manifests at {OVERLAY} (a source checkout)")
    text = _run(["kubectl", "kustomize", str(OVERLAY)])
    return [d for d in yaml.safe_load_all(text) if d]


def _container(objects: Sequence[Obj], kind: str, name: str, container: str) -> Security:
    for obj in objects:
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            spec = obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                if c["name"] == container:
                    return Security.of(spec, c)
    raise MeshlabError(f"the manifests have no container {container} in {kind} {name}")


def waypoint_deployment() -> Obj:
    """The Deployment meshd makes for a waypoint (its program, run as such)."""
    out = _run([sys.executable, "-m", "controlplane.kube_waypoints", "default", "waypoint"])
    deployment: Obj = json.loads(out)
    return deployment


def manifest_security() -> dict[str, Security]:
    """Each role's security settings: meshd, ztunnel, agent (the rendered default overlay)
    and waypoint (the Deployment meshd would make)."""
    objects = render_overlay()
    found = {role: _container(objects, *where) for role, where in MANIFEST_CONTAINERS.items()}
    found["waypoint"] = _container([waypoint_deployment()], "Deployment", "waypoint", "waypoint")
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    """One mesh process to run from the image."""

    cluster: str
    name: str
    image: str
    security: Security
    argv: tuple[str, ...]  # argv[0] a program on the image's PATH
    netns: str | None  # None: the root namespace
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    binds: tuple[str, ...] = ()  # podman -v values

    def podman_argv(self) -> list[str]:
        network = "host" if self.netns is None else f"ns:/run/netns/{self.netns}"
        env = [a for k, v in sorted(self.env.items()) for a in ("--env", f"{k}={v}")]
        binds = [a for b in self.binds for a in ("--volume", b)]
        return [
            podman(),
            "run",
            "--detach",
            "--replace",
            "--name",
            self.name,
            "--label",
            f"{LABEL}={self.cluster}",
            "--runtime",
            "runc",
            "--ulimit",
            "host",
            "--network",
            network,
            "--log-driver",
            "passthrough",
            *env,
            *binds,
            *self.security.podman_args(),
            self.image,
            *self.argv,
        ]


def default_binds(cluster: str) -> tuple[str, ...]:
    """The cluster's dir, at its own path (state, tokens, CA, run dirs, sockets)."""
    where = cluster_dir(cluster)
    return (f"{where}:{where}",)


NETNS_BIND = "/run/netns:/run/netns:rbind,rslave"


def run(container: Container) -> int:
    """Start the container; return its process's pid on the host."""
    with container.log_path.open("ab") as log:
        start = log.tell()
        # passthrough: the program's stdout and stderr are podman's, the log file (a pipe
        # would stay open as long as the program runs); so are podman's own errors.
        try:
            done = subprocess.run(
                container.podman_argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_env(),
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise MeshlabError(f"podman run {container.name} timed out") from e
    if done.returncode != 0:
        with container.log_path.open("rb") as log:
            log.seek(start)
            why = log.read().decode(errors="replace").strip()
        raise MeshlabError(f"podman run {container.name} failed ({done.returncode}): {why}")
    return pid_of(container.name)


def pid_of(name: str) -> int:
    pid = int(_run([podman(), "inspect", "--format", "{{.State.Pid}}", name]).strip() or 0)
    if pid <= 0:
        raise MeshlabError(f"container {name} is not running: see `podman logs {name}`")
    return pid


def remove(name: str) -> None:
    """Remove one container (a waypoint pod that goes), whatever its state."""
    exe = shutil.which("podman")
    if exe is not None:
        subprocess.run(
            [exe, "rm", "--force", "--time", "0", "--ignore", name],
            capture_output=True,
            env=_env(),
            timeout=60,
            check=False,
        )


def cluster_containers(cluster: str) -> list[str]:
    """The names of every container of ``cluster`` (running or not), by label."""
    exe = shutil.which("podman")
    if exe is None:
        return []
    done = subprocess.run(
        [exe, "ps", "--all", "--filter", f"label={LABEL}={cluster}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    return done.stdout.split()


def remove_all(cluster: str) -> list[str]:
    """Remove every container of ``cluster``; returns their names."""
    found = cluster_containers(cluster)
    exe = shutil.which("podman")
    if found and exe is not None:
        subprocess.run(
            [exe, "rm", "--force", "--time", "0", "--ignore", *found],
            capture_output=True,
            env=_env(),
            timeout=120,
            check=False,
        )
    return found
