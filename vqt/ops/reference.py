"""Reference backend: the sparse-recomputation operators in plain PyTorch.

This is the oracle the fused backends are tested against, and the dense forward uses
the same functions, so a dense pass and an incremental update differ only by the
order of floating-point operations. Shapes: m query rows, r keys, H query heads,
Hkv key/value heads, hd head width, G code groups of width gd, K codewords.
"""

from __future__ import annotations

from typing import Optional

import torch

from vqt.ops.search import nearest
from vqt.ops.visibility import visible

name = "reference"
_ROW_CHUNK = 128  # query rows per block in full attention: bounds the (H, m, r) scores and the key band


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q (m, H, hd), k (r, Hkv, hd) -> scores (H, m, r); query head h reads kv head h // (H / Hkv)."""
    rep = q.shape[1] // k.shape[1]
    return torch.einsum("mhd,rhd->hmr", q, k.repeat_interleave(rep, dim=1)) * scale


def _weighted_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (H, m, r), v (r, Hkv, hd) -> (m, H, hd)."""
    rep = p.shape[0] // v.shape[1]
    return torch.einsum("hmr,rhd->mhd", p, v.repeat_interleave(rep, dim=1))


def attention_rows(q: torch.Tensor, pos_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_k: torch.Tensor,
                   window: Optional[float], scale: float, sink_s: Optional[torch.Tensor] = None,
                   sink_v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full attention rows as accumulators (U (m, H, hd), Z (m, H), M (m, H)); output = U / Z.

    ``pos_k`` must be sorted ascending: each block of query rows then only reads the
    contiguous band of keys it can see (causal, and windowed when ``window`` is set).
    Every query must see at least one key (itself, in a document). With an attention sink,
    ``sink_s`` (m, H) are the queries' sink scores and ``sink_v`` (H, hd) the value each head
    reads from it: one more key, always visible, that no edit touches.
    """
    us, zs, ms = [], [], []
    for lo in range(0, q.shape[0], _ROW_CHUNK):
        qc, pc = q[lo:lo + _ROW_CHUNK], pos_q[lo:lo + _ROW_CHUNK]
        first = 0 if window is None else int(torch.searchsorted(pos_k, pc.min() - window, right=True))
        last = int(torch.searchsorted(pos_k, pc.max(), right=True))
        kc, vc, pkc = k[first:last], v[first:last], pos_k[first:last]
        s = _scores(qc, kc, scale).masked_fill(~visible(pc, pkc, window), float("-inf"))
        m = s.amax(-1)  # (H, mc)
        if sink_s is not None:
            m = torch.maximum(m, sink_s[lo:lo + _ROW_CHUNK].T)
        p = torch.exp(s - m.unsqueeze(-1))
        u, z = _weighted_values(p, vc), p.sum(-1).T
        if sink_s is not None:
            ps = torch.exp(sink_s[lo:lo + _ROW_CHUNK] - m.T)  # (mc, H)
            u, z = u + ps.unsqueeze(-1) * sink_v, z + ps
        us.append(u)
        zs.append(z)
        ms.append(m.T)
    if not us:
        e = q.new_zeros(0, q.shape[1])
        return q.new_zeros(q.shape), e, e.clone()
    return torch.cat(us), torch.cat(zs), torch.cat(ms)


