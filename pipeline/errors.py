"""The one exception type for bad user input. CLIs print its message, never a traceback."""


class UserError(ValueError):
    """Input the user can fix: the message says what was given, what is accepted, and how to fix it."""


class DataError(UserError):
    """The data set itself cannot be used (missing, empty, a bad split): no trial can run until it is fixed."""
