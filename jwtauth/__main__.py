"""`python -m jwtauth`: the same as the `jwtauth` command."""

from jwtauth.cli import run

run()
