"""User-facing errors.

Anything the user can fix (a wrong path, a bad option, a file that is not a model) is raised as a
:class:`UserError`. The CLI turns it into one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


MAX_MESSAGE = 600  # characters; a message may quote user data (a value, a path) that must not flood the terminal


def clip(text: object, limit: int = 120) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis: for quoting user data in messages."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, bounded: the CLI prints exactly this, and it may quote user data.
        super().__init__(clip(message, MAX_MESSAGE))
