"""The common-password rule against the published list it comes from."""

from __future__ import annotations

import pytest
from zxcvbn.frequency_lists import FREQUENCY_LISTS

from jwtauth.errors import InvalidRequestError
from jwtauth.passwords import MIN_PASSWORD_LENGTH
from jwtauth.service import check_password


def test_the_10000_most_common_passwords_of_zxcvbns_list_are_refused() -> None:
    """API.md: at least the 10,000 most common passwords of a published list (shorter ones fail on length)."""
    most_common = [password for password in FREQUENCY_LISTS["passwords"][:10_000] if len(password) >= 8]
    assert len(most_common) > 3000

    accepted = []
    for password in most_common:
        for spelling in (password, password.upper(), password.capitalize()):
            try:
                check_password(spelling)
            except InvalidRequestError:
                continue
            accepted.append(spelling)

    assert accepted == []


@pytest.mark.parametrize("character", ["a", "1", " ", "é", "🔑"])
def test_one_character_repeated_is_refused(character: str) -> None:
    with pytest.raises(InvalidRequestError, match="repeated"):
        check_password(character * MIN_PASSWORD_LENGTH)


@pytest.mark.parametrize("password", ["correct horse battery", "Tr0ub4dor&3", "aaaaaaab", "lizaveta-and-roberto"])
def test_an_uncommon_password_is_accepted(password: str) -> None:
    check_password(password)
