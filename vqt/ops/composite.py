"""One layer's attention step of an incremental update, composed from a backend's four operators.

``layer_attend`` is steps 2-4 of DESIGN.md section 2 for one layer, on the engine's slot tables:
removed and added keys, exact delta updates of the clean queries that see them (with the
cancellation guard), full rows for dirty queries, re-quantization with the certified skip, and
the lookup-table output of every row the MLP must recompute. The fused CPU backend implements
the same function in one C++ call (``vqt.ops.cpu.layer_attend``); any backend without its own
runs this composition of its operators.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from vqt.ops.visibility import visible_counts, visible_to_any

# Order of the counts in layer_attend's stats list.
STATS = ("affected", "flipped", "code_flips", "searches", "skips", "refreshes", "delta_pairs", "full_pairs",
         "skip_checks")


def layer_attend(ops: ModuleType, q, k, v, U, Z, M, a_ref, codes, radius, q_new, k_new, v_new,
                 dirty: torch.Tensor, deleted: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
                 old_pos: torch.Tensor, is_new: torch.Tensor, codebook: Optional[torch.Tensor],
                 table: Optional[torch.Tensor], window: Optional[float], scale: float, tau: float
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
    """Update one layer's slot tables in place after its dirty rows got new (q, k, v).

    q..radius: the layer's per-slot tables (C, ...). q_new, k_new, v_new: the recomputed rows of
    the ``dirty`` slots (the old k, v of existing dirty slots and of ``deleted`` ones leave the key
    set; the new ones join it). ``order``: slots in document order (positions ``pos`` sorted along
    it); ``old_pos``: positions before the edit; ``is_new``: (C,) slots inserted by this edit.
    ``codebook``/``table``: the quantizer's codebook and lookup table, None for a dense twin.

    Returns (post, attn_out, stats): the slots whose attention contribution must be recomputed
    (dirty ones, then clean ones whose code flipped, in document order), their lookup-table
    output (None without a quantizer: the caller projects ``a_ref[post]``), and the counts named
    by ``STATS``.
    """
    old_dirty = dirty[~is_new[dirty]]
    rem = torch.cat([deleted, old_dirty])
    k_rem, v_rem, pos_rem = k[rem], v[rem], old_pos[rem]  # (indexing copies)
    q[dirty], k[dirty], v[dirty] = q_new, k_new, v_new
    pos_add = pos[dirty]

    # Clean queries whose visible key set changed get an exact delta update.
    in_dirty = torch.zeros_like(is_new)
    in_dirty[dirty] = True
    clean = order[~in_dirty[order]]
    pos_rem_sorted, pos_add_sorted = torch.sort(pos_rem).values, torch.sort(pos_add).values
    hits = visible_counts(old_pos[clean], pos_rem_sorted, window) + visible_counts(pos[clean], pos_add_sorted, window)
    aff = clean[hits > 0]
    refresh = aff[:0]
    if aff.numel():
        U[aff], Z[aff], M[aff], ref_mask = ops.attention_delta(q[aff], old_pos[aff], pos[aff], U[aff], Z[aff], M[aff],
                                                               k_rem, v_rem, pos_rem, k_new, v_new, pos_add,
                                                               window, scale, tau)
        refresh = aff[ref_mask]

    # Full rows: dirty queries and guarded refreshes, against every key they can see.
    full = torch.cat([dirty, refresh])
    full_pairs = 0
    if full.numel():
        pf = pos[full]
        seen, full_pairs = visible_to_any(pf, pos[order], window)
        band = order[seen]
        U[full], Z[full], M[full] = ops.attention_rows(q[full], pf, k[band], v[band], pos[band], window, scale)

    # Re-quantize every row whose attention output changed.
    rows = torch.cat([dirty, aff])
    a = (U[rows] / Z[rows].unsqueeze(-1)).reshape(a_ref[rows].shape)
    if codebook is None:
        a_ref[rows] = a
        post = torch.cat([dirty, aff])  # without codes, every updated output moved
        stats = [aff.numel(), aff.numel(), aff.numel(), 0, 0, refresh.numel(), int(hits.sum()), full_pairs, 0]
        return post, None, stats
    old_codes = codes[aff]
    radius[dirty[is_new[dirty]]] = float("-inf")  # new rows have no reference point: always searched
    new_codes, a_ref[rows], radius[rows], searched = ops.requantize(a, codebook, codes[rows], a_ref[rows], radius[rows])
    codes[rows] = new_codes
    existing = ~is_new[rows]
    code_changed = new_codes[dirty.numel():] != old_codes
    flipped = aff[code_changed.any(-1)]
    post = torch.cat([dirty, flipped])
    stats = [aff.numel(), flipped.numel(), int(code_changed.sum()), int(searched.sum()),
             int((~searched[existing]).sum()), refresh.numel(), int(hits.sum()), full_pairs,
             int(existing.sum()) * codes.shape[1]]
    return post, ops.lookup(table, codes[post]), stats


def layer_commit(target: torch.Tensor, post: torch.Tensor, x_next: torch.Tensor, is_new: torch.Tensor,
                 is_forced: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
    """Store the recomputed rows ``x_next`` of slots ``post`` into the next layer's input table
    ``target`` and count them in ``recomputed``; returns the next layer's dirty slots: those whose
    row changed bitwise (new ones always) or that are ``is_forced``, in ``post`` order."""
    recomputed[post] += 1
    moved = (x_next != target[post]).any(-1) | is_new[post]
    target[post] = x_next
    return post[moved | is_forced[post]]  # (no duplicates: post lists every slot once)


def finish_outputs(resid: torch.Tensor, hidden: torch.Tensor, pooled_sum: torch.Tensor, rows: torch.Tensor,
                   deleted: torch.Tensor, is_new: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> None:
    """Final RMSNorm of the slots ``rows`` whose residual changed, and the pooled sum of the final
    hidden states kept up to date (deleted slots and the old values of changed ones leave it)."""
    old_rows = rows[~is_new[rows]]
    pooled_sum -= hidden[deleted].sum(0) + hidden[old_rows].sum(0)
    hidden[rows] = torch.nn.functional.rms_norm(resid[rows], norm_weight.shape, norm_weight, eps)
    pooled_sum += hidden[rows].sum(0)
