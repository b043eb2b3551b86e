"""The exception classes of jwtauth, and nothing else."""

from __future__ import annotations


class AuthError(Exception):
    """A client mistake. app.render_auth_error turns every subclass into OAuth-style JSON."""

    error = "invalid_request"  # RFC 6749 §5.2 / RFC 6750 §3.1 error code
    status_code = 400
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, description: str = "") -> None:
        super().__init__(description or self.error)
        self.description = description


class InvalidRequestError(AuthError):
    """A missing, blank, malformed or oversized parameter."""


class InvalidGrantError(AuthError):
    """Wrong password, unknown or disabled user; refresh token bad, used, expired or revoked."""

    error = "invalid_grant"


class UnsupportedGrantTypeError(AuthError):
    """A grant_type this server does not offer (RFC 6749 §5.2)."""

    error = "unsupported_grant_type"


class InvalidTokenError(AuthError):
    """A bearer token rejected by a protected route (RFC 6750 §3.1)."""

    error, status_code = "invalid_token", 401


class EmailTakenError(AuthError):
    """An email that is already registered."""

    error, status_code = "email_taken", 409


class AccessDeniedError(AuthError):
    """A request the configuration refuses, e.g. registration while it is closed."""

    error, status_code = "access_denied", 403


class OriginNotAllowedError(AuthError):
    """A POST from a browser page on an origin that may not call jwtauth (CSRF, login CSRF; API.md)."""

    status_code = 403


class UnsupportedMediaTypeError(AuthError):
    """A body that is neither JSON nor form-encoded."""

    status_code = 415


class BodyTooLargeError(AuthError):
    """A request body over the size limit."""

    status_code = 413


class SlowDownError(AuthError):
    """Too many failed logins for this email from this address; retry after `retry_after` seconds."""

    error, status_code = "slow_down", 429

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


class TemporarilyUnavailableError(AuthError):
    """The database is out of reach or stayed locked too long, or logins queue up (RFC 6749 §4.1.2.1)."""

    error, status_code, retry_after = "temporarily_unavailable", 503, 1


class StoreUnavailableError(Exception):
    """The database cannot answer now (unreachable, or locked past the busy timeout); nothing was done.
    Raised by every storage backend alike; the service answers it with TemporarilyUnavailableError."""


class ConflictError(Exception):
    """A row that would break a uniqueness rule (a taken email); raised by every storage backend alike."""


class ConfigError(Exception):
    """A configuration value that cannot be used; the server does not start."""


class KeyStoreError(Exception):
    """The key directory or a key file cannot be used; the server does not start."""


class StoreError(Exception):
    """The database cannot be opened, migrated, backed up or copied; the server or the command stops."""


class RotationTooEarlyError(KeyStoreError):
    """A rotation that would make a key sign before it has been published for the JWKS max-age."""

    def __init__(self, signs_from: int) -> None:
        super().__init__(f"the next key may sign only from {signs_from} (unix time)")
        self.signs_from = signs_from
