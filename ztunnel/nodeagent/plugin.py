"""``ztunnel-cni``: the CNI plugin, chained last in the node's primary conflist.

The container runtime runs it for every pod of the node, as CNI says (the
command in ``CNI_COMMAND``, the pod in ``CNI_ARGS``, the config with the
previous plugin's result on stdin). The binary it runs is ``cni_shim.c``,
static, since the node has no Python of ours: it forwards each call to the
agent's socket, and this module checks the call there (:func:`prepare`) for
:meth:`ztunnel.nodeagent.service.NodeAgent.handle_cni`. It never changes the
pod's network:

* ``ADD``: the agent records the pod (uid, namespace, name, netns, IPs) and
  enrolls it, answering once the pod is captured and ztunnel has it, or that
  the pod is not in the mesh; only then does the plugin return, so the pod's
  app starts already captured. The previous result is passed on unchanged.
* ``DEL``: the agent forgets the pod; always succeeds (DEL must release what
  it can even when the agent is away).
* ``CHECK``, ``VERSION``: as the spec says.

When the agent cannot be reached (the binary decides alone), a pod of a
namespace the agent last saw as ambient fails ADD with an error the runtime
retries (it must not start uncaptured); a pod of an ``excludeNamespaces``
namespace (the agent's own, so it can always start) or of one the agent last
saw as not ambient starts normally, so the mesh being down never breaks pods
outside it. Before the agent has ever written its list of ambient
namespaces, every other pod fails ADD: which are the mesh's is unknown.

Config: ``{"type": "ztunnel-cni", "runDir": "/var/run/ztunnel"}`` (socket
``plugin.sock``, records in ``pods/``, the ambient namespaces hint in
``ambient-namespaces.json``, calls made while the agent was away in
``pending/``), optional ``timeoutSeconds`` (default 30) and
``excludeNamespaces``. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.nodeagent.records import PodRecord, RecordError, check_uid

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
SOCKET_NAME = "plugin.sock"
PODS_DIR = "pods"
AMBIENT_HINT = "ambient-namespaces.json"
DEFAULT_TIMEOUT_S = 30.0

# CNI's well-known error codes (spec 1.0, "Error"); 100+ are the plugin's own.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_INVALID_ENV = 4
ERR_DECODING = 6
ERR_TRY_AGAIN = 11
ERR_ENROLL = 100


class PluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def parse_cni_args(raw: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PluginError(ERR_INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        args[key] = value
    return args


def _ips(prev: Mapping[str, Any]) -> tuple[str, ...]:
    out = []
    for ip in prev.get("ips") or []:
        if isinstance(ip, dict) and isinstance(ip.get("address"), str):
            out.append(ip["address"].split("/", 1)[0])
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Call:
    """One CNI call, checked: what to do, and for ADD the pod and the result to pass on."""

    command: str  # ADD, DEL, CHECK, GC, STATUS or VERSION
    version: str
    uid: str = ""
    record: PodRecord | None = None
    prev: dict[str, Any] | None = None


def prepare(env: Mapping[str, str], config: Mapping[str, Any]) -> Call:
    """Check ``CNI_COMMAND``, the environment and the config; raise PluginError if wrong."""
    command = env.get("CNI_COMMAND", "")
    version = str(config.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        return Call(command, version)
    if version not in SUPPORTED_VERSIONS:
        raise PluginError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported")
    run_dir = config.get("runDir")
    if not isinstance(run_dir, str) or not run_dir:
        raise PluginError(ERR_DECODING, "the plugin config needs 'runDir' (the node agent's dir)")
    try:
        float(config.get("timeoutSeconds", DEFAULT_TIMEOUT_S))  # the binary's, checked here too
    except (TypeError, ValueError) as e:
        raise PluginError(ERR_DECODING, "'timeoutSeconds' must be a number") from e
    if command in ("CHECK", "GC", "STATUS"):
        return Call(command, version)
    if command not in ("ADD", "DEL"):
        raise PluginError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
    uid = env.get("CNI_CONTAINERID", "")
    if not uid:
        raise PluginError(ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
    if command == "DEL":
        return Call(command, version, uid)
    prev = config.get("prevResult")
    if not isinstance(prev, dict):
        raise PluginError(
            ERR_UNSUPPORTED_FIELD,
            "ztunnel-cni must be chained after the plugin that wires the pod (no prevResult)",
        )
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    netns = env.get("CNI_NETNS", "")
    if not namespace or not name:
        raise PluginError(ERR_INVALID_ENV, "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME")
    if not netns:
        raise PluginError(ERR_INVALID_ENV, "CNI_NETNS is not set")
    try:
        record = PodRecord(uid, namespace, name, netns, _ips(prev), args.get("K8S_POD_UID", ""))
        check_uid(uid)
    except RecordError as e:
        raise PluginError(ERR_ENROLL, f"cannot record pod {namespace}/{name}", str(e)) from e
    return Call(command, version, uid, record, prev)


def enroll_error(record: PodRecord, answer: Mapping[str, Any]) -> PluginError:
    return PluginError(
        ERR_ENROLL,
        f"pod {record.namespace}/{record.name} could not join the mesh",
        str(answer.get("error")),
    )


def error_json(version: str, e: PluginError) -> str:
    error: dict[str, Any] = {"cniVersion": version, "code": e.code, "msg": e.msg}
    if e.details:
        error["details"] = e.details
    return json.dumps(error) + "\n"
