"""The attention-visibility rule, written once (DESIGN.md section 3).

Key j is visible to query i iff ``pos_j <= pos_i`` (causal) and, with a sliding window w,
``pos_i - w < pos_j``. The reference operators, the composite layer step and the MAC
accounting all ask this module; the C++ side has its own one copy (``Window`` in
``vqt/csrc/vqt_ops_common.h``).
"""

from __future__ import annotations

from typing import Optional

import torch


def visible(pos_q: torch.Tensor, pos_k: torch.Tensor, window: Optional[float]) -> torch.Tensor:
    """(..., m, r) bool mask: key at ``pos_k[j]`` visible to query at ``pos_q[i]``."""
    pq, pk = pos_q.unsqueeze(-1), pos_k.unsqueeze(-2)
    mask = pk <= pq
    if window is not None:
        mask &= pk > pq - window
    return mask


def key_range(pos_q: torch.Tensor, pos_k: torch.Tensor, window: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted ``pos_k``: each query's visible keys are ``pos_k[lo:hi]``; returns (lo, hi)."""
    hi = torch.searchsorted(pos_k, pos_q, right=True)
    lo = torch.zeros_like(hi) if window is None else torch.searchsorted(pos_k, pos_q - window, right=True)
    return lo, hi


def visible_counts(pos_q: torch.Tensor, pos_k: torch.Tensor, window: Optional[float]) -> torch.Tensor:
    """For each query, how many of the sorted keys ``pos_k`` it sees."""
    lo, hi = key_range(pos_q, pos_k, window)
    return hi - lo


def visible_to_any(pos_q: torch.Tensor, pos_k: torch.Tensor, window: Optional[float]) -> tuple[torch.Tensor, int]:
    """(mask over sorted ``pos_k`` of the keys at least one query sees, the number of visible pairs)."""
    lo, hi = key_range(pos_q, pos_k, window)
    return _covered(lo, hi, pos_k.numel()), int((hi - lo).sum())


def seen_by_any(pos_k: torch.Tensor, pos_q: torch.Tensor, window: Optional[float]) -> torch.Tensor:
    """Mask over sorted ``pos_q`` of the queries that see at least one key at ``pos_k`` (any order):
    query i sees key j iff pos_j <= pos_i < pos_j + window."""
    n = pos_q.numel()
    lo = torch.searchsorted(pos_q, pos_k, right=False)
    hi = torch.full_like(lo, n) if window is None else torch.searchsorted(pos_q, pos_k + window, right=False)
    return _covered(lo, hi, n)


def _covered(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) mask of the indices inside at least one of the ranges [lo[i], hi[i])."""
    cover = torch.zeros(n + 1, dtype=torch.long, device=lo.device)  # +1 where a range starts, -1 where it ends
    cover.index_add_(0, lo, torch.ones_like(lo))
    cover.index_add_(0, hi, -torch.ones_like(hi))
    return cover.cumsum(0)[:n] > 0
