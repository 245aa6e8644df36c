"""Errors a user can cause and fix.

An ``EdgeftError`` is a plain exception carrying its message and exit code; the CLI
(``edgeft.cli.app``) prints it as one line on stderr and exits with that code, and the
server turns it into a 4xx body. Anything else is a bug and keeps its traceback. This
module knows nothing of the stages, the CLI or the server, and imports nothing.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """A bad input or state the user can fix: one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
