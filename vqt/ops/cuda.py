"""Fused CUDA backend: the reference operators as CUDA kernels (vqt/csrc/vqt_ops_cuda*.{cu,cuh,cpp}).

Built just in time on first use, and only when ``torch.cuda.is_available()``; set ``VQT_NO_CUDA=1``
to never build it. Inference only: the results carry no autograd history.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch

from vqt.ops.build import jit_load
from vqt.ops.cpu import CSRC, FusedBackend

name = "cuda"


@functools.lru_cache(maxsize=None)
def _build() -> tuple[Optional[ModuleType], str]:
    if os.environ.get("VQT_NO_CUDA", "") not in ("", "0"):
        return None, "disabled by VQT_NO_CUDA"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)"
    return jit_load("vqt_ops_cuda", [CSRC / "vqt_ops_cuda_binding.cpp", CSRC / "vqt_ops_cuda.cu"], [CSRC],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], with_cuda=True)


def available() -> tuple[bool, str]:
    """(True, "") when the extension builds (the first call compiles it), else (False, the reason)."""
    module, why = _build()
    return module is not None, why


@functools.lru_cache(maxsize=None)
def backend() -> FusedBackend:
    """The four CUDA operators; the layer step is the composite of them (vqt.ops.composite)."""
    return FusedBackend(name, _build)
