"""Fused CPU backend: the reference operators in C++ with OpenMP (vqt/csrc/vqt_ops_cpu.cpp).

Besides the four operators of the schema, it fuses the per-layer work of ``vqt.ops.Backend``:
``layer_attend`` (one C++ call for a layer's delta updates, full rows, re-quantization and
lookup, semantics in vqt/ops/composite.py), ``layer_commit`` (with the final norm after the last
layer) and ``layer_step``, a whole quantized layer (qkv, layer_attend, MLP, commit) in one call, bitwise
equal to the composite path. The C++ side reads the records of vqt/ops/tables.py by field name.

The extension is compiled just in time on first use and cached (``vqt.ops.build``). Inference
only: the results carry no autograd history.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

from vqt.ops import Backend, layer
from vqt.ops.build import jit_load
from vqt.ops.tables import EditPlan, LayerCounts, LayerTables, LayerWeights

name = "cpu"
CSRC = Path(__file__).resolve().parents[1] / "csrc"


# Vector instructions to compile for, by the capability ATen itself detected on this machine (and
# honouring ATEN_CPU_CAPABILITY); the extension's name carries it, so builds for different CPUs
# sharing one cache never mix.
_VECTOR_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=512"],
}


@functools.lru_cache(maxsize=None)
def _build() -> tuple[Optional[ModuleType], str]:
    capability = re.sub(r"\W", "_", torch.backends.cpu.get_cpu_capability().lower())
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    return jit_load(f"vqt_ops_cpu_{capability}", [CSRC / "vqt_ops_cpu.cpp"], [CSRC],
                    extra_cflags=flags + _VECTOR_FLAGS.get(capability, []), extra_ldflags=["-fopenmp"], with_cuda=False)


def available() -> tuple[bool, str]:
    """(True, "") when the extension builds (the first call compiles it), else (False, the reason)."""
    module, why = _build()
    return module is not None, why


def required(build: Callable[[], tuple[Optional[ModuleType], str]]) -> ModuleType:
    """The extension that ``build`` returns, or a RuntimeError that says why it could not be built."""
    module, why = build()
    if module is None:
        raise RuntimeError(why)
    return module


class FusedBackend(Backend):
    """The four operators forwarding to a compiled extension (``build`` returns it or why it failed).

    Inputs may have any layout (they are made contiguous) and may require grad (they are detached).
    """

    def __init__(self, name: str, build: Callable[[], tuple[Optional[ModuleType], str]]) -> None:
        self.name, self._build = name, build

    @property
    def ext(self) -> ModuleType:
        return required(self._build)

    @staticmethod
    def _dense(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        return [None if t is None else t.detach().contiguous() for t in tensors]

    def attention_rows(self, q, pos_q, k, v, pos_k, window, scale, sink_s=None, sink_v=None):
        return self.ext.attention_rows(*self._dense(q, pos_q, k, v, pos_k), _width(window), float(scale),
                                       *self._dense(sink_s, sink_v))

    def attention_delta(self, q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add, window,
                        scale, tau):
        return self.ext.attention_delta(*self._dense(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add,
                                                     pos_add), _width(window), float(scale), float(tau))

    def requantize(self, a, codebook, codes, a_old, radius):
        return self.ext.requantize(*self._dense(a, codebook, codes, a_old, radius))

    def lookup(self, table, codes):
        return self.ext.lookup(*self._dense(table, codes))


def _width(window) -> Optional[float]:
    return None if window is None else float(window)


class CpuBackend(FusedBackend):
    """The fused CPU operators, plus the whole layer step, the commit and the final norm in C++."""

    def prepare(self, weights: LayerWeights) -> LayerWeights:
        if weights.codebook is None:
            return weights
        return dataclasses.replace(weights, codebook_norms=self.ext.codebook_norms(weights.codebook.contiguous()))

    def layer_attend(self, w: LayerWeights, t: LayerTables, q_new, k_new, v_new, s_new, dirty, plan: EditPlan):
        post, attn_out, counts = self.ext.layer_attend(w, t, *self._dense(q_new, k_new, v_new, s_new), dirty, plan)
        if w.codebook is None:  # a dense twin's layer: the extension returns the attention outputs a (post, H hdv)
            attn_out = layer.linear(attn_out, w.w_o)
        return post, attn_out, LayerCounts(**counts)

    def layer_commit(self, target, post, x_next, plan: EditPlan):
        return self.ext.layer_commit(target, post, x_next.detach().contiguous(), plan)

    def layer_step(self, w: LayerWeights, t: LayerTables, target, dirty, plan: EditPlan):
        """A quantized layer in one C++ call (bitwise equal to the composite step); a dense twin's
        layer runs the composite step on the fused operators."""
        if not w.quantized:
            return super().layer_step(w, t, target, dirty, plan)
        next_dirty, counts = self.ext.layer_step(w, t, target, dirty, plan)
        return next_dirty, LayerCounts(**counts)



@functools.lru_cache(maxsize=None)
def backend() -> CpuBackend:
    return CpuBackend(name, _build)
