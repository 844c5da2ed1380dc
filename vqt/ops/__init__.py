"""Backends for the sparse-recomputation operators (DESIGN.md section 5).

Every backend exposes the same operators as ``vqt.ops.reference``: ``attention_rows``,
``attention_delta``, ``requantize`` and ``lookup``. ``reference`` is plain PyTorch and
is the oracle; fused backends are checked against it.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

BACKENDS = ("reference",)


def get_backend(name: str, device: torch.device | str = "cpu") -> ModuleType:
    """Resolve a backend name. ``auto`` picks the fastest one that can run on ``device``."""
    if name == "auto":
        name = "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} or 'auto'")
    return reference
