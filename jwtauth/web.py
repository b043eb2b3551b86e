"""HTTP plumbing shared by the endpoints: request parsing, middleware, and errors rendered as JSON."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Protocol

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jwtauth.config import IPNetwork
from jwtauth.errors import (
    AuthError,
    BodyTooLargeError,
    InvalidRequestError,
    InvalidTokenError,
    UnsupportedMediaTypeError,
)
from jwtauth.logs import REQUEST_ID

log = logging.getLogger("jwtauth")

MAX_BODY_BYTES = 16_384
MAX_PARAM_LENGTH = 4096  # a text field other than email, password and name (tokens, grant types)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)  # RFC 6750 §2.1 b64token


# Request parsing


def parse_bearer(authorization: str | None) -> str:
    """Return the token of an `Authorization: Bearer <token>` header.

    Raises:
        InvalidTokenError: the header is missing, empty, of another scheme or malformed.
    """
    match = _BEARER.fullmatch(authorization.strip()) if authorization else None
    if match is None:
        raise InvalidTokenError("missing or malformed bearer token")
    return match.group(1)


async def read_params(request: Request) -> Mapping[str, object]:
    """Return the fields of a JSON object or form-encoded body; an empty body, of any type, gives none.

    Raises:
        InvalidRequestError: malformed JSON, JSON not in UTF-8, not an object, or a repeated form field
            (RFC 6749 §3.2).
        UnsupportedMediaTypeError: a body of another content type.
        BodyTooLargeError: the body is over 16 KiB.
    """
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        body = await request.body()
    except ClientDisconnect:
        raise InvalidRequestError("the client went away before its body arrived") from None
    if not body:
        return {}
    if content_type == "application/json":
        try:
            params = json.loads(_utf8_text(body))
        except (ValueError, RecursionError):
            raise InvalidRequestError("malformed JSON body") from None
        if not isinstance(params, dict):
            raise InvalidRequestError("the JSON body must be an object")
        return params
    if content_type == "application/x-www-form-urlencoded":
        form = await request.form()
        if any(len(form.getlist(key)) > 1 for key in form):
            raise InvalidRequestError("a parameter was sent more than once")
        return dict(form)
    raise UnsupportedMediaTypeError("send application/json or application/x-www-form-urlencoded")


def _utf8_text(body: bytes) -> str:
    """The text of a JSON body, which must be UTF-8 (RFC 8259 §8.1; a leading byte order mark may be ignored).

    json.loads would also read UTF-16 and UTF-32, which a filter in front of us that reads UTF-8 does not see
    through. Their bytes are not UTF-8, or they hold NULs, which JSON text in UTF-8 cannot hold raw.

    Raises:
        InvalidRequestError: the body is in another encoding.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise InvalidRequestError("the JSON body must be UTF-8 (RFC 8259 §8.1)")
    return text


def text_param(
    params: Mapping[str, object], name: str, max_length: int = MAX_PARAM_LENGTH, required: bool = True
) -> str:
    """Return a string field: required and non-blank, or else "" when missing.

    Raises:
        InvalidRequestError: missing or blank (if required), not a string, too long, or holding a NUL or
            unpaired surrogate.
    """
    value = params.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidRequestError(f"missing {name}")
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    if len(value) > max_length:
        raise InvalidRequestError(f"{name} is longer than {max_length} characters")
    if "\x00" in value or not _is_utf8(value):
        raise InvalidRequestError(f"{name} holds characters that are not allowed")
    return value


def _is_utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class Observer(Protocol):
    """What Envelope reports each request to (metrics.Metrics)."""

    def observe(self, path: str, method: str, status: int, seconds: float) -> None: ...


