"""User-facing errors: one clear line that names the file or option and the fix."""

from __future__ import annotations

import errno
import functools
import logging
import sys


def plural(n: int, word: str) -> str:
    """`1 control image`, `2 control images`."""
    return f"{n} {word}" + ("" if n == 1 else "s")


class UserError(Exception):
    """A problem with the user's input (file, option, data) rather than a bug."""


_ENVIRONMENT_FIXES = {errno.ENOSPC: "the disk is full; free space on it", errno.EDQUOT: "the disk quota is used up",
                      errno.EFBIG: "the file size limit was reached (ulimit -f); raise it",
                      errno.EROFS: "the folder is on a read-only file system",
                      errno.EACCES: "permission denied; make the output folder writable",
                      errno.EPERM: "permission denied; make the output folder writable"}


def is_environment_error(e: BaseException) -> bool:
    """Disk full, file size limit, read-only or forbidden folder: the machine's problem, not a bug of ours."""
    return isinstance(e, OSError) and e.errno in _ENVIRONMENT_FIXES


def describe_error(e: BaseException) -> str:
    """One line for an exception; errors of the environment say what to do."""
    if is_environment_error(e):
        return _ENVIRONMENT_FIXES[e.errno] + (f" ({e.filename})" if e.filename else "")
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cli_main(fn):
    """Decorate an entry point: a UserError becomes one line on stderr and exit code 2; an error of the environment
    (disk full, file size limit, read-only folder) one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if not is_environment_error(e):
                raise
            print(f"error: {describe_error(e)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
