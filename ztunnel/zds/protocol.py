"""The ZDS messages and the proxy's side of the exchange, without I/O."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh.proto.istio.workload import zds_pb2 as pb

MAX_PACKET = 64 * 1024  # far above any real message; a bigger one is refused


class ZdsError(Exception):
    """The exchange failed: the peer refused, or said something it should not."""


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the node agent tells the proxy about a pod."""

    name: str
    namespace: str
    service_account: str


# -- what the proxy is asked to do ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add:
    uid: str
    pod: PodInfo
    netns_fd: int  # the proxy owns it now: it must close it


@dataclass(frozen=True, slots=True)
class Keep:
    uid: str


@dataclass(frozen=True, slots=True)
class Delete:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotDone:
    pass


Request = Add | Keep | Delete | SnapshotDone


# -- encoding ---------------------------------------------------------------------------


def hello() -> bytes:
    return pb.ZdsHello(version=pb.V1).SerializeToString()


def check_hello(data: bytes) -> None:
    try:
        message = pb.ZdsHello.FromString(data)
    except DecodeError as e:
        raise ZdsError(f"the first packet is not a ZdsHello: {e}") from e
    if message.version != pb.V1:
        raise ZdsError(f"unsupported ZDS version {message.version} (this agent speaks V1)")


def encode_add(uid: str, pod: PodInfo) -> bytes:
    info = pb.WorkloadInfo(
        name=pod.name, namespace=pod.namespace, service_account=pod.service_account
    )
    return pb.WorkloadRequest(add=pb.AddWorkload(uid=uid, workload_info=info)).SerializeToString()


def encode_keep(uid: str) -> bytes:
    return pb.WorkloadRequest(keep=pb.KeepWorkload(uid=uid)).SerializeToString()


def encode_delete(uid: str) -> bytes:
    message = pb.WorkloadRequest()
    getattr(message, "del").CopyFrom(pb.DelWorkload(uid=uid))  # "del" is a Python keyword
    return message.SerializeToString()


def encode_snapshot_sent() -> bytes:
    return pb.WorkloadRequest(snapshot_sent=pb.SnapshotSent()).SerializeToString()


def encode_ack(error: str = "") -> bytes:
    return pb.WorkloadResponse(ack=pb.Ack(error=error)).SerializeToString()


def decode_ack(data: bytes) -> str:
    """The error the proxy reported ("" for success); raises on anything but an ack."""
    try:
        message = pb.WorkloadResponse.FromString(data)
    except DecodeError as e:
        raise ZdsError(f"the proxy's answer is not a WorkloadResponse: {e}") from e
    if message.WhichOneof("payload") != "ack":
        raise ZdsError("the proxy's answer is not an ack")
    return message.ack.error


def decode_request(data: bytes, fds: Sequence[int]) -> Request:
    """One request from the node agent. Raises :class:`ZdsError` (closing any stray
    descriptors) for anything malformed: the caller acks the error and goes on."""
    try:
        try:
            message = pb.WorkloadRequest.FromString(data)
        except DecodeError as e:
            raise ZdsError(f"not a WorkloadRequest: {e}") from e
        kind = message.WhichOneof("payload")
        if kind == "add":
            add = message.add
            if not add.uid:
                raise ZdsError("AddWorkload without a uid")
            if len(fds) != 1:
                raise ZdsError(f"AddWorkload {add.uid} came with {len(fds)} descriptors, not 1")
            info = add.workload_info
            pod = PodInfo(info.name, info.namespace, info.service_account)
            return Add(add.uid, pod, fds[0])
        if fds:
            raise ZdsError(f"{kind or 'an empty request'} came with descriptors")
        if kind == "keep":
            return Keep(_uid(message.keep.uid, "KeepWorkload"))
        if kind == "del":
            return Delete(_uid(getattr(message, "del").uid, "DelWorkload"))
        if kind == "snapshot_sent":
            return SnapshotDone()
        raise ZdsError("an empty WorkloadRequest")
    except ZdsError:
        for fd in fds:
            os.close(fd)
        raise


def _uid(uid: str, what: str) -> str:
    if not uid:
        raise ZdsError(f"{what} without a uid")
    return uid
