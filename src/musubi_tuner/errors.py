"""User-facing errors: one clear line that names the file or option and the fix."""

from __future__ import annotations

import functools
import logging
import sys


def plural(n: int, word: str) -> str:
    """`1 control image`, `2 control images`."""
    return f"{n} {word}" + ("" if n == 1 else "s")


class UserError(Exception):
    """A problem with the user's input (file, option, data) rather than a bug."""


def cli_main(fn):
    """Decorate an entry point: a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
