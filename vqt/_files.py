"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | Path, opener: Callable[..., BinaryIO] = open) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file beside it (opened with ``opener(tmp, "wb")``) that
    replaces ``path`` when the block ends without an error.

    On any error the temporary file is removed and ``path`` is untouched; an OSError names
    ``path`` as the caller gave it (a folder, a missing folder, no permission), not the
    temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder: give a file name", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"the folder {path.parent} does not exist", str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with opener(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        if e.filename != str(tmp) and e.filename2 != str(path):
            raise
        raise _renamed(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def _renamed(error: OSError, path: Path) -> OSError:
    """The same OSError, naming ``path`` instead of the temporary file."""
    return type(error)(error.errno, error.strerror, str(path))
