"""One layer's incremental step composed from a backend's four operators (DESIGN.md section 2, steps 2-5).

``layer_attend`` is steps 2-4 on the slot tables of one layer: removed and added keys, exact delta
updates of the clean queries that see them (with the cancellation guard), full rows for dirty
queries, re-quantization with the certified skip, and the lookup-table output of every row the
MLP must recompute. ``layer_step`` wraps it with q/k/v before and the MLP and commit after. A
backend without fused versions runs these (``vqt.ops.Backend``); the fused CPU backend runs the
same semantics in one C++ call each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F

from vqt.ops import layer
from vqt.ops.tables import EditPlan, FinalNorm, LayerCounts, LayerTables, LayerWeights
from vqt.ops.visibility import visible_counts, visible_to_any

if TYPE_CHECKING:
    from vqt.ops import Backend


def layer_attend(ops: "Backend", w: LayerWeights, t: LayerTables, q_new: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, s_new: Optional[torch.Tensor], dirty: torch.Tensor, plan: EditPlan
                 ) -> tuple[torch.Tensor, torch.Tensor, LayerCounts]:
    """Update one layer's tables ``t`` in place after its ``dirty`` rows got new (q, k, v) (and sink scores).

    The old k, v of existing dirty slots and of deleted ones leave the key set; the new ones join it.
    Returns (post, attn_out, counts): the slots whose attention contribution must be recomputed
    (dirty ones, then clean ones whose code flipped, in document order), their attention output after
    the output projection (the lookup table; W_o for a dense twin's layer), and what was done.
    """
    is_new, order, pos, old_pos, window = plan.is_new, plan.order, plan.pos, plan.old_pos, plan.window
    old_dirty = dirty[~is_new[dirty]]
    rem = torch.cat([plan.deleted, old_dirty])
    k_rem, v_rem, pos_rem = t.k[rem], t.v[rem], old_pos[rem]  # (indexing copies)
    t.q[dirty], t.k[dirty], t.v[dirty] = q_new, k_new, v_new
    if s_new is not None:
        t.sink[dirty] = s_new
    pos_add = pos[dirty]

    # Clean queries whose visible key set changed get an exact delta update (the sink never changes).
    in_dirty = torch.zeros_like(is_new)
    in_dirty[dirty] = True
    clean = order[~in_dirty[order]]
    pos_rem_sorted, pos_add_sorted = torch.sort(pos_rem).values, torch.sort(pos_add).values
    hits = visible_counts(old_pos[clean], pos_rem_sorted, window) + visible_counts(pos[clean], pos_add_sorted, window)
    aff = clean[hits > 0]
    # A delta update costs one (query, key) pair per changed key the query sees, a full row one per key it
    # sees now: queries that see more changed keys than keys are recomputed in full (both are exact).
    hits = hits[hits > 0]
    pos_order = pos[order]  # sorted: the keys every query may see, for the counts here and the full rows' band
    cheaper = hits > visible_counts(pos[aff], pos_order, window)
    upd, hits = aff[~cheaper], hits[~cheaper]
    refresh = upd[:0]
    rows = torch.cat([dirty, aff])  # every row whose attention output changes; its output before the change:
    a_old = None if w.codebook is None else output_groups(t.U[rows], t.Z[rows], t.radius.shape[1])
    if upd.numel():
        z_old, m_old = t.Z[upd], t.M[upd]
        t.U[upd], t.Z[upd], t.M[upd], ref_mask = ops.attention_delta(
            t.q[upd], old_pos[upd], pos[upd], t.U[upd], t.Z[upd], t.M[upd], k_rem, v_rem, pos_rem, k_new, v_new,
            pos_add, window, w.scale, plan.tau)
        if t.drift is not None:  # rows whose rounding-error budget is spent are recomputed in full
            drift = layer.drift_after_delta(t.drift[upd], z_old, m_old, t.Z[upd], t.M[upd])
            t.drift[upd] = drift
            ref_mask = ref_mask | ~(drift <= plan.drift_budget).all(-1)
        refresh = upd[ref_mask]

    # Full rows: dirty queries, guarded refreshes and the cheaper ones, against every key they can see (and the sink).
    full = torch.cat([dirty, refresh, aff[cheaper]])
    full_pairs = 0
    if full.numel():
        pf = pos[full]
        seen, full_pairs = visible_to_any(pf, pos_order, window)
        band = order[seen]
        sink = (t.sink[full], w.sink_v) if w.has_sink else (None, None)
        t.U[full], t.Z[full], t.M[full] = ops.attention_rows(t.q[full], pf, t.k[band], t.v[band], pos[band], window,
                                                             w.scale, *sink)
        if t.drift is not None:
            t.drift[full] = 0

    counts = LayerCounts(dirty=dirty.numel(), affected=aff.numel(), refreshes=refresh.numel(),
                         delta_pairs=int(hits.sum()), full_pairs=full_pairs, full_rows=full.numel())
    # Re-quantize every row whose attention output changed.
    a = output_groups(t.U[rows], t.Z[rows], t.radius.shape[1])
    if w.codebook is None:
        counts.flipped = counts.code_flips = aff.numel()  # without codes, every updated output moved
        return rows, layer.linear(a.flatten(1), w.w_o), counts
    old_codes = t.codes[aff]
    t.radius[dirty[is_new[dirty]]] = float("-inf")  # new rows have no certified radius: always searched
    new_codes, t.radius[rows], searched = ops.requantize(a, w.codebook, t.codes[rows], a_old, t.radius[rows])
    t.codes[rows] = new_codes
    existing = ~is_new[rows]
    code_changed = new_codes[dirty.numel():] != old_codes
    flipped = aff[code_changed.any(-1)]
    post = torch.cat([dirty, flipped])
    counts.flipped, counts.code_flips = flipped.numel(), int(code_changed.sum())
    counts.searches, counts.skips = int(searched.sum()), int((~searched[existing]).sum())
    counts.skip_checks = int(existing.sum()) * t.codes.shape[1]
    return post, ops.lookup(w.table, t.codes[post]), counts


def output_groups(U: torch.Tensor, Z: torch.Tensor, groups: int) -> torch.Tensor:
    """Attention outputs a = U / Z of some rows, (m, H, hdv) -> (m, groups, H hdv / groups)."""
    return (U / Z.unsqueeze(-1)).reshape(U.shape[0], groups, U.shape[1] * U.shape[2] // groups)


def layer_commit(target: Union[torch.Tensor, FinalNorm], post: torch.Tensor, x_next: torch.Tensor, plan: EditPlan
                 ) -> torch.Tensor:
    """Store the recomputed rows ``x_next`` of slots ``post`` into the next layer's input table
    ``target`` and record them in ``plan.posts``; returns the next layer's dirty slots: those
    whose row changed bitwise (new ones always) or that are forced, in ``post`` order. After the last
    layer ``target`` is a ``FinalNorm``: see ``finish_outputs``."""
    plan.posts.append(post)
    if isinstance(target, FinalNorm):
        return finish_outputs(target, post, x_next, plan)
    moved = (x_next != target[post]).any(-1) | plan.is_new[post]
    target[post] = x_next
    return post[moved | plan.is_forced[post]]  # (no duplicates: post lists every slot once)


def layer_step(ops: "Backend", w: LayerWeights, t: LayerTables, target: Union[torch.Tensor, FinalNorm],
               dirty: torch.Tensor, plan: EditPlan) -> tuple[torch.Tensor, LayerCounts]:
    """One whole layer of an incremental update: q/k/v of the dirty rows, ``ops.layer_attend``, the
    output (with the correction of a quantize-then-correct layer) and MLP of the rows it returns, ``ops.layer_commit``. Returns (next dirty slots, counts)."""
    angles = None if plan.rope is None else layer.rope_angles(plan.pos[dirty], plan.rope, t.x.dtype)
    sink = (w.sink_k, w.sink_logit, w.scale) if w.has_sink else None
    q, k, v, s = layer.qkv(t.x[dirty], w.attn_norm, w.attn_eps, w.w_qkv, w.n_heads, w.n_kv_heads, angles, sink)
    post, attn_out, counts = ops.layer_attend(w, t, q, k, v, s, dirty, plan)
    if w.w_corr is not None:
        attn_out = layer.corrected(attn_out, t.x[post], w.attn_norm, w.attn_eps, w.w_corr)
    x_next = layer.mlp_residual(t.x[post] + attn_out, w.mlp_norm, w.mlp_eps, w.w_gate_up, w.w_down)
    counts.mlp_rows = post.numel()
    return ops.layer_commit(target, post, x_next, plan), counts


def finish_outputs(final: FinalNorm, rows: torch.Tensor, x_last: torch.Tensor, plan: EditPlan) -> torch.Tensor:
    """The last layer's commit: final RMSNorm of its recomputed rows ``x_last`` (of slots ``rows``), stored
    where it changed bitwise (new rows always), and the pooled sum kept up to date (deleted slots and
    the old values of changed ones leave it). Returns those changed slots, in ``rows`` order."""
    hidden, new_at = final.hidden, plan.is_new[rows]
    before, after = hidden[rows], F.rms_norm(x_last, final.weight.shape, final.weight, final.eps)
    changed = (after != before).any(-1) | new_at
    final.pooled_sum -= hidden[plan.deleted].sum(0) + before[changed & ~new_at].sum(0)
    final.pooled_sum += after[changed].sum(0)
    out = rows[changed]
    hidden[out] = after[changed]
    return out
