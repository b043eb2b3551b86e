"""Email addresses: the one form in which they are stored, compared and counted, and the syntax accepted for new
accounts (email-validator, without deliverability checks)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from jwtauth.errors import InvalidRequestError

MAX_EMAIL_LENGTH = 254  # RFC 5321 §4.5.3.1.3, less the angle brackets


def normalise_email(email: str) -> str:
    """Return the form in which emails are stored, compared and counted: trimmed, in Unicode NFKC form and case
    folded, so that spellings that look alike (NFD, full-width letters, capitals, ß and ss) are one address.
    NFKC is applied again after folding, which can leave text that is not in NFKC form."""
    folded = unicodedata.normalize("NFKC", email).strip().casefold()
    return unicodedata.normalize("NFKC", folded)


def check_email(email: str) -> str:
    """Return the normalised email, once email-validator finds it a plain `local@domain`.

    Raises:
        InvalidRequestError: it is longer than 254 characters, or not a plain address: quoted, with comments,
            angle brackets or a display name, white space or control characters, an IP address for a domain,
            or a domain reserved for special use (such as .local or .test); or it has another spelling that
            is more usual (an IDNA domain written in Punycode).
    """
    from email_validator import EmailNotValidError, validate_email  # 20 ms: imported by the verbs that add users

    email = normalise_email(email)
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidRequestError(f"not a valid email address: longer than {MAX_EMAIL_LENGTH} characters")
    try:
        address = validate_email(
            email,
            check_deliverability=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            allow_empty_local=False,
        )
    except EmailNotValidError as exc:
        raise InvalidRequestError(f"not a valid email address: {exc}") from None
    if address.normalized != email:  # one stored spelling per address, the one login compares with
        raise InvalidRequestError(f"not a valid email address: write it as {address.normalized}")
    return email


def normalised_spellings(emails: Iterable[str]) -> dict[str, list[str]]:
    """The stored emails by their normalised form (for `jwtauth db check` and the upgrade that normalises them)."""
    spellings: dict[str, list[str]] = {}
    for email in emails:
        spellings.setdefault(normalise_email(email), []).append(email)
    return spellings


def email_problems(emails: Iterable[str]) -> list[str]:
    """What `jwtauth db check` says of the stored emails: accounts whose addresses are one address once
    normalised (an upgrade leaves them as they were, for an operator to resolve), and addresses not stored
    in their normalised form."""
    problems = []
    for normalised, stored in sorted(normalised_spellings(emails).items()):
        if len(stored) > 1:
            problems.append(f"{len(stored)} accounts are one address once normalised ({normalised}): "
                            + ", ".join(repr(email) for email in sorted(stored)))  # fmt: skip
        elif stored[0] != normalised:
            problems.append(f"email {stored[0]!r} is not stored as {normalised!r}")
    return problems
