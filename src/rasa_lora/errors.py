"""The one exception class for mistakes a user can fix.

`rasa-lora` prints a `UserError` as one line (`rasa-lora COMMAND: error: MESSAGE`, no traceback) and exits with
code 2; its message names the problem and the fix. Subclasses may also derive from the built-in exception a
caller would expect (`FileNotFoundError`, `ValueError`), so library users can catch either.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input or set-up (a name, a path, a file, a missing network)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`PROG: error: MESSAGE; PROG --help lists the arguments`) instead
    of the usage block followed by the error; exit code 2 as argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists the arguments\n")
