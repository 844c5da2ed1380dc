"""Multiply-accumulate accounting shared by the dense and the incremental path (DESIGN.md section 4).

Counted: every matmul (Q/K/V projections, the MLP, the output projection or the
lookup-table sum, the codebook search, the certified-skip distance) and every
attention term (one query-key pair costs a score and a weighted value, i.e. 2 * head_dim
MACs per query head, whether it comes from a full row or from a delta update).
An attention sink costs one more pair per full row (its score and its value); delta
updates never touch it. Not counted: element-wise work (norms, RoPE, softmax exponentials),
which is O(d) per row and the same in both paths, and the LM head, which is computed lazily
on request.

Baselines (DESIGN.md section 4), all on the same positions: a dense forward, common-prefix
KV-cache reuse, and the cone of influence (every row an edit can reach through the window,
recomputed in full, layer by layer, with no quantization).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vqt.modeling.config import VQTConfig
from vqt.ops.tables import LayerCounts
from vqt.ops.visibility import seen_by_any, visible_counts


class MacCounter:
    """Accumulates MACs by kind; ``total`` is what the ops-reduction ratio compares."""

    def __init__(self, cfg: VQTConfig) -> None:
        self.cfg = cfg
        self.by_kind: Counter[str] = Counter()
        # MACs per row, pair or group vector of each kind (counting runs once per layer of every edit)
        hd = cfg.head_dim
        self._qkv_row = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
        self._pair = 2 * cfg.n_heads * hd
        self._search = cfg.codebook_size * cfg.group_dim
        self._skip = 3 * cfg.group_dim
        # a quantized row: the lookup-table sum, plus quantize-then-correct's d x d correction product
        self._output_row = {True: cfg.n_groups * cfg.d_model + (cfg.d_model ** 2 if cfg.quantizer == "qtc" else 0),
                            False: cfg.d_model * cfg.n_heads * hd}
        self._mlp_row = 3 * cfg.d_model * cfg.d_ff
        self._sink = cfg.sink != "none"

    def fresh(self) -> "MacCounter":
        """An empty counter with the same rates (cheaper than building one: a document keeps one to copy)."""
        out = MacCounter.__new__(MacCounter)
        out.__dict__.update(self.__dict__)
        out.by_kind = Counter()
        return out

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def qkv(self, rows: int) -> None:
        self.by_kind["qkv"] += rows * self._qkv_row

    def attention(self, pairs: int, kind: str = "attention") -> None:
        """Score plus weighted value for each visible pair, per query head."""
        self.by_kind[kind] += pairs * self._pair

    def quantize_search(self, vectors: int) -> None:
        """Distances of ``vectors`` group vectors to every codeword of their codebook."""
        self.by_kind["quantize"] += vectors * self._search

    def quantize_skip(self, vectors: int) -> None:
        """The certified-skip check of ``vectors`` group vectors: three distances (how far each moved, and
        its old and new distance to its codeword)."""
        self.by_kind["quantize"] += vectors * self._skip

    def output(self, rows: int, quantized: bool) -> None:
        """Lookup-table sum (with a quantize-then-correct correction: plus its d x d product) of a quantized
        layer, or the W_o projection of an unquantized one."""
        self.by_kind["output"] += rows * self._output_row[quantized]

    def mlp(self, rows: int) -> None:
        self.by_kind["mlp"] += rows * self._mlp_row

    def rows(self, rows: int, pairs: int, quantized: bool) -> None:
        """One layer recomputed from scratch on ``rows`` positions that see ``pairs`` keys in all (count a
        sink among the pairs: one per row)."""
        self.qkv(rows)
        self.attention(pairs)
        if quantized:
            self.quantize_search(rows * self.cfg.n_groups)
        self.output(rows, quantized)
        self.mlp(rows)

    def layer(self, counts: LayerCounts, quantized: bool) -> None:
        """What one incremental layer step did (``LayerCounts``), in MACs (the kinds of ``rows``, added
        in place: this runs for every layer of every edit)."""
        k, c = self.by_kind, counts
        k["qkv"] += c.dirty * self._qkv_row
        if c.affected:
            k["attention_delta"] += c.delta_pairs * self._pair
        k["attention"] += (c.full_pairs + (c.full_rows if self._sink else 0)) * self._pair
        if quantized:
            k["quantize"] += c.skip_checks * self._skip + c.searches * self._search
        k["output"] += c.mlp_rows * self._output_row[quantized]
        k["mlp"] += c.mlp_rows * self._mlp_row


@dataclass(frozen=True)
class Baselines:
    """MACs of the baselines on one edited document."""

    dense: int  # a dense forward
    prefix: int  # common-prefix KV-cache reuse: recompute from the first changed token on
    cone: int  # the cone of influence, without quantization


def _per_row_and_pair(cfg: VQTConfig, quantized: bool) -> tuple[int, int]:
    """MACs of one row of one layer (its pairs aside) and of one (query, key) pair."""
    per_row, per_pair = MacCounter(cfg), MacCounter(cfg)
    per_row.rows(1, 0, quantized)
    per_pair.rows(0, 1, quantized)
    return per_row.total, per_pair.total


def baseline_macs(cfg: VQTConfig, positions: torch.Tensor, first: int, changed: Optional[torch.Tensor] = None,
                  removed: Optional[torch.Tensor] = None) -> Baselines:
    """Dense, prefix-reuse and cone MACs of one edited document.

    positions: the sorted positions after the edit; first: index of the first changed token.
    changed: positions of the tokens whose layer-0 input or position changed (new and renumbered
    ones); removed: positions of keys that left (deleted tokens, and the old positions of renumbered
    ones). Without them the cone equals prefix reuse.
    """
    p = positions.detach().to("cpu", torch.float64)
    counts = visible_counts(p, p, cfg.window).numpy()
    n, sink = len(p), int(cfg.sink != "none")

    def cost(mask: np.ndarray) -> int:  # every layer recomputes the rows of mask from scratch
        total = 0
        for i in range(cfg.n_layers):
            per_row, per_pair = _per_row_and_pair(cfg, cfg.layer_quantized(i))
            total += int(mask.sum()) * per_row + int(counts[mask].sum() + sink * mask.sum()) * per_pair
        return total

    dense, prefix = cost(np.ones(n, dtype=bool)), cost(np.arange(n) >= first)
    if changed is None:
        return Baselines(dense, prefix, prefix)
    return Baselines(dense, prefix, cone_macs(cfg, p, counts, changed, removed))


def cone_macs(cfg: VQTConfig, pos: torch.Tensor, counts: np.ndarray, changed: torch.Tensor,
              removed: Optional[torch.Tensor]) -> int:
    """MACs of recomputing, layer by layer, exactly the rows an edit can reach through the window with
    no quantization: at layer l the rows whose input changed (their q, k, v and full row) and every
    row that sees a changed key (its full row); each of those rows' output then changes at layer l+1.
    Keys that left (``removed`` positions) change every layer's key set."""
    nocodes = dataclasses.replace(cfg, quantize=False)
    qkv_row = MacCounter(nocodes)
    qkv_row.qkv(1)
    per_row, per_pair = _per_row_and_pair(nocodes, False)
    per_row -= qkv_row.total  # rows whose input did not change keep their q, k, v
    gone = torch.zeros(0, dtype=torch.float64) if removed is None else removed.detach().to("cpu", torch.float64)
    inputs = torch.zeros(len(pos), dtype=torch.bool)
    inputs[torch.searchsorted(pos, changed.detach().to("cpu", torch.float64))] = True  # (positions are unique)
    sink = int(cfg.sink != "none")
    total = 0
    for _ in range(cfg.n_layers):
        rows = (inputs | seen_by_any(torch.cat([pos[inputs], gone]), pos, cfg.window)).numpy()
        total += int(inputs.sum()) * qkv_row.total + int(rows.sum()) * per_row
        total += int(counts[rows].sum() + sink * rows.sum()) * per_pair
        inputs = torch.from_numpy(rows)
    return total


def dense_macs(cfg: VQTConfig, positions: torch.Tensor) -> int:
    """MACs of a dense forward over a document with these (sorted) positions."""
    return baseline_macs(cfg, positions, 0).dense


def prefix_reuse_macs(cfg: VQTConfig, positions: torch.Tensor, first: int) -> int:
    """MACs of common-prefix KV-cache reuse: every layer recomputes positions[first:] in full."""
    return baseline_macs(cfg, positions, first).prefix
