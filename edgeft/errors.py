"""Errors a user can cause and fix.

An ``EdgeftError`` is printed by the CLI as one line on stderr with exit code 2;
anything else is a bug and keeps its traceback. This module knows nothing of the
stages; it only depends on typer's click exception, so the CLI prints it.
"""

from __future__ import annotations

import typer

# Recent typer releases vendor click; their handler catches only their own ClickException.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class EdgeftError(_ClickException):
    """A bad input or state the user can fix: one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
