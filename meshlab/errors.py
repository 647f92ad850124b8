"""Errors of meshlab. Each says what failed and what the operator can do next."""

from __future__ import annotations


class MeshlabError(Exception):
    """Base of meshlab's errors; the CLI prints the message and exits non-zero."""


class NotRootError(MeshlabError):
    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to manage network "
            "namespaces; run it as root"
        )


class ClusterExistsError(MeshlabError):
    """``up`` found a cluster, or a crashed cluster's leftovers, with the same name."""


class ClusterNotFoundError(MeshlabError):
    """No cluster matches the name given (or none, or several, are running)."""


class CniError(MeshlabError):
    """A CNI plugin failed; carries the plugin's own error code and message."""

    def __init__(self, plugin: str, command: str, code: int | None, msg: str) -> None:
        self.plugin = plugin
        self.code = code
        detail = f" (CNI error code {code})" if code is not None else ""
        super().__init__(f"CNI plugin {plugin!r} {command} failed{detail}: {msg}")


class HostToolMissingError(MeshlabError):
    """A program meshlab runs is not installed."""
