"""Backends for the sparse-recomputation operators (DESIGN.md section 5).

A backend is a ``Backend``: the four operators of the schema (``attention_rows``,
``attention_delta``, ``requantize``, ``lookup``; semantics in ``vqt.ops.reference``) and one
incremental layer step built from them (``vqt.ops.composite``), which a fused backend may replace
by its own. Backends are registered by name: ``reference`` (plain PyTorch, the oracle), ``cpu``
(C++/OpenMP) and ``cuda`` (CUDA kernels); the fused ones are built just in time and say why
they cannot run (``unavailable_reason``).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Optional, Union

import torch

from vqt._errors import UserError
from vqt.ops import composite, reference
from vqt.ops.tables import EditPlan, FinalNorm, LayerCounts, LayerTables, LayerWeights

__all__ = ["Backend", "BACKENDS", "get_backend", "register_backend", "unavailable_reason", "EditPlan", "LayerCounts",
           "LayerTables", "LayerWeights"]


class Backend:
    """The operator schema plus one layer step. Subclasses provide the four operators; a fused backend
    may also override ``layer_attend``, ``layer_commit`` and ``layer_step``
    (their composite versions define the semantics). Tensors passed in are not modified except the
    tables, target and plan counters that the step documents as updated in place."""

    name = ""

    attention_rows: Callable
    attention_delta: Callable
    requantize: Callable
    lookup: Callable

    def prepare(self, weights: LayerWeights) -> LayerWeights:
        """Precompute what this backend wants from a layer's weights (once per model version)."""
        return weights

    def layer_attend(self, w: LayerWeights, t: LayerTables, q_new: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, s_new: Optional[torch.Tensor], dirty: torch.Tensor, plan: EditPlan
                     ) -> tuple[torch.Tensor, torch.Tensor, LayerCounts]:
        return composite.layer_attend(self, w, t, q_new, k_new, v_new, s_new, dirty, plan)

    def layer_commit(self, target: Union[torch.Tensor, FinalNorm], post: torch.Tensor, x_next: torch.Tensor,
                     plan: EditPlan) -> torch.Tensor:
        """Store a layer's recomputed rows (``vqt.ops.composite.layer_commit``; after the last layer, the
        final norm and pooled sum); returns the next layer's dirty slots (after the last: the slots
        whose final hidden state changed)."""
        return composite.layer_commit(target, post, x_next, plan)

    def layer_step(self, w: LayerWeights, t: LayerTables, target: Union[torch.Tensor, FinalNorm], dirty: torch.Tensor,
                   plan: EditPlan) -> tuple[torch.Tensor, LayerCounts]:
        """One whole layer of an incremental update (``vqt.ops.composite.layer_step``)."""
        return composite.layer_step(self, w, t, target, dirty, plan)

    def __repr__(self) -> str:
        return f"<vqt backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Plain PyTorch: the oracle every fused backend is tested against."""

    name = "reference"
    attention_rows = staticmethod(reference.attention_rows)
    attention_delta = staticmethod(reference.attention_delta)
    requantize = staticmethod(reference.requantize)
    lookup = staticmethod(reference.lookup)


# name -> (device type it runs on, module that defines it: ``backend()`` and ``available()``)
_REGISTRY: dict[str, tuple[Optional[str], str]] = {}
_warned: set[str] = set()  # fused backends whose unavailability "auto" has already reported


class BackendUnavailable(UserError, RuntimeError):
    """A backend named explicitly cannot run here; the message says why."""


def register_backend(name: str, device_type: Optional[str], module: str) -> None:
    """Register backend ``name`` implemented by ``module`` (imported on first use), which defines
    ``available() -> (bool, reason)`` and ``backend() -> Backend``. ``device_type``: the device
    whose tensors it takes (None: any)."""
    _REGISTRY[name] = (device_type, module)


register_backend("reference", None, __name__)
register_backend("cpu", "cpu", "vqt.ops.cpu")
register_backend("cuda", "cuda", "vqt.ops.cuda")
BACKENDS = tuple(_REGISTRY)


def available() -> tuple[bool, str]:
    return True, ""


@functools.lru_cache(maxsize=None)
def backend() -> Backend:
    return ReferenceBackend()


def _module(name: str):
    return importlib.import_module(_REGISTRY[name][1])


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str:
    """Why backend ``name`` cannot run on ``device`` ("" when it can; building it if needed)."""
    device = torch.device(device)
    device_type = _REGISTRY[name][0]
    if device_type is not None and device_type != device.type:
        return f"it runs on {name} tensors, not on device {device}"
    ok, why = _module(name).available()
    return "" if ok else why


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """Resolve a backend name.

    ``auto`` picks the fused backend of ``device`` (cuda, else cpu) when it builds, and otherwise
    ``reference``, warning once per backend with the reason. An explicitly named backend that
    cannot run raises ``BackendUnavailable`` (a RuntimeError) that says why.
    """
    if name == "auto":
        dev_type = torch.device(device).type
        preferred = next((n for n, (t, _) in _REGISTRY.items() if t == dev_type), None)
        if preferred is None:
            return backend()
        why = unavailable_reason(preferred, device)
        if not why:
            return _module(preferred).backend()
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"vqt: the {preferred!r} backend is unavailable ({why}); using 'reference'",
                          RuntimeWarning, stacklevel=2)
        return backend()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} or 'auto'")
    why = unavailable_reason(name, device)
    if why:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {why} (use 'auto' or 'reference')")
    return _module(name).backend()
