"""Argument parsing shared by the project commands: bad arguments become one `InputError` line.

`CommandParser(prog="codiemb NAME", ...)` is an `argparse.ArgumentParser` whose errors (unknown or
missing options, bad values) raise `InputError("codiemb NAME", message, "see `codiemb NAME --help`")`,
which the CLI prints as one line with exit code 2, instead of argparse's usage block and `SystemExit`.
`--help` still prints the help and exits 0.
"""

from __future__ import annotations

import argparse

from ..errors import InputError


class CommandParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as an `InputError` (one line, exit code 2) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(self.prog, message, f"see `{self.prog} --help`")

