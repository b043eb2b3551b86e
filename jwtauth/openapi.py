"""The shared parts of the OpenAPI document; the endpoints' docstrings (YAML after `---`) hold the rest."""

from __future__ import annotations

from typing import Any

from jwtauth import __version__
from jwtauth.browser import COOKIE
from jwtauth.emails import MAX_EMAIL_LENGTH
from jwtauth.passwords import MAX_PASSWORD_LENGTH
from jwtauth.service import MAX_NAME_LENGTH
from jwtauth.web import MAX_PARAM_LENGTH


def _string(max_length: int, **more: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, **more}


def _object(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _body(
    schema: str,
    media_types: tuple[str, ...] = ("application/json", "application/x-www-form-urlencoded"),
    required: bool = True,
) -> dict[str, Any]:
    """A request body of the named schema: every endpoint with a body takes JSON and form alike."""
    content = {media_type: {"schema": {"$ref": f"#/components/schemas/{schema}"}} for media_type in media_types}
    return {"required": required, "content": content}


BASE: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "jwtauth",
        "version": __version__,
        "description": "Logins with Argon2, RS256 access tokens (RFC 9068), rotating refresh tokens, JWKS.",
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "refreshCookie": {  # /logout from an allowed origin (API.md "Browser apps")
                "type": "apiKey",
                "in": "cookie",
                "name": COOKIE,
                "description": "The refresh-token cookie; taken only from an origin in JWTAUTH_CORS_ORIGINS.",
            },
        },
        "parameters": {
            "RefreshCookie": {
                "name": COOKIE,
                "in": "cookie",
                "required": False,
                "schema": {"type": "string"},
                "description": "The refresh token of a browser app (HttpOnly), used when the body names no token;"
                " taken only from an origin in JWTAUTH_CORS_ORIGINS (or the issuer's own) and ignored without"
                " an Origin header.",
            }
        },
        "schemas": {
            "Error": _object(
                ["error", "error_description"],
                error={"type": "string"},
                error_description={"type": "string"},
                request_id={"type": "string"},
            ),
            "TokenPair": _object(
                ["access_token", "token_type", "expires_in", "refresh_expires_in"],  # refresh_token: see Set-Cookie
                access_token={"type": "string"},
                token_type={"type": "string", "enum": ["Bearer"]},
                expires_in={"type": "integer"},
                refresh_token={"type": "string"},
                refresh_expires_in={"type": "integer"},
            ),
            "Login": _object(
                ["email", "password"], email=_string(MAX_EMAIL_LENGTH), password=_string(MAX_PASSWORD_LENGTH)
            ),
            "Registration": _object(
                ["email", "password"],
                email=_string(MAX_EMAIL_LENGTH),
                password=_string(MAX_PASSWORD_LENGTH),
                name={"type": "string", "maxLength": MAX_NAME_LENGTH},
            ),
            "User": _object(
                ["id", "email", "name"], id={"type": "string"}, email={"type": "string"}, name={"type": "string"}
            ),
            "Refresh": _object([], refresh_token=_string(MAX_PARAM_LENGTH)),  # or the cookie, from a browser
            "Revoke": _object(
                [],  # or the cookie, from a browser
                token=_string(MAX_PARAM_LENGTH),
                token_type_hint={"type": "string", "enum": ["access_token", "refresh_token"]},
            ),
            "Logout": _object([], scope={"type": "string", "enum": ["local", "global"]}),
            "Token": _object(
                ["grant_type"],
                grant_type={"type": "string", "enum": ["refresh_token", "password"]},
                refresh_token=_string(MAX_PARAM_LENGTH),
                username=_string(MAX_EMAIL_LENGTH),
                password=_string(MAX_PASSWORD_LENGTH),
            ),
            "UserInfo": _object(
                ["sub", "email", "name"], sub={"type": "string"}, email={"type": "string"}, name={"type": "string"}
            ),
            "JWKS": _object(["keys"], keys={"type": "array", "items": {"type": "object"}}),
            "Metadata": _object(["issuer", "token_endpoint", "jwks_uri"], issuer={"type": "string"}),
            "Empty": {"type": "object", "additionalProperties": False},
            "Health": _object(["status"], status={"type": "string", "enum": ["ok", "unavailable"]}),
        },
        "requestBodies": {
            **{name: _body(name) for name in ("Login", "Registration")},
            **{name: _body(name, required=False) for name in ("Refresh", "Revoke")},  # a browser sends the cookie
            "Token": _body("Token", media_types=("application/x-www-form-urlencoded",)),  # RFC 6749 §4.3.2
            "Logout": _body("Logout", required=False),
        },
        "responses": {
            "Error": {
                "description": "An OAuth 2.0 error (RFC 6749 §5.2)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "TokenPair": {
                "description": "A new access token and refresh token; to an allowed origin, the refresh token"
                " goes in the Set-Cookie header instead of the body",
                "headers": {
                    "Set-Cookie": {
                        "description": f"To an allowed origin only: `{COOKIE}=<refresh token>; Max-Age=<refresh TTL>;"
                        " Path=<the issuer's path>; HttpOnly; SameSite=Strict` (and `Secure` on an https issuer)",
                        "schema": {"type": "string"},
                    }
                },
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenPair"}}},
            },
        },
    },
}
