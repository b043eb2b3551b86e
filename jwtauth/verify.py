"""For resource servers: verify jwtauth access tokens offline, with the issuer's JWKS fetched and cached.

    verifier = Verifier("https://auth.example.com", audience="jwtauth")
    claims = verifier.verify_access_token(token)  # raises InvalidTokenError; .description says why

This module imports only `jwtauth.tokens` and `jwtauth.errors` (so PyJWT, cryptography and the standard
library), never the server's modules: a service that verifies tokens loads no SQLite, Argon2 or
Starlette. The Starlette authentication backend is in `jwtauth.verify_starlette`.

The key set is fetched on first use, from `jwks_uri` or else from the issuer's discovery document, kept
for the `Cache-Control` max-age of its response and then revalidated with `If-None-Match` (a 304 keeps
it). A `kid` it does not know makes it fetch again before the max-age is over, since a forced rotation
can make a new key sign at once, but at most once per `refetch_interval`: tokens with made-up kids
cannot turn into a stream of requests to the issuer. If a fetch fails, the keys it has keep serving.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric import rsa

from jwtauth.errors import InvalidTokenError
from jwtauth.tokens import AccessClaims, public_keys_of, read_kid, verify_access_token

__all__ = ["Fetch", "Fetched", "InvalidTokenError", "JWKSClient", "Verifier", "fetch_url"]

log = logging.getLogger("jwtauth.verify")

MAX_DOCUMENT_BYTES = 1 << 20  # a JWKS or discovery document larger than this is refused
DEFAULT_MAX_AGE = 300.0  # seconds, for a response without Cache-Control max-age (API.md's default)
MAX_MAX_AGE = 86_400.0  # however long the issuer says, look again at least once a day
MIN_MAX_AGE = 1.0  # even `no-cache` or max-age=0: at most one fetch a second
RETRY_AFTER_FAILURE = 1.0  # seconds before a failed fetch is tried again
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Fetched:
    """An HTTP response as the JWKS client needs it: status, headers (lower-case names), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# GET url with these request headers and this timeout in seconds. Raise OSError when no response came.
