"""Output paths named on the command line, checked before any long work (shared by every command)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Optional

from vqt._errors import UserError


def cannot_write(flag: str, path: str, error: OSError) -> UserError:
    return UserError(f"{flag} {path}: cannot write it ({error.strerror or error})")


def open_output(flag: str, path: Optional[str]) -> Optional[IO[str]]:
    """Open an output file named on the command line now, before any long work, or say why it cannot be."""
    if path is None:
        return None
    try:
        return open(path, "w")
    except OSError as e:
        raise cannot_write(flag, path, e) from e


def check_plot_folder(plot: Optional[str]) -> None:
    """Refuse a --plot that names a file (plots go into a folder)."""
    if plot and Path(plot).exists() and not Path(plot).is_dir():
        raise UserError(f"--plot {plot} is a file: give a folder for the PNG plots")
