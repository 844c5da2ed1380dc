"""Backends for the sparse-recomputation operators (DESIGN.md section 5).

Every backend exposes the same operators as ``vqt.ops.reference``: ``attention_rows``,
``attention_delta``, ``requantize`` and ``lookup``, plus its ``name``. ``reference`` is plain
PyTorch and is the oracle; ``cpu`` (C++/OpenMP) and ``cuda`` (CUDA kernels) are fused backends,
built just in time, checked against it, and able to say why they cannot run (``available()``).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from vqt.ops import reference

BACKENDS = ("reference", "cpu", "cuda")
_FUSED_FOR_DEVICE = {"cpu": "cpu", "cuda": "cuda"}  # device type -> the fused backend that runs on it
_warned: set[str] = set()  # fused backends whose unavailability "auto" has already reported


def _fused(name: str) -> ModuleType:
    return importlib.import_module(f".{name}", __name__)


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str:
    """Why backend ``name`` cannot run on ``device`` ("" when it can; building it if needed)."""
    device = torch.device(device)
    if name == "reference":
        return ""
    if _FUSED_FOR_DEVICE.get(device.type) != name:
        return f"it runs on {name} tensors, not on device {device}"
    ok, why = _fused(name).available()
    return "" if ok else why


def get_backend(name: str, device: torch.device | str = "cpu") -> ModuleType:
    """Resolve a backend name to its module.

    ``auto`` picks the fused backend of ``device`` (cuda, else cpu) when it builds, and otherwise
    ``reference``, warning once per backend with the reason. An explicitly named backend that
    cannot run raises a RuntimeError that says why.
    """
    if name == "auto":
        preferred = _FUSED_FOR_DEVICE.get(torch.device(device).type)
        if preferred is None:
            return reference
        why = unavailable_reason(preferred, device)
        if not why:
            return _fused(preferred)
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"vqt: the {preferred!r} backend is unavailable ({why}); using 'reference'",
                          RuntimeWarning, stacklevel=2)
        return reference
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} or 'auto'")
    why = unavailable_reason(name, device)
    if why:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {why}")
    return reference if name == "reference" else _fused(name)
