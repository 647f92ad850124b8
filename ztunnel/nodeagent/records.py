"""The pods the CNI plugin has seen on this node, one JSON file each.

The plugin writes a record on ADD before it asks the agent anything, and
removes it on DEL, so the agent knows every pod of the node and its network
namespace even when it was down while the pod started. Files are replaced
whole (write, then rename), so a reader never sees half a record.

Standard library only: the CNI plugin imports this module.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RecordError(ValueError):
    """A record that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PodRecord:
    uid: str  # the sandbox (container) id the runtime gave CNI
    namespace: str
    name: str
    netns: str  # path to the pod's network namespace
    ips: tuple[str, ...] = ()
    pod_uid: str = ""  # Kubernetes' pod UID (CNI_ARGS K8S_POD_UID): names its cgroup

    def to_json(self) -> str:
        data = asdict(self)
        data["ips"] = list(self.ips)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PodRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"not JSON: {e}") from e
        if not isinstance(data, dict):
            raise RecordError("not a JSON object")
        fields = ("uid", "namespace", "name", "netns")
        missing = [f for f in fields if not isinstance(data.get(f), str) or not data[f]]
        if missing:
            raise RecordError(f"missing or empty: {', '.join(missing)}")
        ips = data.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise RecordError("'ips' must be a list of strings")
        check_uid(data["uid"])
        pod_uid = data.get("pod_uid", "")
        if not isinstance(pod_uid, str):
            raise RecordError("'pod_uid' must be a string")
        return cls(data["uid"], data["namespace"], data["name"], data["netns"], tuple(ips), pod_uid)


def check_uid(uid: str) -> str:
    if not _UID.match(uid):
        raise RecordError(f"pod uid {uid!r} is not a plain identifier")
    return uid


class RecordStore:
    """The directory of records (only root may write it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, uid: str) -> Path:
        return self.directory / f"{check_uid(uid)}.json"

    def put(self, record: PodRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(record.uid)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(record.to_json() + "\n")
        tmp.replace(path)

    def get(self, uid: str) -> PodRecord | None:
        """The record of ``uid``, or None when there is none."""
        try:
            return PodRecord.from_json(self.path(uid).read_text())
        except FileNotFoundError:
            return None

    def remove(self, uid: str) -> None:
        self.path(uid).unlink(missing_ok=True)

    def all(self) -> tuple[dict[str, PodRecord], dict[str, str]]:
        """Every readable record by uid, and the unreadable files with the reason."""
        records: dict[str, PodRecord] = {}
        bad: dict[str, str] = {}
        if not self.directory.is_dir():
            return records, bad
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = PodRecord.from_json(path.read_text())
            except (OSError, RecordError) as e:
                bad[path.name] = str(e)
                continue
            if path.name != f"{record.uid}.json":
                bad[path.name] = f"holds uid {record.uid!r}"
                continue
            records[record.uid] = record
        return records, bad
