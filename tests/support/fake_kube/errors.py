"""The API's errors: ``metav1.Status`` bodies, and the exception that carries one to the
handler, which answers with its code."""

from __future__ import annotations

from tests.support.fake_kube.resources import Obj, Resource, qualified


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A ``metav1.Status``, the body of every API error."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    def __init__(self, body: Obj) -> None:
        super().__init__(body["message"])
        self.body = body


def conflict(res: Resource, name: str) -> Obj:
    message = (
        f'Operation cannot be fulfilled on {qualified(res)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    details = {"name": name, "group": res.group, "kind": res.plural}
    return status(409, "Conflict", message, details)


def already_exists(res: Resource, name: str) -> Obj:
    details = {"name": name, "group": res.group, "kind": res.plural}
    return status(409, "AlreadyExists", f'{qualified(res)} "{name}" already exists', details)


def not_found(res: Resource, name: str) -> Obj:
    details = {"name": name, "kind": res.plural}
    return status(404, "NotFound", f'{res.plural} "{name}" not found', details)
