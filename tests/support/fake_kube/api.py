"""The API's verbs on the store, as the handler threads call them: list (pagination with
``limit``/``continue``), get, create, replace and patch (preconditions, the status
subresource), and delete (preconditions, propagation)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tests.support.fake_kube.errors import (
    ApiError,
    already_exists,
    conflict,
    not_found,
    status,
)
from tests.support.fake_kube.resources import RESOURCES, Obj, qualified, render
from tests.support.fake_kube.selectors import selector_for
from tests.support.fake_kube.store import Store
from tests.support.fake_kube.strategy import (
    POD_STATUS_KEEPS,
    defaults,
    keep_cluster_ip,
    validate,
)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class Api(Store):
    """The store with the API's verbs, which the handler threads call (each raises
    ``ApiError`` with the Status the API server would answer)."""

    def _list(self, resource: str, namespace: str | None, query: Mapping[str, str]) -> Obj:
        res = RESOURCES[resource]
        with self._cond:
            store = self._stores[resource]
            token = query.get("continue")
            if token:
                if token not in self._continues:
                    raise ApiError(status(410, "Expired", "continue token unknown"))
                rv, listed, items = self._continues.pop(token)
                if listed != resource or rv < store.floor:
                    raise ApiError(
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent "
                            "list result. You can start a new list without the continue parameter.",
                        )
                    )
            else:
                rv = self._rv
                selects = selector_for(resource, query)
                items = [
                    copy.deepcopy(obj)
                    for key, obj in sorted(store.objects.items())
                    if (namespace is None or key[0] == namespace) and selects(obj)
                ]
            limit = int(query.get("limit") or 0)
            meta: Obj = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                items, rest = items[:limit], items[limit:]
                token = uuid.uuid4().hex
                self._continues[token] = (rv, resource, rest)
                meta["continue"] = token
                meta["remainingItemCount"] = len(rest)
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": [render(res, obj, in_list=True) for obj in items],
        }

    def _get_one(self, resource: str, namespace: str | None, name: str) -> Obj:
        res = RESOURCES[resource]
        with self._cond:
            obj = self._stores[resource].objects.get((namespace or "", name))
            if obj is None:
                raise ApiError(not_found(res, name))
            return render(res, copy.deepcopy(obj))

    def _create(self, resource: str, namespace: str | None, body: Obj) -> Obj:
        res = RESOURCES[resource]
        meta = body.setdefault("metadata", {})
        name = meta.get("name") or ""
        if namespace is not None and meta.setdefault("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the namespace sent "
            raise ApiError(status(400, "BadRequest", message + "on the request"))
        if not name:
            message = f'{res.kind} "" is invalid: metadata.name: Required value: name is required'
            raise ApiError(status(422, "Invalid", message))
        for server_filled in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
            meta.pop(server_filled, None)
        body.pop("kind", None)
        body.pop("apiVersion", None)
        validate(res, body)
        defaults(resource, body)
        with self._cond:
            try:
                return render(res, self.add(resource, body))
            except KeyError:
                raise ApiError(already_exists(res, name)) from None

    def _write(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        subresource: str,
        change: Callable[[Obj], Obj],
    ) -> Obj:
        """PUT and PATCH: ``change`` turns the stored object into the new one; the server
        checks the precondition, keeps what a client may not change, and records it."""
        res = RESOURCES[resource]
        key = (namespace or "", name)
        with self._cond:
            current = self._stores[resource].objects.get(key)
            if current is None:
                raise ApiError(not_found(res, name))
            new = change(copy.deepcopy(current))
            meta = new.setdefault("metadata", {})
            old_meta = current["metadata"]
            wanted_rv = meta.get("resourceVersion")
            if wanted_rv and wanted_rv != old_meta["resourceVersion"]:
                raise ApiError(conflict(res, name))
            if meta.get("name", name) != name or meta.get("namespace", key[0]) != key[0]:
                raise ApiError(status(400, "BadRequest", "the name of the object does not match"))
            new.pop("kind", None)
            new.pop("apiVersion", None)
            validate(res, new)
            if subresource == "status":
                # Only the status changes through /status; for a pod its metadata too
                # (Kubernetes' podStatusStrategy resets only the spec and ownerReferences),
                # which is how istio-cni annotates pods with pods/status rights alone.
                taken = {**copy.deepcopy(current), "status": new.get("status") or {}}
                if resource == "pods":
                    taken["metadata"] = {
                        **new.get("metadata", {}),
                        **{k: v for k, v in old_meta.items() if k in POD_STATUS_KEEPS},
                    }
                    for k in POD_STATUS_KEEPS - set(old_meta):
                        taken["metadata"].pop(k, None)
                new = taken
            else:
                if res.status:
                    new["status"] = copy.deepcopy(current.get("status") or {})
                    if "status" not in current:
                        new.pop("status")
                for kept in ("uid", "creationTimestamp", "managedFields", "generation"):
                    if kept in old_meta:
                        meta[kept] = old_meta[kept]
                    else:
                        meta.pop(kept, None)
                meta["name"] = name
                if res.namespaced:
                    meta["namespace"] = key[0]
                defaults(resource, new)
                if resource == "services":
                    keep_cluster_ip(current, new)
                asked = {k: v for k, v in new.items() if k not in ("metadata", "status")}
                before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
                if "generation" in old_meta and asked != before:
                    meta["generation"] = old_meta["generation"] + 1
            new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
            if new == current:
                return render(res, copy.deepcopy(current))  # a no-op write: no new version
            written = self._record(resource, "MODIFIED", key, new)
            self._collect(resource, key)
            return render(res, written)

    def _replace(
        self, resource: str, namespace: str | None, name: str, subresource: str, body: Obj
    ) -> Obj:
        return self._write(resource, namespace, name, subresource, lambda _: body)

    def _patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        subresource: str,
        body: Obj,
        content_type: str,
    ) -> Obj:
        res = RESOURCES[resource]
        media = content_type.split(";")[0].strip().lower()
        if media == STRATEGIC_MERGE_PATCH and not res.builtin:
            raise ApiError(
                status(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/json-patch+json, {MERGE_PATCH}, "
                    "application/apply-patch+yaml",
                )
            )
        if media not in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            raise ApiError(
                status(415, "UnsupportedMediaType", f"fake_kube does not implement {media!r}")
            )
        if not isinstance(body, dict):
            raise ApiError(status(400, "BadRequest", "a merge patch must be a JSON object"))
        return self._write(resource, namespace, name, subresource, lambda obj: _merge(obj, body))

    def _delete_request(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        options: Obj,
        query: Mapping[str, str],
    ) -> Obj:
        res = RESOURCES[resource]
        key = (namespace or "", name)
        propagation = options.get("propagationPolicy") or query.get("propagationPolicy")
        with self._cond:
            current = self._stores[resource].objects.get(key)
            if current is None:
                raise ApiError(not_found(res, name))
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            for field_name in ("uid", "resourceVersion"):
                if pre.get(field_name) and pre[field_name] != meta.get(field_name):
                    raise ApiError(
                        status(
                            409,
                            "Conflict",
                            f'Operation cannot be fulfilled on {qualified(res)} "{name}": '
                            f"Precondition failed: {field_name.title()} in precondition: "
                            f"{pre[field_name]}, {field_name.title()} in object meta: "
                            f"{meta.get(field_name)}",
                            {"name": name, "group": res.group, "kind": res.plural},
                        )
                    )
            self._delete(resource, key, str(propagation or "Background"))
        details = {"name": name, "group": res.group, "kind": res.plural, "uid": meta.get("uid")}
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out
