"""Header and URL rules of Envoy's router, pure: mutations, rewrites, redirect locations."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence

from waypoint.config.model import (
    AppendAction,
    HeaderMutation,
    PathKind,
    Redirect,
    RouteMatch,
)
from waypoint.http.messages import Headers

_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``date`` header value, computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def mutate(headers: Headers, mutation: HeaderMutation) -> Headers:
    """Envoy's HeaderParser: the removals first, then each addition by its append action."""
    if not mutation:
        return headers
    if mutation.remove:
        drop = set(mutation.remove)
        headers = [(k, v) for k, v in headers if k not in drop]
    for name, value, action in mutation.add:
        present = any(k == name for k, _ in headers)
        if action is AppendAction.APPEND_IF_EXISTS_OR_ADD:
            headers.append((name, value))
        elif action is AppendAction.ADD_IF_ABSENT:
            if not present:
                headers.append((name, value))
        elif action is AppendAction.OVERWRITE_IF_EXISTS_OR_ADD or present:
            headers = [(k, v) for k, v in headers if k != name]
            headers.append((name, value))
    return headers


def matched_prefix(match: RouteMatch, path: str) -> str:
    """The part of ``path`` the route's prefix (or exact path) matched."""
    if match.kind in (PathKind.PREFIX, PathKind.SEPARATED_PREFIX, PathKind.PATH):
        return path[: len(match.value)]
    return ""


def rewrite_path(
    target: str,
    match: RouteMatch,
    prefix: str | None,
    regex: tuple[object, str] | None,
) -> str:
    """The request target after ``prefix_rewrite`` or ``regex_rewrite`` (query kept)."""
    path, sep, query = target.partition("?")
    if prefix is not None and match.kind is not PathKind.REGEX:
        path = prefix + path[len(matched_prefix(match, path)) :]
    elif regex is not None:
        pattern, substitution = regex
        path = pattern.sub(substitution, path)  # type: ignore[attr-defined]
    return path + (sep + query if sep else "")


def shadow_host(authority: str) -> str:
    """Envoy's mirror Host: ``-shadow`` appended to the host name, before any port."""
    if authority.startswith("["):
        return authority  # IPv6 literals are left alone
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"


def _request_host(authority: str, scheme: str, new_scheme: str, new_port: int | None) -> str:
    """Envoy's processRequestHost: drop the request's port when a new one is given, or
    when the scheme changes and the port was the old scheme's default."""
    if authority.startswith("["):
        end = authority.rfind("]:")
        end = end + 1 if end != -1 else -1
    else:
        end = authority.rfind(":")
    if end == -1:
        return authority
    port = authority[end:]
    remove = new_port is not None
    if new_scheme != scheme:
        remove = (
            remove or (scheme == "https" and port == ":443") or (scheme == "http" and port == ":80")
        )
    return authority[:end] if remove else authority


def redirect_location(
    r: Redirect, match: RouteMatch, authority: str, target: str, scheme: str
) -> str:
    """The ``location`` of a redirect, as Envoy builds it (Utility::newUri)."""
    new_scheme = r.scheme or scheme
    host = r.host if r.host is not None else _request_host(authority, scheme, new_scheme, r.port)
    port = f":{r.port}" if r.port is not None else ""
    path, sep, query = target.partition("?")
    if r.path is not None:
        new_path = r.path
        if "?" in new_path:
            sep, query = "", ""
    elif r.prefix_rewrite is not None and match.kind is not PathKind.REGEX:
        new_path = r.prefix_rewrite + path[len(matched_prefix(match, path)) :]
    elif r.regex_rewrite is not None:
        pattern, substitution = r.regex_rewrite
        new_path = pattern.sub(substitution, path)
    else:
        new_path = path
    if not new_path.startswith("/"):
        new_path = "/" + new_path
    if r.strip_query:
        sep, query = "", ""
    return f"{new_scheme}://{host}{port}{new_path}{sep}{query}"


def first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None
