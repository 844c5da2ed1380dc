"""Fused CPU backend: the reference operators in C++ with OpenMP (vqt/csrc/vqt_ops_cpu.cpp).

Besides the four operators of the schema, it fuses the engine's per-layer work:
``layer_attend`` (one C++ call for a layer's delta updates, full rows, re-quantization and
lookup, semantics in vqt/ops/composite.py), ``layer_commit``, ``finish_outputs`` and
``layer_step``, a whole quantized layer (qkv, layer_attend, MLP, commit) in one call, bitwise
equal to the composite path. The engine uses whichever of these a backend provides.

The extension is compiled just in time on first use (ninja, cached under ``$VQT_BUILD_DIR`` or
``~/.cache/vqt/torch_extensions``). Inference only: the results carry no autograd history.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

from vqt.ops import reference

name = "cpu"
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def build_directory(extension: str) -> Path:
    """Where the JIT build of ``extension`` lives (one folder per extension, reused across runs)."""
    root = os.environ.get("VQT_BUILD_DIR") or Path.home() / ".cache" / "vqt" / "torch_extensions"
    path = Path(root) / extension
    path.mkdir(parents=True, exist_ok=True)
    return path


def jit_load(extension: str, sources: list[str], **kwargs) -> tuple[Optional[ModuleType], str]:
    """Build (or reuse) a torch extension; returns (module, "") or (None, why it could not be built)."""
    try:
        from torch.utils.cpp_extension import load

        if not any(build_directory(extension).glob(f"{extension}*.so")):
            print(f"vqt: compiling the {extension} extension (first use only, about a minute)...", file=sys.stderr)
        module = load(name=extension, sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC)],
                      build_directory=str(build_directory(extension)), verbose=False, **kwargs)
    except Exception as exc:  # a missing compiler, ninja or header: the reason is reported, not raised
        return None, f"building {extension} failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
    return module, ""


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
    return jit_load(f"vqt_ops_cpu_{capability}", ["vqt_ops_cpu.cpp"],
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


def fused_ops(build: Callable[[], tuple[Optional[ModuleType], str]]) -> tuple[Callable, ...]:
    """The four operators with the reference signatures, forwarding to the extension that ``build`` returns.

    Inputs may have any layout (they are made contiguous) and may require grad (they are detached).
    """

    def extension() -> ModuleType:
        return required(build)

    def dense(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.detach().contiguous() for t in tensors]

    def width(window) -> Optional[float]:
        return None if window is None else float(window)

    @functools.wraps(reference.attention_rows)
    def attention_rows(q, pos_q, k, v, pos_k, window, scale):
        return extension().attention_rows(*dense(q, pos_q, k, v, pos_k), width(window), float(scale))

    @functools.wraps(reference.attention_delta)
    def attention_delta(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add, window, scale, tau):
        return extension().attention_delta(*dense(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add,
                                                  pos_add), width(window), float(scale), float(tau))

    @functools.wraps(reference.requantize)
    def requantize(a, codebook, codes, a_ref, radius):
        return extension().requantize(*dense(a, codebook, codes, a_ref, radius))

    @functools.wraps(reference.lookup)
    def lookup(table, codes):
        return extension().lookup(*dense(table, codes))

    return attention_rows, attention_delta, requantize, lookup


attention_rows, attention_delta, requantize, lookup = fused_ops(_build)



def _module() -> ModuleType:
    return required(_build)


def layer_attend(q, k, v, U, Z, M, a_ref, codes, radius, q_new, k_new, v_new, dirty, deleted, order, pos, old_pos,
                 is_new, codebook, table, window, scale, tau):
    """``vqt.ops.composite.layer_attend`` in one fused call (the slot tables are updated in place)."""
    q_new, k_new, v_new = (t.detach().contiguous() for t in (q_new, k_new, v_new))
    extra = [None if t is None else t.detach().contiguous() for t in (codebook, table)]
    return _module().layer_attend(q, k, v, U, Z, M, a_ref, codes, radius, q_new, k_new, v_new, dirty, deleted, order,
                                  pos, old_pos, is_new, *extra, None if window is None else float(window),
                                  float(scale), float(tau))


def layer_commit(target, post, x_next, is_new, is_forced, recomputed):
    """``vqt.ops.composite.layer_commit`` in one fused call (target and recomputed updated in place)."""
    return _module().layer_commit(target, post, x_next.detach().contiguous(), is_new, is_forced, recomputed)


def layer_weights(block) -> tuple:
    """The weights ``layer_step`` reads, gathered once per model version (the engine caches them
    and rebuilds after any parameter change). ``block`` must have a quantizer."""
    codebook = block.quantizer.codebook.detach().contiguous()
    return (block.attn_norm.weight.detach(), float(block.attn_norm.eps), block.fused_weight("qkv"), codebook,
            _module().codebook_norms(codebook), block.lookup_table(), block.mlp_norm.weight.detach(),
            float(block.mlp_norm.eps), block.fused_weight("gate_up"), block.w_down.weight.detach(), float(block.scale))


def layer_step(weights: tuple, cache, target: torch.Tensor, dirty: torch.Tensor, deleted: torch.Tensor,
               order: torch.Tensor, pos: torch.Tensor, old_pos: torch.Tensor, is_new: torch.Tensor,
               is_forced: torch.Tensor, recomputed: torch.Tensor, angles: Optional[tuple[torch.Tensor, torch.Tensor]],
               window, tau: float) -> tuple[torch.Tensor, list[int]]:
    """One whole layer of an incremental update (Block.qkv, layer_attend, Block.finish and
    layer_commit) in one C++ call, bitwise equal to running them in turn. ``weights``: the layer's
    ``layer_weights``; ``cache``: the engine's LayerCache of that layer (updated in place). Returns
    (the next layer's dirty slots, layer_attend's counts plus the number of MLP rows)."""
    c = cache
    cos, sin = angles if angles is not None else (None, None)
    return _module().layer_step(c.x, c.q, c.k, c.v, c.U, c.Z, c.M, c.a_ref, c.codes, c.radius, target, dirty,
                                deleted, order, pos, old_pos, is_new, is_forced, recomputed, cos, sin, *weights,
                                None if window is None else float(window), float(tau))


def finish_outputs(resid, hidden, pooled_sum, rows, deleted, is_new, norm_weight, eps):
    """``vqt.ops.composite.finish_outputs`` in one call (hidden and pooled_sum updated in place)."""
    _module().finish_outputs(resid, hidden, pooled_sum, rows, deleted, is_new, norm_weight.detach(), float(eps))