Fetch = Callable[[str, Mapping[str, str], float], Fetched]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is (and so refused): keys come from the URL given, not one it points to."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def fetch_url(url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
    """GET an http(s) URL with urllib; every status, 304 and errors included, comes back as a Fetched.

    Raises:
        OSError: the URL is not http(s), the connection failed, or the body is over 1 MiB.
    """
    if not url.startswith(("https://", "http://")):  # urllib would also open file: and ftp: URLs
        raise OSError(f"refusing to fetch {url!r}: not an http(s) URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})  # noqa: S310
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, response_headers, body = response.status, response.headers, response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as error:  # urllib raises for 304 and every 4xx/5xx; they are answers
        with error:
            status, response_headers, body = error.code, error.headers, error.read(MAX_DOCUMENT_BYTES + 1)
    except http.client.HTTPException as exc:  # a malformed or cut-off response; not an OSError
        raise OSError(f"{url}: {exc!r}") from exc
    if len(body) > MAX_DOCUMENT_BYTES:
        raise OSError(f"{url}: response larger than {MAX_DOCUMENT_BYTES} bytes")
    return Fetched(status, {name.lower(): value for name, value in response_headers.items()}, body)


def max_age_of(headers: Mapping[str, str]) -> float:
    """How long a response may be used, from its Cache-Control (RFC 9111 §5.2.2.1), within 1 s to 1 day."""
    cache_control = headers.get("cache-control", "")
    if re.search(r"\bno-(?:cache|store)\b", cache_control, re.IGNORECASE):
        return MIN_MAX_AGE
    match = _MAX_AGE.search(cache_control)
    seconds = float(match.group(1)) if match else DEFAULT_MAX_AGE
    return min(max(seconds, MIN_MAX_AGE), MAX_MAX_AGE)


@dataclass(frozen=True, slots=True)
class _Cache:
    """What the client knows at one moment; replaced whole, so readers need no lock."""

    keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    etag: str | None = None
    fresh_until: float = float("-inf")  # on the client's clock
    retry_at: float = float("-inf")  # after a failed fetch: no new try before this
    refetch_at: float = float("-inf")  # after a fetch for an unknown kid: no other one before this


class JWKSClient:
    """The issuer's public keys, fetched and cached; safe to share between threads and event loops.

    `clock` is monotonic seconds (injectable for tests); `fetch` does the HTTP (fetch_url by default;
    a test can wrap it to count requests). Nothing is fetched before the first key is asked for.

    Raises:
        ValueError: neither the issuer nor the jwks_uri is given.
    """

    def __init__(
        self,
        issuer: str | None = None,
        *,
        jwks_uri: str | None = None,
        refetch_interval: float = 30.0,
        timeout: float = 5.0,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if issuer is None and jwks_uri is None:
            raise ValueError("give the issuer (for its discovery document) or the jwks_uri")
        self.issuer = issuer.rstrip("/") if issuer else None
        self.jwks_uri = jwks_uri
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._cache = _Cache()
        self._lock = threading.Lock()  # one fetch at a time; those who waited use its result

    def needs_fetch(self, kid: str) -> bool:
        """Whether get_key(kid) would do I/O now: the cache is stale, or kid is unknown and may be looked for."""
        cache, now = self._cache, self._clock()
        if now < cache.retry_at:  # a fetch failed lately: wait before the next
            return False
        return now >= cache.fresh_until or (kid not in cache.keys and now >= cache.refetch_at)

    def cached_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """The key published under kid as far as the cache knows, fresh or stale; never does I/O."""
        return self._cache.keys.get(kid)

    def get_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key published under kid, fetching the key set first if needed; None if unknown.

        Blocks while a fetch runs (at most `timeout` seconds), except that a thread whose key is cached
        uses it while another thread revalidates. Never raises: a failed fetch is logged, old keys serve.
        """
        if not self.needs_fetch(kid):
            return self.cached_key(kid)
        if not self._lock.acquire(blocking=kid not in self._cache.keys):
            return self.cached_key(kid)  # stale-while-revalidate (RFC 5861 §3): another thread fetches
        try:
            if self.needs_fetch(kid):  # another thread may have fetched while this one waited
                self._refresh(because_unknown_kid=self._clock() < self._cache.fresh_until)
            return self.cached_key(kid)
        finally:
            self._lock.release()

    async def get_key_async(self, kid: str) -> rsa.RSAPublicKey | None:
        """get_key for asyncio: a fetch runs in a worker thread, so the event loop never waits on it."""
        if not self.needs_fetch(kid):
            return self.cached_key(kid)
        return await asyncio.to_thread(self.get_key, kid)

    def _refresh(self, because_unknown_kid: bool) -> None:
        """Fetch the key set (conditionally, if one is cached) and update the cache; log a failure."""
        cache, now = self._cache, self._clock()
        if because_unknown_kid:
            cache = replace(cache, refetch_at=now + self.refetch_interval)
        try:
            uri = self.jwks_uri or self._discover_jwks_uri()
            response = self._fetch(uri, {"If-None-Match": cache.etag} if cache.etag else {}, self.timeout)
            now = self._clock()
            if response.status == 304 and cache.etag:
                cache = replace(cache, fresh_until=now + max_age_of(response.headers))
            elif response.status == 200:
                keys = public_keys_of(json.loads(response.body))
                cache = replace(cache, keys=keys, etag=response.headers.get("etag"),
                                fresh_until=now + max_age_of(response.headers))  # fmt: skip
            else:
                raise OSError(f"{uri} answered {response.status}")
        except Exception as exc:  # any failure, of the network, of the document or of a given `fetch`
            log.warning("cannot fetch the JWKS, keeping %d cached keys: %s", len(cache.keys), exc)
            cache = replace(cache, retry_at=self._clock() + RETRY_AFTER_FAILURE)
        self._cache = cache

    def _discover_jwks_uri(self) -> str:
        """Read jwks_uri from the issuer's discovery document, once (OpenID Connect Discovery §4).

        Raises:
            OSError: the document cannot be fetched.
            ValueError: it is not JSON, names another issuer (RFC 8414 §3.3) or has no http(s) jwks_uri.
        """
        url = f"{self.issuer}/.well-known/openid-configuration"
        response = self._fetch(url, {}, self.timeout)
        if response.status != 200:
            raise OSError(f"{url} answered {response.status}")
        document = json.loads(response.body)
        if not isinstance(document, dict) or document.get("issuer") != self.issuer:
            raise ValueError(f"{url} is the metadata of another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError(f"{url} has no http(s) jwks_uri")
        self.jwks_uri = jwks_uri
        return jwks_uri


class Verifier:
    """Checks jwtauth access tokens: RS256 only, `typ` at+jwt, `iss`, `aud`, `exp` and `nbf` with leeway.

    `clock` is wall-clock seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        issuer: str,
        audience: str = "jwtauth",
        *,
        jwks: JWKSClient | None = None,
        leeway: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.jwks = jwks or JWKSClient(self.issuer)
        self.leeway = leeway
        self._clock = clock

    def verify_access_token(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token; may block on a JWKS fetch.

        Raises:
            InvalidTokenError: for any failure; its `description` says which check failed (for logs:
                tell the client only `invalid_token`, RFC 6750 §3.1).
        """
        return self._verify(token, self.jwks.get_key)

    async def verify_access_token_async(self, token: str) -> AccessClaims:
        """verify_access_token for asyncio: a JWKS fetch, if one is due, runs in a worker thread.

        Raises:
            InvalidTokenError: as verify_access_token.
        """
        kid = read_kid(token)
        if kid is not None and self.jwks.needs_fetch(kid):
            return await asyncio.to_thread(self.verify_access_token, token)
        return self._verify(token, self.jwks.cached_key)  # CPU only: a signature check takes microseconds

    def _verify(self, token: str, key_for: Callable[[str], rsa.RSAPublicKey | None]) -> AccessClaims:
        # The one verification of jwtauth, shared with the server: tokens.verify_access_token.
        return verify_access_token(
            token, key_for, issuer=self.issuer, audience=self.audience, leeway=self.leeway, now=self._clock()
        )
