"""The named records that cross the engine-backend seam (and the Python-C++ one).

``LayerTables``: one layer's per-row tensors, for every position of a dense pass or every slot of
a document's cache. ``LayerWeights``: what one layer step reads from the model, gathered once
per model version. ``EditPlan``: what every layer step of one update shares (slots, positions,
flags). ``LayerCounts``: what a layer step did, by name. The fused C++ step reads and returns
these by field name, never by position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class LayerTables:
    """Rows of one layer (R rows: positions of a dense pass, or slots of a cache)."""

    x: torch.Tensor  # (R, d) layer input
    q: torch.Tensor  # (R, H, hd) queries, RoPE applied
    k: torch.Tensor  # (R, Hkv, hd) keys, RoPE applied
    v: torch.Tensor  # (R, Hkv, hd) values
    U: torch.Tensor  # (R, H, hd) attention numerator (softmax weights times values, at stabilizer M)
    Z: torch.Tensor  # (R, H) denominator
    M: torch.Tensor  # (R, H) stabilizer (the row's largest score, the sink's included)
    codes: torch.Tensor  # (R, G) long (zeros for a dense twin)
    # (R, G) certified radius of each code around the row's current attention output U / Z: no other
    # codeword is nearer anywhere in that ball (set by each search, carried through every move since by
    # vqt.ops.reference.remaining_radius); zeros for a dense twin.
    radius: torch.Tensor
    sink: Optional[torch.Tensor] = None  # (R, H) each query's attention-sink score (models with a sink)
    # (R, H) a bound on the relative rounding error U and Z have gathered from delta updates since the row was
    # last computed in full (0 after a full row); a row whose bound exceeds EditPlan.drift_budget is refreshed.
    drift: Optional[torch.Tensor] = None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every table present, in field order."""
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if t is not None:
                yield f.name, t

    def map(self, fn) -> "LayerTables":
        """A new record with ``fn`` applied to every table present."""
        return LayerTables(**{name: fn(t) for name, t in self.items()})

    def bytes_per_row(self) -> int:
        return sum(t.shape[1:].numel() * t.element_size() for _, t in self.items())


@dataclass(frozen=True)
class LayerWeights:
    """What an incremental step of one Llama-style layer reads from the model (detached tensors)."""

    attn_norm: torch.Tensor  # (d,)
    attn_eps: float
    w_qkv: torch.Tensor  # ((H + 2 Hkv) hd, d): wq, wk, wv concatenated
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float  # softmax temperature 1 / sqrt(hd)
    mlp_norm: torch.Tensor  # (d,)
    mlp_eps: float
    w_gate_up: torch.Tensor  # (2 d_ff, d): w_gate, w_up concatenated
    w_down: torch.Tensor  # (d, d_ff)
    codebook: Optional[torch.Tensor] = None  # (G, K, gd); None for a dense twin
    table: Optional[torch.Tensor] = None  # (G, K, d) lookup table E @ W_o per group
    w_o: Optional[torch.Tensor] = None  # (d, H hd) for a dense twin (its output is W_o a)
    # (d, d) quantize-then-correct: the output of a quantized row is table[codes] + w_corr RMSNorm(x) (its own
    # attention norm; vqt.ops.layer.corrected); None for plain VQ
    w_corr: Optional[torch.Tensor] = None
    sink_k: Optional[torch.Tensor] = None  # (H, hd) per query head: sink key in the query's frame (scale q_raw . k)
    sink_v: Optional[torch.Tensor] = None  # (H, hd) per query head: the sink value it reads
    sink_logit: Optional[torch.Tensor] = None  # (H,) added to every sink score
    codebook_norms: Optional[torch.Tensor] = None  # (G, K) float64 |e|^2, precomputed by a backend that wants them

    @property
    def quantized(self) -> bool:
        return self.codebook is not None

    @property
    def has_sink(self) -> bool:
        return self.sink_k is not None


@dataclass
class FinalNorm:
    """What the last layer's step commits into instead of a next layer's input table: the final RMSNorm
    (``weight``, ``eps``), the per-slot final hidden states and their sum over the live slots, both
    updated in place. The last block's output itself is not kept: only its norm is."""

    hidden: torch.Tensor  # (C, d)
    pooled_sum: torch.Tensor  # (d,)
    weight: torch.Tensor  # (d,)
    eps: float


@dataclass
class EditPlan:
    """What every layer step of one incremental update shares (C = slot capacity)."""

    deleted: torch.Tensor  # slots of the removed tokens
    order: torch.Tensor  # slots in document order after the edit (positions sorted along it)
    pos: torch.Tensor  # (C,) float64 positions after the edit
    old_pos: torch.Tensor  # (C,) float64 positions before it
    is_new: torch.Tensor  # (C,) bool: inserted by this edit
    is_forced: torch.Tensor  # (C,) bool: recomputed at every layer (new, or moved to a new position)
    rope: Optional[torch.Tensor]  # RoPE's inverse frequencies (hd/2,) float64 (vqt.ops.layer.rope_angles); None without
    window: Optional[float]
    tau: float  # cancellation guard threshold
    drift_budget: float = float("inf")  # refresh a delta-updated row whose LayerTables.drift exceeds this
    pos_order: Optional[torch.Tensor] = None  # (n,) float64 CPU: ``pos[order]`` (sorted), for O(edit) range searches
    # the slots each layer recomputed (its ``post``), appended by every layer_commit: what the edit reached,
    # kept per edit in O(edit) (a per-slot counter would cost an O(n) array per update)
    posts: list[torch.Tensor] = dataclasses.field(default_factory=list)


@dataclass
class LayerCounts:
    """What one layer step did; vqt.engine.macs turns it into MACs."""

    dirty: int = 0  # rows recomputed in full (new q, k, v and a full attention row)
    affected: int = 0  # clean rows whose attention was delta-updated
    flipped: int = 0  # of those, rows whose code changed
    code_flips: int = 0  # individual codes that changed among those rows
    searches: int = 0  # code searches performed (group vectors)
    skips: int = 0  # code searches skipped by the certified radius
    refreshes: int = 0  # rows recomputed by the cancellation guard
    delta_pairs: int = 0  # (query, key) pairs of the delta updates
    full_pairs: int = 0  # (query, key) pairs of the full rows (sink not included)
    full_rows: int = 0  # full rows (dirty plus refreshed), each of which also scores the sink
    skip_checks: int = 0  # group vectors checked against their certified radius
    mlp_rows: int = 0  # rows whose output and MLP were recomputed
