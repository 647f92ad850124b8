"""Errors of the cluster description and of the state file."""

from __future__ import annotations


class ClusterError(Exception):
    """Base of every error about a cluster description or its state."""


class ClusterSpecError(ClusterError, ValueError):
    """A cluster description is invalid.

    ``path`` names the offending field the way a user finds it in the YAML
    (``pods[2].node``); the message says what is wrong and what would be valid.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)


class StateFileError(ClusterError):
    """A cluster state file is missing, unreadable or not in the expected shape."""
