"""--interactive: prompt lines from the console, each generated and saved at once, for every family."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError


def ring(bell: bool) -> None:
    if bell:
        print("\a", end="", flush=True)


def console(generate_line: Callable[[str], list[Path]], read_line=None, bell: bool = False) -> list[Path]:
    """The --interactive loop of every version: each non-empty line is generated and saved at once (--bell rings
    after each); a bad line (UserError) is reported and the next one read; Ctrl-D (EOF) ends; Ctrl-C stops the
    current image only."""
    saved: list[Path] = []
    print("Interactive mode: enter a prompt (with --w --h --d --s --l --n --ci ... switches); Ctrl-D ends.")
    while True:
        try:
            line = (read_line or input)("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            continue
        try:
            saved += generate_line(line)
            ring(bell)
        except UserError as e:
            print(f"error: {e}")
        except KeyboardInterrupt:
            print("\ninterrupted; enter another prompt (Ctrl-D ends)")
    return saved
