"""The per-row math of one Llama-style layer, shared by the model (dense and training passes) and the
incremental step, so that both run the same ATen operators in the same order.

q/k/v: RMSNorm, one matmul of the concatenated projection, RoPE (rotate-half) on q and k. Sink
score: ``scale * q_raw . sink_k + sink_logit`` from the query *before* RoPE, so no position change
can alter it (DESIGN.md section 7). After attention: y = x + attention output, x' = y + SwiGLU(RMSNorm(y)).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

Angles = Optional[tuple[torch.Tensor, torch.Tensor]]


def product_rows(m: int) -> int:
    """The row count a bfloat16 product of ``m`` rows runs at: m up to 8, else m rounded up to a multiple of
    8 (up to 64 rows), 16 (up to 256) or 64. oneDNN compiles a kernel for every new shape (about 1 ms); an
    edit's row counts vary from layer to layer, so without buckets the first use of each count paid that.
    The zero rows padded in change nothing: bfloat16 products are row-independent, bitwise
    (``experiments/products.py`` and ``tests/test_engine_api.py`` check it). The C++ layer step pads alike."""
    if m <= 8:
        return m
    step = 8 if m <= 64 else 16 if m <= 256 else 64
    return -(-m // step) * step


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` computed in w's dtype: with bfloat16 weights (``VQTModel.set_matmul_dtype``) x is
    rounded to bfloat16 (its rows padded to ``product_rows``) and the product returned in x's dtype (DESIGN.md
    section 8). Every projection of the model, dense or incremental, goes through this (the C++ layer step
    runs the same operators)."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    rows = x.to(w.dtype).reshape(-1, x.shape[-1])
    m, padded = rows.shape[0], product_rows(rows.shape[0])
    if padded != m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    return F.linear(rows, w)[:m].to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


@functools.lru_cache(maxsize=16)
def inv_freq(hd: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/hd), (hd/2,) float64."""
    return theta ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd)


def rope_angles(pos: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (..., n, 1, hd), of real-valued positions pos (..., n) and inverse frequencies
    ``freq`` (hd/2,), rotate-half convention. Angles are formed in float64 whatever ``dtype``, so a
    position always gets the same rotation (the C++ layer step runs these operators, in this order)."""
    ang = pos.to(torch.float64).unsqueeze(-1) * freq  # (..., n, hd/2)
    ang = torch.cat([ang, ang], -1).unsqueeze(-2)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., heads, hd) by per-row (cos, sin) (..., 1, hd), rotate-half convention."""
    hd = x.shape[-1]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def sink_scores(q_raw: torch.Tensor, sink_k: torch.Tensor, sink_logit: torch.Tensor, scale: float) -> torch.Tensor:
    """q_raw (..., H, hd) before RoPE -> each query head's score for the sink (..., H). ``sink_k``: one row per
    key/value head (GQA: query head h reads row h // (H / Hkv)), or already one per query head."""
    rep = q_raw.shape[-2] // sink_k.shape[0]
    k = sink_k if rep == 1 else sink_k.repeat_interleave(rep, dim=0)  # (H, hd)
    return (q_raw * k).sum(-1) * scale + sink_logit


def qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_qkv: torch.Tensor, n_heads: int, n_kv_heads: int,
        angles: Angles, sink: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """x (..., d) -> q (..., H, hd), k and v (..., Hkv, hd), and the sink scores (..., H) or None.

    ``angles``: the rows' RoPE (cos, sin), None without RoPE. ``sink``: (sink_k, sink_logit, scale).
    """
    h = F.rms_norm(x, norm_weight.shape, norm_weight, eps)
    H, Hkv = n_heads, n_kv_heads
    out = linear(h, w_qkv)
    hd = out.shape[-1] // (H + 2 * Hkv)
    out = out.view(*h.shape[:-1], H + 2 * Hkv, hd)
    qk, v = out[..., : H + Hkv, :], out[..., H + Hkv:, :]
    s = None if sink is None else sink_scores(qk[..., :H, :], *sink)
    if angles is not None:  # q and k rotated together: one set of elementwise ops
        qk = rope(qk, *angles)
    return qk[..., :H, :], qk[..., H:, :], v, s


def corrected(out: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_corr: torch.Tensor
              ) -> torch.Tensor:
    """Quantize-then-correct: a lookup output ``out`` (m, d) plus W_corr RMSNorm(x) of the rows' inputs x
    (vqt.modeling.quantize.CorrectedQuantizer, folded with W_o). The layer's own attention norm."""
    return out + linear(F.rms_norm(x, norm_weight.shape, norm_weight, eps), w_corr)


def mlp_residual(y: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
    """x' = y + W_down(silu(gate) * up) of RMSNorm(y). Per row."""
    gate, up = linear(F.rms_norm(y, norm_weight.shape, norm_weight, eps), w_gate_up).chunk(2, -1)
    return y + linear(F.silu(gate) * up, w_down)


def drift_after_delta(drift: torch.Tensor, z_old: torch.Tensor, m_old: torch.Tensor, z_new: torch.Tensor,
                      m_new: torch.Tensor) -> torch.Tensor:
    """A row's bound on the relative rounding error of its (U, Z) after one delta update (DESIGN.md
    section 8): the error it carried, an absolute error of ``drift * z_old`` at stabilizer ``m_old``,
    measured against the new denominator at the new stabilizer, plus one rounding of the stored result.
    Cancellation (a denominator that shrinks) multiplies it; growth divides it."""
    return drift * (z_old * torch.exp(m_old - m_new) / z_new).abs() + torch.finfo(z_new.dtype).eps