def attention_delta(q: torch.Tensor, pos_q_old: torch.Tensor, pos_q: torch.Tensor,
                    U: torch.Tensor, Z: torch.Tensor, M: torch.Tensor,
                    k_rem: torch.Tensor, v_rem: torch.Tensor, pos_rem: torch.Tensor,
                    k_add: torch.Tensor, v_add: torch.Tensor, pos_add: torch.Tensor,
                    window: Optional[float], scale: float, tau: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact update of attention accumulators when keys leave and join (DESIGN.md section 2, step 3).

    Removed keys are subtracted at the row's current stabilizer M; then added keys are
    folded in, raising M (and rescaling U, Z) where a new score exceeds it. Visibility of a
    removed key is judged at the query's old position, of an added key at its new one (they
    differ only for queries renumbered without effect on their values, as under NoPE). Returns the new
    (U, Z, M) and a (m,) bool ``refresh`` mask: rows whose denominator fell below
    ``tau`` times its value before the removals (a cancellation the caller must fix by
    recomputing the row from scratch).
    """
    U, Z, M = U.clone(), Z.clone(), M.clone()
    z_before = Z.clone()
    if k_rem.shape[0]:
        s = _scores(q, k_rem, scale)  # (H, m, r)
        mask = visible(pos_q_old, pos_rem, window)
        p = torch.where(mask, torch.exp(s - M.T.unsqueeze(-1)), s.new_zeros(()))
        U -= _weighted_values(p, v_rem)
        Z -= p.sum(-1).T
    refresh = (Z < tau * z_before).any(-1)
    if k_add.shape[0]:
        s = _scores(q, k_add, scale).masked_fill(~visible(pos_q, pos_add, window), float("-inf"))
        m_new = torch.maximum(M, s.amax(-1).T)  # (m, H)
        rescale = torch.exp(M - m_new)
        U *= rescale.unsqueeze(-1)
        Z *= rescale
        p = torch.exp(s - m_new.T.unsqueeze(-1))
        U += _weighted_values(p, v_add)
        Z += p.sum(-1).T
        M = m_new
    return U, Z, M, refresh


def remaining_radius(a: torch.Tensor, a_old: torch.Tensor, e_code: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The certified radius around ``a`` that a certified ``radius`` around ``a_old`` implies, for the code
    whose codeword is ``e_code`` (Euclidean distances over the last dim, in float64).

    A radius r around a_old means every other codeword is at least |a_old - e| + 2r from a_old, so at
    least |a_old - e| + 2r - |a - a_old| from a; a ball around a of half the room left,
    (|a_old - e| + 2r - |a - a_old| - |a - e|) / 2, is then nearer e than any other codeword. That is
    never less than r - |a - a_old| (the triangle inequality bounds |a - e|), and more when a moved
    towards e or sideways. Distances are shrunk or enlarged by 2^-40 against float64 rounding and the
    result is rounded down. NaN-safe: a NaN stays NaN, which certifies nothing."""
    A, O, E = a.double(), a_old.double(), e_code.double()
    up, down = 1 + 2.0 ** -40, 1 - 2.0 ** -40
    d_old = (O - E).pow(2).sum(-1).sqrt() * down
    d_new = (A - E).pow(2).sum(-1).sqrt() * up
    moved = (A - O).pow(2).sum(-1).sqrt() * up
    rem = ((d_old + 2 * radius.double() - moved - d_new) / 2).to(radius.dtype)
    return torch.nextafter(rem, torch.full_like(rem, float("-inf")))


def requantize(a: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, a_old: torch.Tensor,
               radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-quantize a (m, G, gd) with the certified skip (DESIGN.md section 2, step 4).

    ``radius`` certifies ``codes`` in a ball around ``a_old``, the vector each group had before it moved
    to ``a``. A group whose remaining radius around ``a`` (``remaining_radius``) is positive keeps its
    code without a search and carries that radius; the others are searched and get the radius of the
    new search. So a row's radius always refers to its current attention output, and no reference
    point is stored. Codes outside [0, K) are searched. Returns (codes, radius, searched (m, G) bool).
    """
    codes = codes.clone()
    K = codebook.shape[1]
    valid = (codes >= 0) & (codes < K)
    e_code = codebook[torch.arange(codebook.shape[0], device=codes.device), codes.clamp(0, K - 1)]  # (m, G, gd)
    radius = torch.where(valid, remaining_radius(a, a_old, e_code, radius), float("nan"))
    searched = ~(radius > 0)  # NaN-safe: anything uncertain is searched
    for g in range(a.shape[1]):
        rows = searched[:, g].nonzero().squeeze(1)
        if rows.numel():
            res = nearest(a[rows, g:g + 1], codebook[g:g + 1])
            codes[rows, g] = res.codes[:, 0]
            radius[rows, g] = res.radius[:, 0]
    return codes, radius, searched


def lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Lookup-table output projection: table (G, K, d), codes (m, G) -> sum_g table[g, codes[:, g]] (m, d)."""
    out = table[0, codes[:, 0]]
    for g in range(1, table.shape[0]):
        out = out + table[g, codes[:, g]]
    return out
