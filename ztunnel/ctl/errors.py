"""Errors of ``ztunnel-ctl``: each says what was tried, and what to do about it."""

from __future__ import annotations


class CtlError(Exception):
    """The command could not get an answer (exit code 3).

    ``hint`` is the operator's next step, printed after the message.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)