class Gate(Protocol):
    """What Envelope hands a request with an Origin header to (browser.Browser): it answers the request
    itself, or runs `app` on it."""

    async def __call__(self, origin: bytes, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None: ...


class Envelope:
    """The outermost layer of every request. It gives the request an id (`request.state.request_id`, the
    `X-Request-ID` header, every log line); refuses a body over `max_body_bytes` with 413, whether announced
    by Content-Length or sent chunked; answers an unexpected exception with a JSON 500 naming the id,
    logged once with its traceback, so the client sees no trace; and reports the request, its status and
    its time to the observer in the app's state (`metrics`). A request with an Origin header goes through
    the `gate` (browser.Browser), its 413 and 500 too. One layer, since each costs time."""

    def __init__(self, app: ASGIApp, gate: Gate | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.gate = gate
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = secrets.token_hex(16)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        REQUEST_ID.set(request_id)  # for every log line of this request, in threads too (anyio copies context)
        status = 0
        received = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLargeError("request body too large")  # rendered by the app's AuthError handler
            return message

        too_much, origin = self._read_head(scope)
        try:
            app = error_response(BodyTooLargeError("request body too large")) if too_much else self.app
            await self._forward(origin, app, scope, receive_limited, send_with_id)
        except Exception as exc:
            log.error("unhandled error, request_id=%s", request_id, exc_info=exc)
            if not status:  # else too late for a 500: the server closes the connection
                body = {"error": "server_error", "error_description": "internal error", "request_id": request_id}
                error = JSONResponse(body, 500, {"Cache-Control": "no-store"})
                await self._forward(origin, error, scope, receive, send_with_id)
        finally:
            observer: Observer | None = state.get("metrics")
            if observer is not None:
                observer.observe(scope["path"], scope["method"], status or 500, time.perf_counter() - started)

    async def _forward(self, origin: bytes | None, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if origin is None or self.gate is None:  # servers, native apps, curl: no browser, no CORS
            await app(scope, receive, send)
        else:
            await self.gate(origin, app, scope, receive, send)

    def _read_head(self, scope: Scope) -> tuple[bool, bytes | None]:
        """Whether a Content-Length announces too much, and the Origin header; in one pass over the headers."""
        too_much, origin = False, None
        for name, value in scope["headers"]:
            if name == b"content-length":
                too_much = too_much or not value.isdigit() or int(value) > self.max_body_bytes
            elif name == b"origin" and origin is None:
                origin = value
        return too_much, origin


# Responses and error rendering


def error_response(exc: AuthError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON answer to an AuthError (RFC 6749 §5.2), with a Bearer challenge on a 401 (RFC 6750 §3)."""
    body = {"error": exc.error, "error_description": exc.description or exc.error}
    all_headers = {"Cache-Control": "no-store", **(headers or {})}
    if exc.status_code == 401:
        all_headers["WWW-Authenticate"] = f'Bearer error="{exc.error}"'  # RFC 6750 §3
    return JSONResponse(body, exc.status_code, all_headers)


async def render_auth_error(request: Request, exc: Exception) -> Response:
    """Turn an AuthError into OAuth-style JSON (RFC 6749 §5.2, RFC 6750 §3.1)."""
    assert isinstance(exc, AuthError)
    if exc.status_code == 401:
        log.info("bearer token rejected: %s", exc.description)  # the client is told only invalid_token
        exc = InvalidTokenError("the access token is invalid, expired or revoked")
    return error_response(exc, {"Retry-After": str(exc.retry_after)} if exc.retry_after else None)


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}


async def render_http_error(request: Request, exc: Exception) -> Response:
    """Turn Starlette's 404, 405 (with its Allow header) and friends into the same JSON shape."""
    assert isinstance(exc, HTTPException)
    error = AuthError(exc.detail)
    error.error = _HTTP_ERRORS.get(exc.status_code, "invalid_request")
    error.status_code = exc.status_code
    return error_response(error, exc.headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header matches our entity tag (RFC 9110 §13.1.2: weak comparison, `*`)."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def client_address(request: Request, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not a trusted proxy (the ones to its left could be made up by the client). A hop
    that is not an IP address is not believed (a proxy may pass on what its client wrote) and is skipped.
    Addresses are canonical (no port, no zone, one spelling of IPv6, an IPv4-mapped IPv6 address as IPv4), so
    one client counts as one and no made-up text reaches a log line."""
    peer = request.client.host if request.client else ""
    peer_ip = _ip_address(peer)
    if peer_ip is None:
        return peer  # from the socket, not the client: a test client, a Unix socket, a link-local peer's zone
    if not _is_trusted(peer_ip, trusted_proxies):
        return str(peer_ip)
    hops = [_ip_address(hop) for header in request.headers.getlist("x-forwarded-for") for hop in header.split(",")]
    untrusted = (hop for hop in reversed(hops) if hop is not None and not _is_trusted(hop, trusted_proxies))
    return str(next(untrusted, peer_ip))


def _ip_address(text: str) -> IPAddress | None:
    """`203.0.113.7:5000` → 203.0.113.7, `[2001:DB8::1]:80` → 2001:db8::1, `::ffff:192.0.2.1` → 192.0.2.1;
    None for anything else, such as an address with a zone (`fe80::1%eth0`: ipaddress takes any text as a zone,
    new lines too, and a zone means nothing beyond the host that wrote it)."""
    text = text.strip()
    host = text.rpartition(":")[0] if text.count(":") == 1 else text  # IPv4 with a port
    host = host.removeprefix("[").partition("]")[0] if host.startswith("[") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return None if ip.scope_id is not None else ip.ipv4_mapped or ip
    return ip


def _is_trusted(ip: IPAddress, trusted_proxies: tuple[IPNetwork, ...]) -> bool:
    return any(ip in network for network in trusted_proxies)
