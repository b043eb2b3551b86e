"""jwtauth: a small authentication server issuing RS256 access tokens and rotating refresh tokens."""

__version__ = "0.1.0"
