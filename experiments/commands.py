"""The command line that made a results folder, kept beside the results in ``command.txt``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m module argv...`` quoted for a shell; ``argv=None`` takes this process's.

    Example:
      >>> command_line("experiments.power", ["--out", "a b"])
      "python -m experiments.power --out 'a b'"
    """
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def record_command(out: Path, command: str, *, keep_previous: bool = False) -> None:
    """Writes ``command`` to ``out/command.txt``; with ``keep_previous``, after the commands
    already listed there, each once (a folder that several commands extended)."""
    path = out / "command.txt"
    previous = path.read_text().splitlines() if keep_previous and path.exists() else []
    path.write_text("\n".join(dict.fromkeys([*previous, command])) + "\n")
