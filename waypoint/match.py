"""Route selection, pure: a request's headers against one RouteConfiguration, as Envoy does.

* the virtual host by ``:authority`` (exact domain, then the longest ``*.suffix``,
  then the longest ``prefix.*``, then ``*``; the port is ignored when no
  domain names it);
* the first route whose match holds: the path (without the query string)
  by ``prefix``, ``path``, ``path_separated_prefix`` (whole segments) or an
  RE2 ``safe_regex`` over the whole path; every header matcher (a header
  repeated is matched as its values joined by ``,``); every query parameter
  matcher (the first value of the name, percent-decoded);
* the cluster of a weighted route: ``random % total_weight`` walked over the
  clusters in order, the same draw Envoy makes per stream.

No I/O, no clock, no randomness of its own: callers pass the random value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from waypoint.config.model import (
    Forward,
    HeaderMatcher,
    PathKind,
    Route,
    RouteConfig,
    RouteMatch,
    VirtualHost,
)


@dataclass(slots=True)
class RequestView:
    """What matching looks at: pseudo-headers apart, header names lower case."""

    method: str
    path: str  # the request target: path and query
    authority: str
    scheme: str
    headers: Sequence[tuple[str, str]]
    _by_name: dict[str, list[str]] | None = None
    _query: dict[str, str] | None = None

    def values(self, name: str) -> list[str] | None:
        if name.startswith(":"):
            value = {
                ":method": self.method,
                ":path": self.path,
                ":authority": self.authority,
                ":scheme": self.scheme,
            }.get(name)
            return None if value is None else [value]
        by = self._by_name
        if by is None:
            by = {}
            for k, v in self.headers:
                by.setdefault(k, []).append(v)
            self._by_name = by
        return by.get(name)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    def query(self) -> dict[str, str]:
        """Each name's first value, decoded (Envoy keeps only the first)."""
        if self._query is None:
            found: dict[str, str] = {}
            _, sep, raw = self.path.partition("?")
            if sep:
                for part in raw.split("#", 1)[0].split("&"):
                    if not part:
                        continue
                    name, _, value = part.partition("=")
                    found.setdefault(unquote(name), unquote(value))
            self._query = found
        return self._query


def select_virtual_host(config: RouteConfig, authority: str) -> VirtualHost | None:
    host = authority.lower()
    exact: VirtualHost | None = None
    suffix: tuple[int, VirtualHost] | None = None
    prefix: tuple[int, VirtualHost] | None = None
    wildcard: VirtualHost | None = None
    bare = host.rsplit(":", 1)[0] if ":" in host and not host.endswith("]") else host
    for vh in config.virtual_hosts:
        for domain in vh.domains:
            if domain == "*":
                wildcard = wildcard or vh
            elif domain in (host, bare):
                exact = exact or vh
            elif domain.startswith("*"):
                tail = domain[1:]
                for candidate in (host, bare):
                    longer = suffix is None or len(tail) > suffix[0]
                    if longer and len(candidate) > len(tail) and candidate.endswith(tail):
                        suffix = (len(tail), vh)
            elif domain.endswith("*"):
                head = domain[:-1]
                for candidate in (host, bare):
                    longer = prefix is None or len(head) > prefix[0]
                    if longer and len(candidate) > len(head) and candidate.startswith(head):
                        prefix = (len(head), vh)
    if exact is not None:
        return exact
    if suffix is not None:
        return suffix[1]
    if prefix is not None:
        return prefix[1]
    return wildcard


def header_matches(request: RequestView, h: HeaderMatcher) -> bool:
    """Envoy's HeaderUtility::matchHeaders."""
    values = request.values(h.name)
    if values is None and not h.missing_as_empty:
        if h.matcher is None:
            return h.present if h.invert else not h.present
        return False  # a missing header never matches a string, inverted or not
    value = ",".join(values) if values else ""
    matched = h.present if h.matcher is None else h.matcher.matches(value)
    return matched != h.invert


def path_matches(m: RouteMatch, path: str) -> bool:
    kind = m.kind
    if kind is PathKind.REGEX:
        return m.regex.fullmatch(path) is not None
    value = m.value
    if not m.case_sensitive:
        path, value = path.lower(), value.lower()
    if kind is PathKind.PREFIX:
        return path.startswith(value)
    if kind is PathKind.PATH:
        return path == value
    return path == value or path.startswith(value + "/")


def route_matches(m: RouteMatch, request: RequestView) -> bool:
    if not path_matches(m, request.path_only):
        return False
    for h in m.headers:
        if not header_matches(request, h):
            return False
    if m.query:
        query = request.query()
        for q in m.query:
            value = query.get(q.name)
            if value is None:
                return False
            if q.matcher is not None and not q.matcher.matches(value):
                return False
    return True


def select_route(config: RouteConfig, request: RequestView) -> Route | None:
    vhost = select_virtual_host(config, request.authority)
    if vhost is None:
        return None
    for route in vhost.routes:
        if route_matches(route.match, request):
            return route
    return None


def pick_cluster(action: Forward, random_value: int) -> str:
    """The cluster of this request: weighted clusters as Envoy's pickWeightedCluster."""
    clusters = action.clusters
    if len(clusters) == 1 or action.total_weight <= 0:
        return clusters[0][0]
    selected = random_value % action.total_weight
    upper = 0
    for name, weight in clusters:
        upper += weight
        if selected < upper:
            return name
    return clusters[-1][0]


def normalize_path(path: str) -> str:
    """RFC 3986 section 5.2.4, the dot segments removed (HCM ``normalize_path``).

    The query string is left alone; a path that is not absolute is returned as is.
    """
    raw, sep, query = path.partition("?")
    if not raw.startswith("/") or ("/." not in raw):
        return path
    out: list[str] = []
    segments = raw.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out) + (sep + query if sep else "")


def first_matching(routes: Iterable[Route], request: RequestView) -> Route | None:
    for route in routes:
        if route_matches(route.match, request):
            return route
    return None


def header_dict(headers: Sequence[tuple[str, str]]) -> Mapping[str, str]:
    """Headers by name, repeated ones joined with ``,`` (for logs and explanations)."""
    joined: dict[str, str] = {}
    for k, v in headers:
        joined[k] = f"{joined[k]},{v}" if k in joined else v
    return joined
