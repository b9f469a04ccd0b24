"""Errors a user can fix: the CLI prints them in one line and exits with status 2."""


class UserError(Exception):
    """Something wrong with the input or the setup that the user can correct."""
