"""User-facing errors.

Anything the user can fix (a wrong path, a bad option, a file that is not a model) is raised as a
:class:`UserError`. The CLI turns it into one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep the message on one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))
