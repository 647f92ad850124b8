"""``ztunnel-cni``: the CNI plugin, chained after ``bridge`` in the node's conflist.

The container runtime runs it for every pod of the node, as CNI says (the
command in ``CNI_COMMAND``, the pod in ``CNI_ARGS``, the config with the
previous plugin's result on stdin). It never changes the pod's network:

* ``ADD``: record the pod (uid, namespace, name, netns, IPs) for the node
  agent, then ask the agent to enroll it. The agent answers once the pod is
  captured and ztunnel has it, or says the pod is not in the mesh; only then
  does the plugin return, so the pod's app starts already captured. The
  previous result is passed on unchanged.
* ``DEL``: forget the pod and tell the agent; always succeeds (DEL must
  release what it can even when the agent is away).
* ``CHECK``, ``VERSION``: as the spec says.

When the agent cannot be reached, a pod of a namespace the agent last saw
as ambient fails ADD with an error the runtime retries (it must not start
uncaptured); any other pod starts normally, so the mesh being down never
breaks pods outside it. Before the agent has ever written its list of
ambient namespaces, every pod fails ADD: which are the mesh's is unknown.

Config: ``{"type": "ztunnel-cni", "runDir": "/var/run/ztunnel"}`` (socket
``plugin.sock``, records in ``pods/``, the ambient namespaces hint in
``ambient-namespaces.json``), optional ``timeoutSeconds`` (default 30).
Standard library only, for a fast start.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from ztunnel.nodeagent.records import PodRecord, RecordError, RecordStore

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


def ask_agent(sock_path: Path, request: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """One request to the node agent: a JSON line out, a JSON line back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(sock_path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"null")
    if not isinstance(answer, dict):
        raise ValueError(f"the agent answered {data[:200]!r}")
    return answer


def _ambient_hint(run_dir: Path) -> set[str] | None:
    try:
        names = json.loads((run_dir / AMBIENT_HINT).read_text())
    except (OSError, ValueError):
        return None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else None


def handle(env: Mapping[str, str], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Do ``CNI_COMMAND``; return what to print (None: nothing) or raise PluginError."""
    command = env.get("CNI_COMMAND", "")
    version = str(config.get("cniVersion", "1.0.0"))
    if command == "VERSION":
        return {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
    if version not in SUPPORTED_VERSIONS:
        raise PluginError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported")
    run_dir = config.get("runDir")
    if not isinstance(run_dir, str) or not run_dir:
        raise PluginError(ERR_DECODING, "the plugin config needs 'runDir' (the node agent's dir)")
    try:
        timeout_s = float(config.get("timeoutSeconds", DEFAULT_TIMEOUT_S))
    except (TypeError, ValueError) as e:
        raise PluginError(ERR_DECODING, "'timeoutSeconds' must be a number") from e
    root = Path(run_dir)
    store = RecordStore(root / PODS_DIR)
    uid = env.get("CNI_CONTAINERID", "")
    if command == "CHECK":
        return None
    if command not in ("ADD", "DEL"):
        raise PluginError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
    if not uid:
        raise PluginError(ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
    if command == "DEL":
        try:
            store.remove(uid)
            ask_agent(root / SOCKET_NAME, {"cmd": "del", "uid": uid}, timeout_s)
        except (OSError, ValueError, RecordError):
            pass  # the agent reconciles from the records when it is back
        return None

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
        record = PodRecord(uid, namespace, name, netns, _ips(prev))
        store.put(record)
    except (OSError, RecordError) as e:
        raise PluginError(ERR_ENROLL, f"cannot record pod {namespace}/{name}", str(e)) from e
    request = {"cmd": "add", "record": json.loads(record.to_json())}
    try:
        answer = ask_agent(root / SOCKET_NAME, request, timeout_s)
    except (OSError, ValueError) as e:
        ambient = _ambient_hint(root)
        if ambient is not None and namespace not in ambient:
            return prev  # not a mesh pod, as far as the agent last said: start it
        raise PluginError(
            ERR_TRY_AGAIN,
            f"the ztunnel node agent at {root / SOCKET_NAME} cannot be reached, and pod "
            f"{namespace}/{name} may belong to the mesh: not starting it uncaptured",
            str(e),
        ) from e
    if not answer.get("ok"):
        raise PluginError(
            ERR_ENROLL, f"pod {namespace}/{name} could not join the mesh", str(answer.get("error"))
        )
    return prev


def main(
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    env: Mapping[str, str] | None = None,
) -> int:
    env = os.environ if env is None else env
    config: Any = {}
    try:
        raw = stdin.read() if env.get("CNI_COMMAND") != "VERSION" else (stdin.read() or "{}")
        try:
            config = json.loads(raw or "{}")
        except json.JSONDecodeError as e:
            raise PluginError(ERR_DECODING, "the plugin config on stdin is not JSON", str(e)) from e
        if not isinstance(config, dict):
            raise PluginError(ERR_DECODING, "the plugin config on stdin is not a JSON object")
        result = handle(env, config)
    except PluginError as e:
        version = config.get("cniVersion", "1.0.0") if isinstance(config, dict) else "1.0.0"
        error = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            error["details"] = e.details
        stdout.write(json.dumps(error) + "\n")
        return 1
    if result is not None:
        stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
