"""GAMMA conformance: redirects (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.gamma.harness import (
    Case,
    Expect,
    Location,
    applied,
    converge,
    http,
    route,
)


def redirects(name: str, rules: Mapping[str, str]) -> str:
    """A route of RequestRedirect rules: path prefix -> the requestRedirect's fields (YAML)."""
    return route(
        name,
        "echo",
        "".join(
            f"- matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n"
            f"  filters: [{{type: RequestRedirect, requestRedirect: {{{redirect}}}}}]\n"
            for prefix, redirect in rules.items()
        ),
        port=80,
    )


def redirected(target: str, status: int, **location: Any) -> Case:
    return Case(target, http(target), Expect(status=status, redirect=Location(**location)))


def test_httproute_redirect_host_and_status(mesh: str, tmp_path: Path) -> None:
    """MeshHTTPRouteRedirectHostAndStatus (with the 307/308 rules of upstream's YAML)."""
    codes = {"/hostname-redirect": 302, "/host-and-status": 301}
    codes |= {"/host-and-temporary": 307, "/host-and-permanent": 308}
    manifest = redirects(
        "mesh-redirect-host-and-status",
        {p: f"statusCode: {c}, hostname: example.org" for p, c in codes.items()},
    )
    with applied(mesh, tmp_path, manifest):
        converge(mesh, [redirected(p, c, host="example.org") for p, c in codes.items()])


def test_httproute_redirect_path(mesh: str, tmp_path: Path) -> None:
    """MeshHTTPRouteRedirectPath (upstream's duplicated 307/308 rules once each)."""
    prefix = "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}"
    full = "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}"
    manifest = redirects(
        "mesh-redirect-path",
        {
            "/original-prefix": prefix,
            "/full": "path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}",
            "/path-and-host": f"hostname: example.org, {prefix}",
            "/path-and-status": f"{prefix}, statusCode: 301",
            "/path-and-temporary": f"{prefix}, statusCode: 307",
            "/path-and-permanent": f"{prefix}, statusCode: 308",
            "/full-path-and-host": f"hostname: example.org, {full}",
            "/full-path-and-status": f"{full}, statusCode: 301",
            "/full-path-and-temporary": f"{full}, statusCode: 307",
            "/full-path-and-permanent": f"{full}, statusCode: 308",
        },
    )
    replaced, whole = "/replacement-prefix", "/replacement-full"
    with applied(mesh, tmp_path, manifest):
        converge(
            mesh,
            [
                redirected("/original-prefix/lemon", 302, path=f"{replaced}/lemon"),
                redirected("/full/path/original", 302, path="/full-path-replacement"),
                redirected("/path-and-host", 302, host="example.org", path=replaced),
                redirected("/path-and-status", 301, path=replaced),
                redirected("/path-and-temporary", 307, path=replaced),
                redirected("/path-and-permanent", 308, path=replaced),
                redirected("/full-path-and-host", 302, host="example.org", path=whole),
                redirected("/full-path-and-status", 301, path=whole),
                redirected("/full-path-and-temporary", 307, path=whole),
                redirected("/full-path-and-permanent", 308, path=whole),
            ],
        )


def test_httproute_redirect_path_replace_prefix_with_slash(mesh: str, tmp_path: Path) -> None:
    """Beyond upstream: ReplacePrefixMatch '/' in a redirect, the spec's '/foo/bar' -> '/bar'."""
    manifest = redirects(
        "mesh-redirect-strip-prefix",
        {"/strip-prefix": "path: {type: ReplacePrefixMatch, replacePrefixMatch: /}"},
    )
    with applied(mesh, tmp_path, manifest):
        converge(
            mesh,
            [
                redirected("/strip-prefix/three", 302, path="/three"),
                redirected("/strip-prefix", 302, path="/"),
            ],
            timeout_s=5,
        )


