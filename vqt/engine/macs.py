"""Multiply-accumulate accounting shared by the dense and the incremental path (DESIGN.md section 4).

Counted: every matmul (Q/K/V projections, the MLP, the output projection or the
lookup-table sum, the codebook search, the certified-skip distance) and every
attention term (one query-key pair costs a score and a weighted value, i.e. 2 * head_dim
MACs per query head, whether it comes from a full row or from a delta update).
Not counted: element-wise work (norms, RoPE, softmax exponentials), which is O(d) per
row and the same in both paths, and the LM head, which is computed lazily on request.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch

from vqt.modeling.config import VQTConfig
from vqt.ops.visibility import visible_counts


class MacCounter:
    """Accumulates MACs by kind; ``total`` is what the ops-reduction ratio compares."""

    def __init__(self, cfg: VQTConfig) -> None:
        self.cfg = cfg
        self.by_kind: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def qkv(self, rows: int) -> None:
        c = self.cfg
        self.by_kind["qkv"] += rows * c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim

    def attention(self, pairs: int, kind: str = "attention") -> None:
        """Score plus weighted value for each visible pair, per query head."""
        self.by_kind[kind] += pairs * 2 * self.cfg.n_heads * self.cfg.head_dim

    def quantize_search(self, vectors: int) -> None:
        """Distances of ``vectors`` group vectors to every codeword of their codebook."""
        self.by_kind["quantize"] += vectors * self.cfg.codebook_size * self.cfg.group_dim

    def quantize_skip(self, vectors: int) -> None:
        """Distance of ``vectors`` group vectors to their reference point."""
        self.by_kind["quantize"] += vectors * self.cfg.group_dim

    def output(self, rows: int) -> None:
        """Lookup-table sum (quantized) or the W_o projection (dense twin)."""
        c = self.cfg
        per_row = c.n_groups * c.d_model if c.quantize else c.d_model * c.n_heads * c.head_dim
        self.by_kind["output"] += rows * per_row

    def mlp(self, rows: int) -> None:
        self.by_kind["mlp"] += rows * 3 * self.cfg.d_model * self.cfg.d_ff

    def rows(self, rows: int, pairs: int) -> None:
        """One layer recomputed from scratch on ``rows`` positions that see ``pairs`` keys in all."""
        self.qkv(rows)
        self.attention(pairs)
        if self.cfg.quantize:
            self.quantize_search(rows * self.cfg.n_groups)
        self.output(rows)
        self.mlp(rows)


def dense_macs(cfg: VQTConfig, positions: torch.Tensor) -> int:
    """MACs of a dense forward over a document with these (sorted) positions."""
    return prefix_reuse_macs(cfg, positions, 0)


def prefix_reuse_macs(cfg: VQTConfig, positions: torch.Tensor, first: int) -> int:
    """MACs of common-prefix KV-cache reuse: every layer recomputes positions[first:] in full."""
    return dense_and_prefix_macs(cfg, positions, first)[1]


def dense_and_prefix_macs(cfg: VQTConfig, positions: torch.Tensor, first: int) -> tuple[int, int]:
    """(dense_macs, prefix_reuse_macs) of one document, sharing the visibility count."""
    p = positions.detach().to("cpu", torch.float64)
    counts = visible_counts(p, p, cfg.window)
    per_row, per_pair = MacCounter(cfg), MacCounter(cfg)
    per_row.rows(1, 0)
    per_pair.rows(0, 1)
    total, after = int(counts.sum()), int(counts[first:].sum())
    return (cfg.n_layers * (len(p) * per_row.total + total * per_pair.total),
            cfg.n_layers * ((len(p) - first) * per_row.total + after * per_pair.total))
