"""Errors of the mesh model."""

from __future__ import annotations


class InvalidResource(ValueError):
    """One resource (a workload, a service, a policy) is malformed.

    It is refused alone: the rest of a batch is still applied. ``name`` is the
    resource's xDS name, so a NACK and a log line can say which one.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")
