"""A CNI runtime: what containerd does to wire a pod, done the same way.

It reads the node's network configuration list (the first ``*.conflist`` in
the node's config directory, in lexical order, as libcni does), then runs
each plugin binary inside the node's network namespace with the CNI
environment (``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``) and the plugin's config on stdin,
threading each plugin's result into the next as ``prevResult``. ``DEL`` runs
the chain in reverse with the cached ``ADD`` result. The loopback interface
is set up by its own one-plugin network, as containerd does.

Each node's primary network is shaped as kind's (kindnet's
``10-kindnet.conflist``: ``ptp`` with ``host-local`` IPAM over the node's pod
CIDR, then ``portmap``, CNI 0.3.1), in the node's own conf and bin dirs
(``nodes/NODE/cni/net.d`` and ``nodes/NODE/cni/bin``, Kubernetes'
``/etc/cni/net.d`` and ``/opt/cni/bin``). With the mesh, the node agent
installs ``ztunnel-cni`` there itself, as on Kubernetes; nothing here knows
of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from meshlab.errors import CniError, HostToolMissingError, MeshlabError

CNI_VERSION = "1.0.0"
NETWORK_NAME = "kindnet"
NETWORK_FILE = "10-kindnet.conflist"
NETWORK_CNI_VERSION = "0.3.1"  # what kindnet writes
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
PLUGIN_TIMEOUT_S = 30.0
LOOPBACK_CONFLIST: dict[str, Any] = {
    "cniVersion": CNI_VERSION,
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}


def find_cni_path() -> str:
    """The directories holding the reference plugin binaries (``CNI_PATH``)."""
    found = [d for d in CNI_BIN_DIRS if (d / "ptp").is_file()]
    if not found:
        raise HostToolMissingError(
            "the CNI plugins are not installed (looked in "
            f"{', '.join(map(str, CNI_BIN_DIRS))}); install the Debian package "
            "containernetworking-plugins (`make deps` does)"
        )
    return os.pathsep.join(str(d) for d in found)


def node_conflist(pod_cidr: IPv4Network, ipam_dir: Path) -> dict[str, Any]:
    """The node's pod network as kindnet writes it: ``ptp`` with ``host-local`` IPAM over
    the node's CIDR (each pod a veth pair routed by the node, no bridge), then ``portmap``."""
    return {
        "cniVersion": NETWORK_CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "ptp",
                # No masquerade: pod addresses are routed between nodes as is,
                # so the destination sees the real source pod IP (as kind does).
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": str(pod_cidr)}]],
                },
                "mtu": 1500,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_conflist(conf_dir: Path, conflist: Mapping[str, Any], filename: str) -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / filename
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(conflist, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_conflist(conf_dir: Path) -> dict[str, Any]:
    """The first ``*.conflist`` in ``conf_dir``, validated enough to run it."""
    files = sorted(conf_dir.glob("*.conflist"))
    if not files:
        raise MeshlabError(f"no CNI network configuration (*.conflist) in {conf_dir}")
    try:
        conf = json.loads(files[0].read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MeshlabError(f"cannot read CNI configuration {files[0]}: {e}") from e
    plugins = conf.get("plugins")
    if (
        not isinstance(plugins, list)
        or not plugins
        or not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins)
    ):
        raise MeshlabError(f"{files[0]}: 'plugins' must be a non-empty list of objects with 'type'")
    if not isinstance(conf.get("name"), str):
        raise MeshlabError(f"{files[0]}: a network configuration list needs a 'name'")
    return dict(conf)


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSandbox:
    """What the runtime knows of a pod when it calls CNI."""

    container_id: str
    netns_path: str
    namespace: str
    name: str
    ifname: str = "eth0"
    pod_uid: str = ""

    def cni_args(self) -> str:
        # What kubelet/containerd pass; IgnoreUnknown lets plugins that do not
        # know these keys accept them.
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={self.container_id}"
            + (f";K8S_POD_UID={self.pod_uid}" if self.pod_uid else "")
        )


