"""The one exception class for mistakes a user can fix.

`rasa-lora` prints a `UserError` as one line (`rasa-lora COMMAND: error: MESSAGE`, no traceback) and exits with
code 2; its message names the problem and the fix. Subclasses may also derive from the built-in exception a
caller would expect (`FileNotFoundError`, `ValueError`), so library users can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or set-up (a name, a path, a file, a missing network)."""
