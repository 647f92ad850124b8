"""meshd's fetcher of RequestAuthentications' ``jwksUri``, as istiod's ``JwksResolver``.

istiod (``pilot/pkg/model/jwks_resolver.go``, with the default
``PILOT_JWT_ENABLE_REMOTE_JWKS=false``) fetches a rule's ``jwksUri`` itself and
inlines the keys in the proxies' ``local_jwks``; so does meshd:

* the URIs are those of the waypoints' RequestAuthentications' rules with a
  ``jwksUri`` and no inline ``jwks`` (:func:`controlplane.l7.request_authn.jwks_uris`),
  told by :meth:`JwksFetcher.want` at each new source state; a new one is
  fetched at once;
* each is fetched again every ``refresh_s`` (istiod's
  ``PILOT_JWT_PUB_KEY_REFRESH_INTERVAL``, 20 minutes); a failed fetch is
  retried after ``retry_s`` (istiod: one minute), doubling on each further
  failure up to an hour (istiod's backoff);
* a fetch has the rule's ``timeout`` (istiod's 5 s when none), follows at most
  5 redirects and only to http(s) URLs, takes a body of at most ``max_bytes``
  (1 MiB) that must be a JSON Web Key Set (an object with a non-empty
  ``keys`` list of objects); anything else is a failed fetch, logged with the
  URI and why (istiod keeps any 2xx body; meshd does not take what no proxy
  could use);
* a failed refresh keeps the last good keys (as istiod does); a URI never
  fetched has none, and its rules keep the key set no token verifies against;
* keys that differ from the last good ones (as JSON: istiod's
  ``compareJWKSResponse``) call ``on_change``, which rebuilds and pushes;
  nothing else does, so an unchanged refresh sends nothing.

A rule with neither ``jwks`` nor ``jwksUri`` is fetched by OpenID discovery,
as istiod does: the URI wanted is the issuer's
``/.well-known/openid-configuration``, whose ``jwks_uri`` is then fetched (the
same bounds, both steps within the one timeout); its keys are kept under the
configuration's URI. Unlike istiod, a cached key set is dropped as soon as no
rule names its URI (istiod evicts after a week unused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from controlplane.state import FetchedJwks

REFRESH_S = 20 * 60.0  # istiod's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL
RETRY_S = 60.0  # istiod's JwtPubKeyRefreshIntervalOnFailure
MAX_RETRY_S = 3600.0  # istiod's JwtPubKeyRefreshIntervalOnFailureResetThreshold
TIMEOUT_S = 5.0  # istiod's jwksHTTPTimeOutInSec
MAX_BYTES = 1 << 20
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

log = logging.getLogger("meshd.jwks")


class JwksError(Exception):
    """Why a fetch failed."""


def check_jwks(body: bytes) -> str:
    """The body as text if it is a JSON Web Key Set; raises :class:`JwksError`."""
    try:
        text = body.decode("utf-8")
        doc = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError is one
        raise JwksError(f"the body is not JSON: {e}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise JwksError('the body is not a JSON Web Key Set (an object with a "keys" list)')
    return text


async def fetch_jwks(
    session: aiohttp.ClientSession,
    uri: str,
    *,
    timeout_s: float = TIMEOUT_S,
    max_bytes: int = MAX_BYTES,
) -> str:
    """GET ``uri`` (redirects to http(s) only), bounded in time and size: the JWKS text."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(session, uri, max_bytes)
    except TimeoutError:
        raise JwksError(f"no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise JwksError(f"{type(e).__name__}: {e}") from None


OPENID_CONFIGURATION = "/.well-known/openid-configuration"


async def _fetch(session: aiohttp.ClientSession, uri: str, max_bytes: int) -> str:
    if uri.endswith(OPENID_CONFIGURATION):
        # OpenID discovery (istiod's resolveJwksURIUsingOpenID): the issuer's
        # configuration names the key set.
        config = await _get(session, uri, max_bytes)
        try:
            doc = json.loads(config.decode("utf-8"))
        except ValueError as e:
            raise JwksError(f"the OpenID configuration is not JSON: {e}") from None
        jwks_uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise JwksError("the OpenID configuration has no jwks_uri")
        return check_jwks(await _get(session, jwks_uri, max_bytes))
    return check_jwks(await _get(session, uri, max_bytes))


async def _get(session: aiohttp.ClientSession, uri: str, max_bytes: int) -> bytes:
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        if urlsplit(url).scheme not in ("http", "https"):
            raise JwksError(f"{url!r} is not an http or https URL")
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location", "")
                if not location:
                    raise JwksError(f"status {resp.status} without a Location")
                url = urljoin(url, location)
                continue
            if not 200 <= resp.status < 300:
                raise JwksError(f"status {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise JwksError(f"the body ({resp.content_length} bytes) is over {max_bytes}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise JwksError(f"the body is over {max_bytes} bytes")
            return bytes(body)
    raise JwksError(f"more than {MAX_REDIRECTS} redirects")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class JwksFetcher:
    """The key sets of the wanted jwksUri, kept fresh while :meth:`run` runs."""

    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        refresh_s: float = REFRESH_S,
        retry_s: float = RETRY_S,
        max_bytes: int = MAX_BYTES,
        logger: logging.Logger = log,
    ) -> None:
        self.on_change = on_change
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.max_bytes = max_bytes
        self.log = logger
        self._wanted: dict[str, float | None] = {}  # uri -> timeout (None: the default)
        self._keys: dict[str, FetchedJwks] = {}  # the last good keys
        self._due: dict[str, float] = {}  # uri -> when to fetch it next (monotonic)
        self._failures: dict[str, int] = {}  # uri -> failures in a row
        self._errors: dict[str, str] = {}  # uri -> why the last fetch failed
        self._wake = asyncio.Event()
        self.fetches = 0
        self.failed = 0
        self.changes = 0

    def want(self, uris: Mapping[str, float | None]) -> None:
        """The URIs to fetch now (each with its timeout); new ones are fetched at once."""
        new = set(uris) - set(self._wanted)
        self._wanted = dict(uris)
        for gone in set(self._keys) - set(uris):
            del self._keys[gone]
        for table in (self._due, self._failures, self._errors):
            for gone in set(table) - set(uris):
                del table[gone]
        if new:
            self._wake.set()

    def keys(self) -> Mapping[str, FetchedJwks]:
        """The last good key set of each wanted URI that has one."""
        return MappingProxyType({u: k for u, k in self._keys.items() if u in self._wanted})

    async def run(self) -> None:
        """Fetch what is due, forever."""
        while True:
            self._wake.clear()
            try:
                await self.fetch_due()
            except Exception:  # a failed rebuild must not end the refreshes
                self.log.exception("meshd: jwksUri: fetching or rebuilding failed")
                await asyncio.sleep(min(self.retry_s, self.refresh_s))
            now = time.monotonic()
            waits = [self._due.get(u, now) - now for u in self._wanted]
            timeout = max(0.0, min(waits)) if waits else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def fetch_due(self, *, everything: bool = False) -> bool:
        """Fetch the URIs that are due (``everything``: all wanted); calls ``on_change``
        (once) if some keys changed, and says whether they did."""
        now = time.monotonic()
        due = {u: t for u, t in self._wanted.items() if everything or self._due.get(u, 0) <= now}
        if not due:
            return False
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(self._fetch_one(session, u, t) for u, t in due.items())
            )
        if any(results):
            self.changes += 1
            self.on_change()
            return True
        return False

    async def _fetch_one(
        self, session: aiohttp.ClientSession, uri: str, timeout_s: float | None
    ) -> bool:
        self.fetches += 1
        try:
            text = await fetch_jwks(
                session, uri, timeout_s=timeout_s or TIMEOUT_S, max_bytes=self.max_bytes
            )
        except JwksError as e:
            self.failed += 1
            if uri not in self._wanted:  # no rule names it any more
                return False
            failures = self._failures.get(uri, 0) + 1
            self._failures[uri] = failures
            self._errors[uri] = str(e)
            delay = min(self.retry_s * 2 ** (failures - 1), max(MAX_RETRY_S, self.retry_s))
            self._due[uri] = time.monotonic() + delay
            kept = "keeping the last good keys" if uri in self._keys else "no keys yet"
            self.log.warning(
                "meshd: jwksUri %s: fetch failed: %s (%s; next try in %.0f s)", uri, e, kept, delay
            )
            return False
        if uri not in self._wanted:  # no rule names it any more
            return False
        self._failures.pop(uri, None)
        self._errors.pop(uri, None)
        self._due[uri] = time.monotonic() + self.refresh_s
        old = self._keys.get(uri)
        if old is not None and json.loads(old.keys) == json.loads(text):
            return False
        self._keys[uri] = FetchedJwks(keys=text, fetched=_now())
        self.log.info("meshd: jwksUri %s: %s keys", uri, "new" if old is not None else "fetched")
        return True

    def status(self) -> dict[str, Any]:
        return {
            "uris": {
                uri: {
                    "fetched": self._keys[uri].fetched if uri in self._keys else None,
                    "error": self._errors.get(uri, ""),
                }
                for uri in sorted(self._wanted)
            },
            "fetches": self.fetches,
            "failed": self.failed,
            "changes": self.changes,
        }
