"""Optional dependencies: importing one that is missing names the ``pip install vqt[...]`` to run."""

from __future__ import annotations

import importlib
from types import ModuleType

from vqt._errors import UserError


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise MissingExtra: "<what> needs <module>: pip install 'vqt[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtra(f"this feature needs the {top!r} package, which is not installed: "
                           f"pip install 'vqt[{extra}]'  (or: pip install {top})") from e
