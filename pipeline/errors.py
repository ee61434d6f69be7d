"""The one exception type for bad user input. CLIs print its message, never a traceback."""

import os


class UserError(ValueError):
    """Input the user can fix: the message says what was given, what is accepted, and how to fix it."""


class DataError(UserError):
    """The data set itself cannot be used (missing, empty, a bad split): no trial can run until it is fixed."""


def typed(flag: str, make: str) -> str:
    """The setting as the user typed it: ``make``'s variable (``OVERWRITE=1``) when tlsweep runs under make (which
    sets ``MAKELEVEL`` for the commands of its targets), else the command-line flag (``--overwrite``)."""
    return make if os.environ.get("MAKELEVEL") else flag
