"""Errors that reach the user as one line (main.py prints them without a traceback)."""


class UserError(Exception):
    """Bad input: the message names the file or flag and says how to fix it."""


class DataError(UserError):
    """A data folder, image or mask that cannot be used as it is."""
