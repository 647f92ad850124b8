"""meshd fetches RequestAuthentications' jwksUri and inlines the keys, as istiod does.

A real JWKS server on 127.0.0.1 (aiohttp, port 0); the keys are read back from
meshd's snapshot cache: the waypoint's listener, its jwt_authn provider's
``local_jwks.inline_string``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.jwks import MAX_BYTES, JwksFetcher
from controlplane.l7.envoy import LISTENER_TYPE
from controlplane.l7.envoy_jwt import PUBLIC_ONLY_JWKS
from controlplane.meshd import Meshd, build_parser
from controlplane.state import SourceState
from tests.support.l7world import world
from tests.unit.controlplane.test_l7_request_authn import (
    GATEWAY,
    ISTIO_JWKS,
    JWT,
    OTHER_JWKS,
    REVIEWS,
    request_authn,
)

ISSUER = "testing@secure.istio.io"


class JwksServer:
    """Serves ``body`` with ``status`` on /keys; /moved redirects to /keys, /file to a
    file: URL, /slow never answers in time."""

    def __init__(self) -> None:
        self.body = ISTIO_JWKS.encode()
        self.status = 200
        self.hits = 0
        self.base = ""

    async def keys(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=self.body, status=self.status, content_type="application/json")

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/keys")

    async def file(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def openid(self, request: web.Request) -> web.Response:
        self.hits += 1
        doc = {"issuer": self.base, "jwks_uri": f"{self.base}/keys"}
        return web.json_response(doc)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=self.body)


@asynccontextmanager
async def serving() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/keys", server.keys)
    app.router.add_get("/moved", server.moved)
    app.router.add_get("/file", server.file)
    app.router.add_get("/slow", server.slow)
    app.router.add_get("/.well-known/openid-configuration", server.openid)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def state_for(uri: str, extra: str = "") -> SourceState:
    return world(
        request_authn(f"{GATEWAY}\njwtRules:\n- issuer: {ISSUER}\n  jwksUri: {uri}\n{extra}")
    )


def served_jwt(meshd: Meshd) -> jwt_pb2.JwtAuthentication:
    """The jwt_authn config of the reviews chain, as meshd's cache holds it."""
    entry = meshd.cache.snapshot.entries(LISTENER_TYPE, "shop/waypoint")["waypoint"]
    listener = listener_pb2.Listener()
    entry.resource.Unpack(listener)
    (chain,) = [c for c in listener.filter_chains if c.name == REVIEWS]
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    (jwt_filter,) = [f for f in hcm.http_filters if f.name == JWT]
    config = jwt_pb2.JwtAuthentication()
    jwt_filter.typed_config.Unpack(config)
    return config


def served_keys(meshd: Meshd) -> str:
    keys: str = served_jwt(meshd).providers["origins-0"].local_jwks.inline_string
    return keys


def condition(meshd: Meshd) -> tuple[bool, str, str]:
    (status,) = [s for s in meshd.l7.statuses if s.kind == "RequestAuthentication"]
    (c,) = status.conditions
    return c.status, c.reason, c.message


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):  # 10 s
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 10 s")


def test_before_the_first_fetch_no_token_passes_after_it_the_served_keys_are_inline() -> None:
    async def scenario() -> None:
        async with serving() as server:
            meshd = Meshd()
            uri = f"{server.base}/keys"
            meshd.on_source(state_for(uri))
            assert served_keys(meshd) == PUBLIC_ONLY_JWKS
            ok, reason, message = condition(meshd)
            assert (ok, reason) == (False, "KeysNotFetched")
            assert f"jwksUri {uri}" in message and "not fetched yet" in message
            assert "refused" in message
            assert await meshd.jwks.fetch_due()
            assert server.hits == 1
            provider = served_jwt(meshd).providers["origins-0"]
            assert provider.issuer == ISSUER
            assert provider.local_jwks.inline_string == ISTIO_JWKS
            assert not provider.HasField("remote_jwks")
            ok, reason, message = condition(meshd)
            assert (ok, reason) == (True, "Accepted")
            assert message.startswith("bound to waypoint shop/waypoint; ")
            assert f"spec.jwtRules[0]: keys fetched from {uri} at 20" in message
            assert meshd.status()["jwks"]["uris"][uri]["error"] == ""
            # Nothing is due until the refresh interval: nothing fetched again.
            assert not await meshd.jwks.fetch_due()
            assert server.hits == 1

    run(scenario)


