"""Errors the command line reports as a one-line message with exit code 2 (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a path, the data, a setting); the message says what and where."""


class DataError(UserError):
    """The corpus cannot be used: a missing path, an unreadable file, no text, or too little of it."""


class DistributedError(Exception):
    """A process of a multi-process run could not join the others; reported as one line with exit code 1."""