def test_httproute_redirect_port(mesh: str, tmp_path: Path) -> None:
    """MeshHTTPRouteRedirectPort (and the 307/308 rules upstream does not request)."""
    codes = {"/port": 302, "/port-and-status": 301}
    codes |= {"/port-and-temporary": 307, "/port-and-permanent": 308}
    hosts = {"/port-and-host": 302, "/port-and-host-and-status": 302}
    manifest = redirects(
        "mesh-redirect-port",
        {p: f"port: 8083, statusCode: {c}" for p, c in codes.items()}
        | {p: f"port: 8083, hostname: example.org, statusCode: {c}" for p, c in hosts.items()},
    )
    with applied(mesh, tmp_path, manifest):
        converge(
            mesh,
            [redirected(p, c, port=8083) for p, c in codes.items()]
            + [redirected(p, c, host="example.org", port=8083) for p, c in hosts.items()],
        )


def test_httproute_redirect_scheme(mesh: str, tmp_path: Path) -> None:
    """MeshHTTPRouteSchemeRedirect: https, no port given, so none or 443 in Location.

    Upstream's older 307/308 cases expect host example.org, which their rules do
    not set; here they expect the request's own host.
    """
    codes = {"/scheme": 302, "/scheme-and-status": 301}
    codes |= {"/scheme-and-temporary": 307, "/scheme-and-permanent": 308}
    hosts = {"/scheme-and-host": 302, "/scheme-and-host-and-status": 302}
    manifest = redirects(
        "mesh-redirect-scheme",
        {p: f"scheme: https, statusCode: {c}" for p, c in codes.items()}
        | {p: f"scheme: https, hostname: example.org, statusCode: {c}" for p, c in hosts.items()},
    )
    with applied(mesh, tmp_path, manifest):
        converge(
            mesh,
            [redirected(p, c, scheme="https") for p, c in codes.items()]
            + [redirected(p, c, scheme="https", host="example.org") for p, c in hosts.items()],
        )


@pytest.mark.parametrize(
    ("status", "prefix"), [(303, "/redirect"), (307, "/temporary"), (308, "/permanent")]
)
def test_httproute_redirect_status_code(
    mesh: str, tmp_path: Path, status: int, prefix: str
) -> None:
    """MeshHTTPRoute303Redirect, MeshHTTPRoute307Redirect, MeshHTTPRoute308Redirect."""
    manifest = redirects(f"mesh-{status}-redirect", {prefix: f"statusCode: {status}"})
    with applied(mesh, tmp_path, manifest):
        converge(mesh, [redirected(prefix, status, path=prefix)])


@pytest.mark.parametrize("status", [303, 307, 308])
def test_httproute_redirect_host_and_status_code(mesh: str, tmp_path: Path, status: int) -> None:
    """MeshHTTPRoute{303,307,308}RedirectHostAndStatus, each with its own manifest.

    (The stored upstream 307 and 308 tests load the 303 manifest, so as stored
    they cannot pass; here each status gets its own.)
    """
    path = "/host-and-status-temporary"
    manifest = redirects(
        f"mesh-{status}-redirect-host-and-status",
        {path: f"statusCode: {status}, hostname: example.org"},
    )
    with applied(mesh, tmp_path, manifest):
        converge(mesh, [redirected(path, status, host="example.org", path=path)])


def test_httproute_additional_redirect_host_and_status(mesh: str, tmp_path: Path) -> None:
    """MeshHTTPRouteAdditionalRedirectHostAndStatus: 307 and 308 with a host, in one route."""
    codes = {"/host-and-status-temporary": 307, "/host-and-status-permanent": 308}
    manifest = redirects(
        "mesh-additional-redirect-host-and-status",
        {p: f"statusCode: {c}, hostname: example.org" for p, c in codes.items()},
    )
    with applied(mesh, tmp_path, manifest):
        converge(mesh, [redirected(p, c, host="example.org") for p, c in codes.items()])