def test_rotated_keys_are_sent_after_the_refresh_and_a_redirect_is_followed() -> None:
    async def scenario() -> None:
        async with serving() as server:
            meshd = Meshd(jwks_refresh_s=0.1)
            meshd.on_source(state_for(f"{server.base}/moved"))
            task = asyncio.ensure_future(meshd.jwks.run())
            try:
                await until(lambda: served_keys(meshd) == ISTIO_JWKS)
                server.body = OTHER_JWKS.encode()
                await until(lambda: served_keys(meshd) == OTHER_JWKS)
            finally:
                task.cancel()
            assert meshd.jwks.changes == 2

    run(scenario)


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        ({"status": 500}, "status 500"),
        ({"body": b"{not json"}, "not JSON"),
        ({"body": b'{"keys": []}'}, "not a JSON Web Key Set"),
        ({"body": b'{"kty": "RSA"}'}, "not a JSON Web Key Set"),
        ({"body": b" " * (MAX_BYTES + 1)}, f"over {MAX_BYTES}"),
        ({"path": "/file"}, "'file:///etc/passwd' is not an http or https URL"),
    ],
    ids=["500", "invalid-json", "no-keys", "not-a-set", "too-large", "redirect-to-file"],
)
def test_a_failed_refresh_keeps_the_last_good_keys_and_says_why(
    failure: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with serving() as server:
            meshd = Meshd()
            uri = f"{server.base}/keys"
            meshd.on_source(state_for(uri))
            assert await meshd.jwks.fetch_due()
            generation = meshd.cache.snapshot.generation
            if "path" in failure:  # the rule now names a URI that redirects to file:
                uri = f"{server.base}{failure['path']}"
                meshd.on_source(state_for(uri))
                assert served_keys(meshd) == PUBLIC_ONLY_JWKS  # a new URI, never fetched
                generation = meshd.cache.snapshot.generation
            server.status = failure.get("status", 200)
            server.body = failure.get("body", server.body)
            with caplog.at_level(logging.WARNING):
                assert not await meshd.jwks.fetch_due(everything=True)
            assert meshd.cache.snapshot.generation == generation
            expected = PUBLIC_ONLY_JWKS if "path" in failure else ISTIO_JWKS
            assert served_keys(meshd) == expected
            assert why in meshd.status()["jwks"]["uris"][uri]["error"]
            (line,) = [r.getMessage() for r in caplog.records if "fetch failed" in r.getMessage()]
            assert uri in line and why in line
            assert ("keeping the last good keys" in line) == ("path" not in failure)

    run(scenario)


def test_a_uri_that_never_answers_keeps_the_key_set_nobody_signs_for() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    async def scenario() -> None:
        async with serving() as server:
            for uri, extra, why in [
                (f"http://127.0.0.1:{closed}/keys", "", "ClientConnectorError"),
                (f"{server.base}/slow", "  timeout: 200ms\n", "no answer within 0.2 s"),
            ]:
                meshd = Meshd()
                meshd.on_source(state_for(uri, extra))
                assert not await meshd.jwks.fetch_due()
                assert served_keys(meshd) == PUBLIC_ONLY_JWKS
                ok, reason, message = condition(meshd)
                assert (ok, reason) == (False, "KeysNotFetched")
                assert f"jwksUri {uri}" in message and "not fetched yet" in message
                assert why in meshd.status()["jwks"]["uris"][uri]["error"]
                # Retried after retry_s (istiod: a minute), not before.
                assert not await meshd.jwks.fetch_due()
                assert meshd.jwks.fetches == 1

    run(scenario)


def test_meshd_pushes_only_when_the_keys_changed() -> None:
    async def scenario() -> None:
        async with serving() as server:
            meshd = Meshd()
            pushes: list[Any] = []
            meshd.cache.subscribe(lambda snapshot, changed: pushes.append(changed))
            meshd.on_source(state_for(f"{server.base}/keys"))
            assert await meshd.jwks.fetch_due()
            generation, updates, pushed = (
                meshd.cache.snapshot.generation,
                meshd.updates,
                len(pushes),
            )
            # The same keys, written otherwise: the same key set, nothing rebuilt or sent.
            server.body = json.dumps(json.loads(ISTIO_JWKS), indent=2).encode()
            assert not await meshd.jwks.fetch_due(everything=True)
            assert server.hits == 2
            assert (meshd.cache.snapshot.generation, meshd.updates, len(pushes)) == (
                generation,
                updates,
                pushed,
            )
            assert served_keys(meshd) == ISTIO_JWKS
            # Rotated: one rebuild, one push, of the waypoint's listener only.
            server.body = OTHER_JWKS.encode()
            assert await meshd.jwks.fetch_due(everything=True)
            assert meshd.cache.snapshot.generation == generation + 1
            assert meshd.updates == updates + 1
            assert len(pushes) == pushed + 1
            assert {(scope, t.rsplit("/", 1)[-1]) for scope, t in pushes[-1]} == {
                ("shop/waypoint", "envoy.config.listener.v3.Listener")
            }
            assert served_keys(meshd) == OTHER_JWKS
            # The rule is gone: its keys are dropped, nothing more is fetched.
            meshd.on_source(world(""))
            assert meshd.jwks.keys() == {}
            assert not await meshd.jwks.fetch_due(everything=True)
            assert server.hits == 3

    run(scenario)


def test_inline_jwks_is_not_fetched_and_the_refresh_interval_is_a_flag() -> None:
    fetcher = JwksFetcher(lambda: None)
    meshd = Meshd()
    meshd.on_source(
        world(
            request_authn(
                f"{GATEWAY}\njwtRules:\n- issuer: {ISSUER}\n  jwks: {json.dumps(ISTIO_JWKS)}\n"
                "  jwksUri: http://127.0.0.1:1/never\n"
            )
        )
    )
    assert meshd.status()["jwks"]["uris"] == {}  # inline keys win, as in Istio
    assert served_keys(meshd) == ISTIO_JWKS
    assert fetcher.refresh_s == 20 * 60
    args = build_parser().parse_args(["--source", "file:x", "--jwks-refresh-interval", "90s"])
    assert args.jwks_refresh_interval == 90.0
    assert build_parser().parse_args(["--source", "file:x"]).jwks_refresh_interval == 1200.0


def test_a_rule_without_keys_gets_them_by_openid_discovery_of_its_issuer() -> None:
    """istiod's resolveJwksURIUsingOpenID: the issuer's openid-configuration names the key
    set; meshd fetches both and inlines the keys, as for a jwksUri."""

    async def scenario() -> None:
        async with serving() as server:
            meshd = Meshd()
            meshd.on_source(
                world(request_authn(f"{GATEWAY}\njwtRules:\n- issuer: {server.base}\n"))
            )
            assert served_keys(meshd) == PUBLIC_ONLY_JWKS
            ok, reason, message = condition(meshd)
            assert (ok, reason) == (False, "KeysNotFetched") and "OpenID discovery" in message
            assert await meshd.jwks.fetch_due()
            assert server.hits == 2  # the configuration, then the keys
            assert served_keys(meshd) == ISTIO_JWKS
            ok, reason, message = condition(meshd)
            assert (ok, reason) == (True, "Accepted")
            assert f"{server.base}/.well-known/openid-configuration" in message

    run(scenario)