class CniRuntime:
    """Runs CNI plugin chains for pods of one node, inside that node's namespace."""

    def __init__(self, *, host_netns: str, cni_path: str, cache_dir: Path) -> None:
        self.host_netns = host_netns
        self.cni_path = cni_path
        self.cache_dir = cache_dir

    def add(self, conflist: Mapping[str, Any], pod: PodSandbox) -> dict[str, Any]:
        """Run ADD through the chain; return (and cache) the final result."""
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            prev = self._invoke("ADD", conflist, plugin, pod, prev)
        assert prev is not None
        self._cache_path(conflist, pod).parent.mkdir(parents=True, exist_ok=True)
        self._cache_path(conflist, pod).write_text(json.dumps(prev))
        return prev

    def delete(self, conflist: Mapping[str, Any], pod: PodSandbox) -> None:
        """Run DEL through the chain in reverse, with the cached ADD result."""
        cache = self._cache_path(conflist, pod)
        prev: dict[str, Any] | None = None
        if cache.is_file():
            try:
                prev = json.loads(cache.read_text())
            except (OSError, json.JSONDecodeError):
                prev = None
        errors: list[CniError] = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._invoke("DEL", conflist, plugin, pod, prev)
            except CniError as e:
                errors.append(e)  # keep going: DEL must release what it can
        cache.unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def _cache_path(self, conflist: Mapping[str, Any], pod: PodSandbox) -> Path:
        return self.cache_dir / f"{conflist['name']}-{pod.container_id}-{pod.ifname}"

    def _invoke(
        self,
        command: str,
        conflist: Mapping[str, Any],
        plugin: Mapping[str, Any],
        pod: PodSandbox,
        prev: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        kind = plugin["type"]
        binary = self._find_binary(kind)
        config = dict(plugin)
        config["cniVersion"] = conflist.get("cniVersion", CNI_VERSION)
        config["name"] = conflist["name"]
        if prev is not None:
            config["prevResult"] = prev
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns_path,
            "CNI_IFNAME": pod.ifname,
            "CNI_ARGS": pod.cni_args(),
            "CNI_PATH": self.cni_path,
        }
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", self.host_netns, binary],
                input=json.dumps(config),
                capture_output=True,
                text=True,
                env=env,
                timeout=PLUGIN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise CniError(kind, command, None, f"no answer within {PLUGIN_TIMEOUT_S}s") from e
        if done.returncode != 0:
            code, msg = _parse_error(done.stdout, done.stderr)
            raise CniError(kind, command, code, msg)
        if command != "ADD":
            return dict(prev or {})
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError as e:
            raise CniError(kind, command, None, f"result is not JSON: {done.stdout[:200]!r}") from e
        if not isinstance(result, dict):
            raise CniError(kind, command, None, f"result is not an object: {result!r}")
        return result

    def _find_binary(self, kind: str) -> str:
        if "/" in kind or kind in ("", ".", ".."):
            raise MeshlabError(f"invalid CNI plugin type {kind!r}")
        for directory in self.cni_path.split(os.pathsep):
            candidate = Path(directory) / kind
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise MeshlabError(f"CNI plugin {kind!r} not found in CNI_PATH {self.cni_path}")


def _parse_error(stdout: str, stderr: str) -> tuple[int | None, str]:
    try:
        err = json.loads(stdout)
    except json.JSONDecodeError:
        return None, (stderr or stdout).strip() or "no error message"
    if isinstance(err, dict):
        msg = str(err.get("msg", "")).strip()
        details = str(err.get("details", "")).strip()
        code = err.get("code")
        return (code if isinstance(code, int) else None), (
            f"{msg}: {details}" if details else msg or stdout.strip()
        )
    return None, stdout.strip()


def pod_address(result: Mapping[str, Any], ifname: str = "eth0") -> IPv4Address:
    """The pod's IPv4 address from a CNI result (the ``ips`` entry on ``ifname``)."""
    interfaces = result.get("interfaces") or []
    for ip in result.get("ips") or []:
        idx = ip.get("interface")
        named = isinstance(idx, int) and 0 <= idx < len(interfaces)
        if named and interfaces[idx].get("name") != ifname:
            continue
        try:
            iface = IPv4Interface(ip["address"])
        except (KeyError, ValueError):
            continue
        return iface.ip
    raise MeshlabError(f"the CNI result has no IPv4 address for {ifname}: {json.dumps(result)}")
