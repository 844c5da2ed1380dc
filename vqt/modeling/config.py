"""Model configuration: one dataclass that travels with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

Granularity = Literal["layer", "head", "product"]
PosEncoding = Literal["rope", "none"]
SinkKind = Literal["none", "token", "logit"]
QuantizerKind = Literal["vq", "qtc"]


@dataclass
class VQTConfig:
    """Hyper-parameters of a VQT model (DESIGN.md section 1).

    Defaults describe a small model that trains on a 2-core CPU in minutes.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head); fewer = GQA
    d_ff: Optional[int] = None  # SwiGLU hidden width; None = 8/3 d rounded up to 8
    # Longest document a Document accepts (tokens) for full-attention models; windowed models have no cap
    # unless DocumentOptions.max_tokens sets one (nothing in their computation depends on length).
    max_len: int = 2048
    pos_encoding: PosEncoding = "rope"
    rope_theta: float = 10000.0
    window: Optional[float] = None  # sliding window on positions: key j visible iff pos_i - w < pos_j <= pos_i
    # Attention sink (DESIGN.md section 7): one more key per layer, visible to every query, that no edit
    # can touch. Its key, value and a per-head logit are model parameters; its score is computed from the
    # query before RoPE, i.e. at a fixed relative offset, so no position change alters it. "token": the
    # parameters hold a real token's key and value (set by conversion); "logit": zero key and value, a
    # learned logit only (mass parked in the denominator). Both run the same code.
    sink: SinkKind = "none"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    n_classes: int = 0  # >0 adds a classification head on mean-pooled final features
    # Tightest spacing of stable positions a Document allows before it renumbers (DESIGN.md section 3):
    # how squeezed the model saw positions in training. Engine policy, not part of the function computed.
    min_spacing: float = 1 / 32

    # Vector quantization of the attention output (DESIGN.md section 1).
    quantize: bool = True  # False gives the dense twin: same block, W_o applied to the raw attention output
    # The layers that are quantized (None: every layer). An unquantized layer passes every change on, like
    # the dense twin; a quantized one stops the cascade wherever codes stay put.
    quantize_layers: Optional[list[int]] = None
    granularity: Granularity = "head"  # one codebook per layer, per head, or product (sub-codebooks per head)
    # What a code's output is (vqt.modeling.quantize): "vq", the codeword searched, W_o E[c]; "qtc"
    # (quantize-then-correct), a separate output codeword plus a linear correction from the layer's own
    # normed input, W_o (E_out[c] + C RMSNorm(x)). The correction depends only on the position's own input,
    # so the cascade still stops wherever codes stay put; it costs one d x d product per recomputed row.
    quantizer: QuantizerKind = "vq"
    correction_rank: Optional[int] = None  # "qtc": the correction's rank (None: full; a shipped delta holds 2 r d)
    n_subvectors: int = 2  # sub-codebooks per head when granularity == "product"
    codebook_size: int = 64
    commitment_weight: float = 0.25
    ema_decay: float = 0.99  # EMA codebook updates in training; 0 disables EMA (codebook learnt by gradient)
    dead_code_threshold: float = 1e-3  # a code whose EMA usage falls below this fraction of the mean is restarted

    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (training command, metrics)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 8 * ((8 * self.d_model // 3 + 7) // 8)
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.d_model > 0 and self.n_layers >= 1 and self.n_heads > 0, "d_model, n_layers and n_heads must be positive"),
            (self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"),
            (self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"),
            (self.pos_encoding in ("rope", "none"), f"unknown pos_encoding {self.pos_encoding!r} (use 'rope' or 'none')"),
            (self.granularity in ("layer", "head", "product"), f"unknown granularity {self.granularity!r} (use 'layer', 'head' or 'product')"),
            (self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}"),
            (self.window is None or self.window > 0, f"window must be positive or None, got {self.window}"),
            (self.sink in ("none", "token", "logit"), f"unknown sink {self.sink!r} (use 'none', 'token' or 'logit')"),
            (self.quantizer in ("vq", "qtc"), f"unknown quantizer {self.quantizer!r} (use 'vq' or 'qtc')"),
            (self.correction_rank is None or 1 <= self.correction_rank <= self.d_model,
             f"correction_rank must be in [1, {self.d_model}] or None, got {self.correction_rank}"),
            (self.max_len > 0, "max_len must be positive"),
            (self.quantize_layers is None or all(isinstance(i, int) and 0 <= i < self.n_layers
                                                 for i in self.quantize_layers),
             f"quantize_layers must list layer indices in [0, {self.n_layers}), got {self.quantize_layers}"),
            (0 < self.min_spacing <= 1, f"min_spacing must be in (0, 1], got {self.min_spacing}"),
        ]
        if self.pos_encoding == "rope":
            checks.append((self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}"))
        if self.granularity == "product":
            checks.append((self.head_dim % self.n_subvectors == 0,
                           f"head_dim={self.head_dim} is not divisible by n_subvectors={self.n_subvectors}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def layer_quantized(self, i: int) -> bool:
        """Whether layer i has a quantizer."""
        return self.quantize and (self.quantize_layers is None or i in self.quantize_layers)

    def layer_corrected(self, i: int) -> bool:
        """Whether layer i's output carries a quantize-then-correct correction (M RMSNorm(x))."""
        return self.layer_quantized(i) and self.quantizer == "qtc"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_groups(self) -> int:
        """Codes per position per layer."""
        return {"layer": 1, "head": self.n_heads, "product": self.n_heads * self.n_subvectors}[self.granularity]

    @property
    def group_dim(self) -> int:
        """Width of the vector each code quantizes."""
        return self.n_heads * self.head_dim // self.n_groups

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQTConfig keys {unknown}; is this a VQT checkpoint of a newer version?")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "VQTConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_dict(d)
