"""The VQT model: a Llama-style decoder whose attention outputs are vector-quantized (DESIGN.md section 1).

Read top to bottom: norm, rotary embedding, block, model. Everything after a block's
quantizer is per token and depends only on (x_i, c_i), which is what lets an edit's
cascade stop. ``forward`` is the batched training path; ``forward_dense`` is the
single-document oracle the incremental engine must reproduce, built from the same
operators the engine uses.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqt._checks import position_tensor, token_tensor
from vqt.modeling.config import VQTConfig
from vqt.modeling.quantize import make_quantizer
from vqt.ops import Backend, get_backend, layer
from vqt.ops.composite import output_groups
from vqt.ops import reference as ops
from vqt.ops.search import nearest
from vqt.ops.tables import LayerTables, LayerWeights
from vqt.ops.visibility import visible

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
DENSE_CHUNK_ROWS = 4096  # rows per chunk of a dense pass: bounds its transient memory independently of n


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_angles(pos: torch.Tensor, hd: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (..., n, 1, hd), of real-valued positions pos (..., n), rotate-half convention
    (``vqt.ops.layer.rope_angles``)."""
    return layer.rope_angles(pos, layer.inv_freq(hd, theta, pos.device), dtype)


def cached_weight(cache: dict, name: str, weights: Sequence[torch.Tensor], dtype: Optional[torch.dtype]
                  ) -> torch.Tensor:
    """``weights`` concatenated (one of them: itself), detached and in ``dtype`` (None: their own), kept in
    ``cache[name]`` until one of them or ``dtype`` changes."""
    key = (dtype, *((w._version, w.data_ptr(), w.dtype, w.device) for w in weights))
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        w = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        cached = cache[name] = (key, w if dtype is None else w.to(dtype).contiguous())
    return cached[1]


class Block(nn.Module):
    """RMSNorm -> GQA attention (with an optional sink) -> quantizer -> lookup-table output -> SwiGLU MLP."""

    def __init__(self, cfg: VQTConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.quantizer = make_quantizer(cfg) if cfg.layer_quantized(layer_idx) else None
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate = nn.Linear(d, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(d, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, d, bias=False)
        if cfg.sink != "none":  # the sink's key (in the query's frame), value and per-head logit
            self.sink_k = nn.Parameter(torch.zeros(cfg.n_kv_heads, hd))
            self.sink_v = nn.Parameter(torch.zeros(cfg.n_kv_heads, hd))
            self.sink_logit = nn.Parameter(torch.zeros(cfg.n_heads))
        self._projections = {"qkv": ("wq", "wk", "wv"), "gate_up": ("w_gate", "w_up"), "down": ("w_down",), "o": ("wo",)}
        self._fused: dict[str, tuple[tuple, torch.Tensor]] = {}  # concatenated projection weights (see fused_weight)
        # the dtype of the projections' weights in inference (None: the model's; VQTModel.set_matmul_dtype)
        self.matmul_dtype: Optional[torch.dtype] = None
        self._folded: dict[str, tuple[tuple, Optional[torch.Tensor]]] = {}  # W_o folded in (see lookup_table)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim)

    @property
    def has_sink(self) -> bool:
        return self.cfg.sink != "none"

    def qkv(self, x: torch.Tensor, pos: torch.Tensor, angles: Optional[tuple[torch.Tensor, torch.Tensor]] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x (..., n, d), pos (..., n) -> q (..., n, H, hd), k and v (..., n, Hkv, hd), RoPE applied, and
        the sink scores (..., n, H) (None without a sink). ``angles``: ``VQTModel.rope_angles(pos)``
        when the caller already has them."""
        cfg = self.cfg
        if cfg.pos_encoding == "rope" and angles is None:
            angles = rope_angles(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        sink = (self.sink_k, self.sink_logit, self.scale) if self.has_sink else None
        return layer.qkv(x, self.attn_norm.weight, self.attn_norm.eps, self._weight("qkv"), cfg.n_heads,
                         cfg.n_kv_heads, angles if cfg.pos_encoding == "rope" else None, sink)

    def sink_values(self) -> Optional[torch.Tensor]:
        """(H, hd) the sink value each query head reads (GQA: head h reads row h // (H / Hkv)), None without a sink."""
        if not self.has_sink:
            return None
        return self.sink_v.repeat_interleave(self.cfg.n_heads // self.cfg.n_kv_heads, dim=0)

    def sink_keys(self) -> torch.Tensor:
        """(H, hd) the sink key each query head scores against."""
        return self.sink_k.repeat_interleave(self.cfg.n_heads // self.cfg.n_kv_heads, dim=0)

    def fused_weight(self, name: str) -> torch.Tensor:
        """The weight of projection ``name`` ("qkv": wq, wk, wv concatenated; "gate_up": w_gate, w_up; "down";
        "o") in the matmul dtype, detached and cached until one of its parts or the matmul dtype changes."""
        weights = [getattr(self, lin).weight for lin in self._projections[name]]
        return cached_weight(self._fused, name, weights, self.matmul_dtype)

    def _weight(self, name: str) -> torch.Tensor:
        """The weight of projection ``name``: with autograd the model's own parameters (the parts separate
        leaves, the model's dtype), else ``fused_weight``."""
        weights = [getattr(self, lin).weight for lin in self._projections[name]]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return weights[0] if len(weights) == 1 else torch.cat(weights)
        return self.fused_weight(name)

    def layer_weights(self) -> LayerWeights:
        """What an incremental step of this layer reads (detached; valid until a weight changes)."""
        cfg, q = self.cfg, self.quantizer
        sink = {}
        if self.has_sink:
            # expanded to one row per query head once per model version, not in every step
            sink = {"sink_k": self.sink_keys().detach().contiguous(), "sink_v": self.sink_values().detach().contiguous(),
                    "sink_logit": self.sink_logit.detach()}
        return LayerWeights(
            attn_norm=self.attn_norm.weight.detach(), attn_eps=float(self.attn_norm.eps),
            w_qkv=self.fused_weight("qkv"), n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            scale=self.scale, mlp_norm=self.mlp_norm.weight.detach(), mlp_eps=float(self.mlp_norm.eps),
            w_gate_up=self.fused_weight("gate_up"), w_down=self.fused_weight("down"),
            codebook=None if q is None else q.codebook.detach().contiguous(),
            table=None if q is None else self.lookup_table(), w_corr=None if q is None else self.folded_correction(),
            w_o=self.fused_weight("o") if q is None else None, **sink)

    def _fold(self, name: str, parts: Optional[tuple[torch.Tensor, ...]], fold: Callable[..., torch.Tensor]
              ) -> Optional[torch.Tensor]:
        """``fold(W_o, *parts)`` detached, cached until W_o, a part or the matmul dtype changes (None when
        ``parts`` is)."""
        W = self.wo.weight
        key = None if parts is None else (self.matmul_dtype, *((t._version, t.data_ptr(), t.dtype, t.device)
                                                               for t in (W, *parts)))
        cached = self._folded.get(name)
        if cached is None or cached[0] != key:
            cached = (key, None if parts is None else fold(W.detach(), *(t.detach() for t in parts)))
            self._folded[name] = cached
        return cached[1]

    def lookup_table(self) -> torch.Tensor:
        """T (G, K, d) with T[g, c] = W_o[:, group g] @ E_out[g, c] (the quantizer's output codebook)."""
        assert self.quantizer is not None
        G, gd = self.cfg.n_groups, self.cfg.group_dim
        return self._fold("table", (self.quantizer.output_codebook(),), lambda W, E: torch.einsum(
            "gke,ged->gkd", E, rearrange(W, "d (g e) -> g e d", g=G, e=gd)))

    def folded_correction(self) -> Optional[torch.Tensor]:
        """(d, d) W_o C, the quantizer's correction folded with the output projection; None without one."""
        assert self.quantizer is not None
        return self._fold("correction", self.quantizer.correction_factors(),
                          lambda W, *factors: functools.reduce(torch.matmul, factors, W).to(self.matmul_dtype or W.dtype))

    def correct(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A lookup output ``out`` (m, d) plus the quantizer's correction of the rows' inputs x (m, d), if any."""
        w_corr = None if self.quantizer is None else self.folded_correction()
        if w_corr is None:
            return out
        return layer.corrected(out, x, self.attn_norm.weight, self.attn_norm.eps, w_corr)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """y = x + attn_out; x' = y + SwiGLU(RMSNorm(y)). Per token."""
        return layer.mlp_residual(x + attn_out, self.mlp_norm.weight, self.mlp_norm.eps, self._weight("gate_up"),
                                  self._weight("down"))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Batched training path: x (B, T, d), pos (B, T). Returns (x', VQ loss, extras)."""
        q, k, v, s = self.qkv(x, pos)
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        k = rearrange(k, "b n h d -> b h n d").repeat_interleave(rep, 1)
        v = rearrange(v, "b n h d -> b h n d").repeat_interleave(rep, 1)
        mask = visible(pos, pos, self.cfg.window).unsqueeze(-3)  # (B, 1, T, T)
        if s is not None:
            # The sink as key 0: a zero key whose score comes in through the additive mask (B, H, T, 1 + T).
            B, T = pos.shape
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            mask = torch.cat([rearrange(s, "b n h -> b h n").unsqueeze(-1), bias.expand(B, self.cfg.n_heads, T, T)], -1)
            k = torch.cat([k.new_zeros(B, self.cfg.n_heads, 1, k.shape[-1]), k], 2)
            v = torch.cat([self.sink_values().unsqueeze(1).expand(B, -1, 1, -1), v], 2)
        a = F.scaled_dot_product_attention(rearrange(q, "b n h d -> b h n d"), k, v, attn_mask=mask)
        a = rearrange(a, "b h n d -> b n (h d)")
        loss = x.new_zeros(())
        extras: dict = {"attn": a}
        if self.quantizer is not None and self.quantizer.enabled:
            h = None if self.quantizer.correction_factors() is None else self.attn_norm(x).flatten(0, 1)
            aq, codes, loss = self.quantizer(self.quantizer.split(a).flatten(0, 1), h)
            extras["codes"] = codes.view(*a.shape[:2], -1)
            a = aq.view_as(a)
        return self.finish(x, layer.linear(a, self._weight("o"))), loss, extras


@dataclass
class DenseOutput:
    """Result of ``VQTModel.forward_dense`` on one document."""

    codes: Optional[torch.Tensor]  # (L, n, G) long
    gaps: Optional[torch.Tensor]  # (L, n, G) distance gap d2 - d1 of each code
    hidden: torch.Tensor  # (n, d) final hidden states (after the final norm)
    residual: torch.Tensor  # (n, d) last block's output, before the final norm
    layers: list[LayerTables]  # every layer's rows (zero codes and radii for a dense twin)
    start: int = 0  # the document row the tables begin at (prefix reuse with keep_prefix=False: the first new row)

    def codes_agree(self, codes: torch.Tensor) -> bool:
        """The exactness contract for codes: identical, except where this forward's own distance gap
        is within float noise (a few times the search's float margin; in float64 that never happens)."""
        if self.codes is None:
            return True
        diff = self.codes != codes
        if not bool(diff.any()):
            return True
        radius = torch.stack([s.radius for s in self.layers])
        margin = self.gaps / 2 - radius  # the float margin nearest() subtracted
        return bool((self.gaps[diff] <= 4 * margin[diff]).all())


def _load_base(cfg: VQTConfig) -> dict[str, torch.Tensor]:
    """The base weights a delta checkpoint names: ``extra["base"]["loader"]`` is "module:function", called
    with the config; it returns a full state dict (imported by name, so this module depends on no loader)."""
    import importlib

    base = cfg.extra["base"]
    module, _, fn = str(base.get("loader", "")).partition(":")
    try:
        loader = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load the base weights {base!r}: {e}") from None
    return loader(cfg)


def apply_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base state with ``delta``'s tensors put in and its low-rank factors (``<linear>.lora_A``/``lora_B``)
    added: W += B @ A, in float64 and rounded once."""
    out = dict(base)
    for k, v in delta.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        out[k] = v
    for k, a in delta.items():
        if k.endswith(".lora_A"):
            prefix = k[: -len(".lora_A")]
            b = delta.get(prefix + ".lora_B")
            if b is None or prefix + ".weight" not in out:
                raise ValueError(f"low-rank factor {k} has no matching lora_B or weight")
            w = out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.double() + b.double() @ a.double()).to(w.dtype)
    return out


class VQTModel(nn.Module):
    """Token embedding, ``n_layers`` blocks, final RMSNorm, LM head, optional pooled classifier."""

    def __init__(self, cfg: VQTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_classes) if cfg.n_classes > 0 else None
        self._head: dict[str, tuple[tuple, torch.Tensor]] = {}  # the LM head in the matmul dtype (see logits)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype the projections, the MLP and the LM head multiply in at inference (the model's own
        unless ``set_matmul_dtype`` chose bfloat16)."""
        return self.blocks[0].matmul_dtype or self.dtype

    def set_matmul_dtype(self, dtype: Optional[torch.dtype]) -> "VQTModel":
        """Multiply the q/k/v, output, correction, MLP and LM-head weights in ``dtype`` at inference:
        ``torch.bfloat16`` keeps bfloat16 copies of them (activations stay in the model's dtype, rounded
        to bfloat16 on the way into each product: DESIGN.md section 8); None or the model's dtype: the
        model's own weights. Dense and incremental passes then run the same products, so a document
        built before the change is rebuilt by its next edit. Training (autograd) keeps the parameters."""
        if dtype == self.dtype:
            dtype = None
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"matmul dtype must be torch.bfloat16 or the model's {self.dtype}, got {dtype}")
        for b in self.blocks:
            b.matmul_dtype = dtype
        if dtype is not None:
            self.warm_products()
        return self

    @torch.no_grad()
    def warm_products(self, max_rows: int = 256) -> None:
        """Run each reduced-precision product shape of the model (projections, MLP, correction, LM head) once
        at every row bucket (``vqt.ops.layer.product_rows``) up to ``max_rows``, so that oneDNN compiles its
        kernels here (about 1 ms per shape, a few tenths of a second in all for SmolLM2) and not during a
        document's first edits. Called by ``set_matmul_dtype``; a no-op without reduced-precision products."""
        if self.matmul_dtype == self.dtype:
            return
        weights = {}
        for b in self.blocks:
            lw = b.layer_weights()
            for w in (lw.w_qkv, lw.w_gate_up, lw.w_down, lw.w_o, lw.w_corr):
                if w is not None and w.dtype != self.dtype:
                    weights.setdefault(tuple(w.shape), w)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        weights.setdefault(("head",), cached_weight(self._head, "head", [head], self.matmul_dtype))
        buckets = sorted({layer.product_rows(m) for m in range(1, max_rows + 1)})
        for w in weights.values():
            for m in buckets:
                layer.linear(torch.zeros(m, w.shape[1], dtype=self.dtype, device=w.device), w)

    # ----------------------------------------------------------------- heads
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from final hidden states (..., d) -> (..., vocab), in the matmul dtype."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if self.matmul_dtype == self.dtype or (torch.is_grad_enabled() and w.requires_grad):
            return hidden @ w.T
        return layer.linear(hidden, cached_weight(self._head, "head", [w], self.matmul_dtype))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ValueError("this model has no classification head (config.n_classes == 0)")
        return self.classifier(pooled)

    # ---------------------------------------------------------- training path
    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> dict:
        """Batched forward for training. tokens (B, T); positions (B, T) float, default 0..T-1.

        Returns a dict with ``logits`` (B, T, V), ``vq_loss``, per-layer ``attn`` and ``codes``,
        ``hidden`` (B, T, d) and, given targets, ``lm_loss`` (next-token cross-entropy; -100 ignored).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, dtype=torch.float64, device=tokens.device).expand(B, T)
        x = self.embed(tokens)
        vq_loss = x.new_zeros(())
        attn, codes = [], []
        for block in self.blocks:
            x, loss, extras = block(x, positions)
            vq_loss = vq_loss + loss
            attn.append(extras["attn"])
            codes.append(extras.get("codes"))
        hidden = self.norm(x)
        out = {"hidden": hidden, "vq_loss": vq_loss, "attn": attn, "codes": codes}
        out["logits"] = self.logits(hidden)
        if targets is not None:
            out["lm_loss"] = F.cross_entropy(out["logits"].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return out

    # ---------------------------------------------------------- dense oracle
    def check_inputs(self, token_ids: torch.Tensor) -> None:
        """Raise a clear error for token ids outside the vocabulary."""
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size):
            bad = token_ids[(token_ids < 0) | (token_ids >= self.config.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {self.config.vocab_size})")

    @torch.no_grad()
    def forward_dense(self, token_ids: Sequence[int] | torch.Tensor,
                      positions: Optional[Sequence[float] | torch.Tensor] = None,
                      cache: Optional[DenseOutput] = None, start: int = 0, *, keep_prefix: bool = True,
                      backend: Optional[str | Backend] = None, chunk_rows: int = DENSE_CHUNK_ROWS,
                      follow_codes: Optional[torch.Tensor] = None, spare_rows: int = 0) -> DenseOutput:
        """Run one document densely; returns per-layer codes and gaps and the final hidden states.

        positions: strictly increasing reals (default 0..n-1). Uses the engine's operators,
        so this is the reference the incremental engine is compared with. With ``cache`` (the
        dense output of a document sharing tokens and positions [0, start)), only rows
        [start, n) are computed against the cached prefix keys: common-prefix KV-cache reuse.
        ``keep_prefix=False`` returns only those rows (``DenseOutput.start == start``) and copies from the
        cache nothing but the keys and values they attend to, as a KV-cache server would.

        ``backend``: whose ``attention_rows`` and ``lookup`` to run (a name such as "cpu", or a
        ``vqt.ops.Backend``); None (the default) is the plain reference operators. Every backend is
        exact, so only float rounding differs. ``chunk_rows``: rows computed together within a layer,
        which bounds the pass's transient memory (MLP intermediates, distances, key bands) whatever n.

        ``follow_codes`` (L, n, G), e.g. an incremental document's codes: the float32 contract (DESIGN.md
        section 8). Wherever this pass's own choice of a code is undecided at float noise (its distance
        gap within a few times the search's float margin, as ``DenseOutput.codes_agree`` judges) and
        ``follow_codes`` holds another code, that code is taken and fed to the layers above: each layer
        is then the dense forward of that layer given the followed codes of the layers below, and the
        document must match it exactly (in float64 no gap is at noise, so nothing is followed).

        ``spare_rows``: every per-row table (and the hidden states) is allocated with room for this many
        more rows after its own. The room is never touched here, so it costs address space, not memory;
        a document built from this pass grows into it without copying its tables (``SlotCache``).
        """
        tok = token_tensor(token_ids, "token_ids", self.device)
        self.check_inputs(tok)
        n = tok.numel()
        pos = (torch.arange(n, dtype=torch.float64, device=self.device) if positions is None
               else position_tensor(positions, n, self.device))
        if cache is None:
            start = 0
        elif len(cache.layers) != len(self.blocks):
            raise ValueError(f"the prefix cache has {len(cache.layers)} layers, this model {len(self.blocks)}")
        elif cache.start:
            raise ValueError(f"the prefix cache holds rows from {cache.start} on, not the whole document "
                             f"(it was computed with keep_prefix=False)")
        elif not 0 <= start <= min(n, cache.hidden.shape[0]):
            raise ValueError(f"prefix start {start} is outside [0, {min(n, cache.hidden.shape[0])}]")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if follow_codes is not None and (not self.config.quantize or tuple(follow_codes.shape) != (
                len(self.blocks), n, self.config.n_groups)):
            raise ValueError(f"follow_codes must be ({len(self.blocks)}, {n}, {self.config.n_groups}) codes of a "
                             f"quantized model, got {tuple(follow_codes.shape)}")
        if isinstance(spare_rows, bool) or not isinstance(spare_rows, int) or spare_rows < 0:
            raise ValueError(f"spare_rows must be an integer >= 0, got {spare_rows!r}")
        return self._dense(tok, pos, cache, start, backend=self._dense_backend(backend), chunk_rows=chunk_rows,
                           keep_prefix=keep_prefix, follow=follow_codes, spare_rows=spare_rows)

    def _dense_backend(self, backend: Optional[str | Backend]) -> Optional[Backend]:
        if backend is None or isinstance(backend, Backend):
            return backend
        if isinstance(backend, str):
            return get_backend(backend, self.device)
        raise TypeError(f"backend must be a backend name or a vqt.ops.Backend, not {type(backend).__name__}")

    def rope_frequencies(self) -> Optional[torch.Tensor]:
        """RoPE's inverse frequencies (head_dim/2,) float64 on the model's device; None without RoPE."""
        cfg = self.config
        return layer.inv_freq(cfg.head_dim, cfg.rope_theta, self.device) if cfg.pos_encoding == "rope" else None

    def rope_angles(self, pos: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """RoPE (cos, sin) of positions pos (..., n), each (..., n, 1, head_dim); None without RoPE."""
        cfg = self.config
        return rope_angles(pos, cfg.head_dim, cfg.rope_theta, self.dtype) if cfg.pos_encoding == "rope" else None

    def _layer_tables(self, n: int, base: int, kbase: int, start: int, old: Optional[LayerTables], spare: int = 0
                      ) -> tuple[LayerTables, torch.Tensor, torch.Tensor]:
        """Uninitialized tables of one layer of a dense pass for rows [base, n), and its keys and values for
        rows [kbase, n) (kbase <= base; the tables' k and v are views of them); rows before ``start`` are
        copied from ``old``. Every table owns its storage, with room for ``spare`` more rows after its own
        (allocated, never touched: see ``forward_dense``). Returns (tables, keys, values)."""
        cfg, dt, dev = self.config, self.dtype, self.device
        H, Hkv, hd, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_groups
        keys, values = (torch.empty(n - kbase + spare, Hkv, hd, dtype=dt, device=dev)[:n - kbase] for _ in range(2))
        shapes = dict(x=(cfg.d_model,), q=(H, hd), U=(H, hd), Z=(H,), M=(H,), codes=(G,), radius=(G,),
                      sink=(H,) if cfg.sink != "none" else None)

        def table(name: str, shape: Optional[tuple]) -> Optional[torch.Tensor]:
            return None if shape is None else torch.empty(
                (n - base + spare, *shape), dtype=torch.long if name == "codes" else dt, device=dev)[:n - base]

        t = LayerTables(k=keys[base - kbase:], v=values[base - kbase:],
                        **{name: table(name, shape) for name, shape in shapes.items()})
        if old is not None:
            for name in shapes:
                rows = getattr(t, name)
                if rows is not None:
                    rows[:start - base] = getattr(old, name)[base:start]
            keys[:start - kbase], values[:start - kbase] = old.k[kbase:start], old.v[kbase:start]
        return t, keys, values

    def _dense(self, tok: torch.Tensor, pos: torch.Tensor, cache: Optional[DenseOutput], start: int,
               before_quantize: Optional[Callable[[Block, torch.Tensor, torch.Tensor], None]] = None,
               backend: Optional[Backend] = None, chunk_rows: int = DENSE_CHUNK_ROWS,
               keep_prefix: bool = True, follow: Optional[torch.Tensor] = None, spare_rows: int = 0) -> DenseOutput:
        """The dense pass itself; ``before_quantize(block, a, x)`` sees each layer's attention outputs and inputs
        first (rows [start, n)).

        Each layer runs in two sweeps over chunks of ``chunk_rows`` rows, writing into the output tables:
        q/k/v and attention (a chunk's queries see only keys of rows up to its own last, already
        written), then (after ``before_quantize``) quantization, the output projection and the MLP.
        Rows [base, n) are output (base = 0, or ``start`` without ``keep_prefix``); keys and values are
        kept from row kbase on, the first one row ``base`` can see.
        """
        cfg = self.config
        attend = ops.attention_rows if backend is None else backend.attention_rows
        lookup = ops.lookup if backend is None else backend.lookup
        n = tok.numel()
        base = 0 if cache is None or keep_prefix else start
        kbase = base if base == n else self._first_key(pos, base)
        chunks = [slice(lo, min(lo + chunk_rows, n)) for lo in range(start, n, chunk_rows)]
        local = [slice(c.start - base, c.stop - base) for c in chunks]  # the same rows in the output tables
        L, G = len(self.blocks), cfg.n_groups
        gaps = None
        if cfg.quantize:  # every layer's gaps, prefix rows copied from the cache (codes: in the layers' tables)
            gaps = torch.full((L, n - base, G), float("inf"), dtype=self.dtype, device=self.device)
            if cache is not None:
                gaps[:, :start - base] = cache.gaps[:, base:start]
        cached = (lambda li: None) if cache is None else (lambda li: cache.layers[li])  # noqa: E731
        layers: list[LayerTables] = []
        t, keys, values = self._layer_tables(n, base, kbase, start, cached(0), spare_rows)
        for c, r in zip(chunks, local):
            t.x[r] = self.embed(tok[c])
        angles = [self.rope_angles(pos[c]) for c in chunks]  # the same for every layer (n x head_dim x 2 values)
        for li, block in enumerate(self.blocks):
            sink_v = block.sink_values()
            for c, r, rot in zip(chunks, local, angles):
                q, k, v, s = block.qkv(t.x[r], pos[c], rot)
                t.q[r], t.k[r], t.v[r] = q, k, v
                if s is not None:
                    t.sink[r] = s
                band = slice(self._first_key(pos, c.start), c.stop)  # every key a row of this chunk can see
                kb = slice(band.start - kbase, band.stop - kbase)
                U, Z, M = attend(q, pos[c], keys[kb], values[kb], pos[band], cfg.window, block.scale, s, sink_v)
                t.U[r], t.Z[r], t.M[r] = U, Z, M
            if before_quantize is not None:
                before_quantize(block, output_groups(t.U[start - base:], t.Z[start - base:], G), t.x[start - base:])
            nxt = None
            if li + 1 < L:
                nxt, keys_next, values_next = self._layer_tables(n, base, kbase, start, cached(li + 1), spare_rows)
            resid = torch.empty(n - base, cfg.d_model, dtype=self.dtype, device=self.device) if nxt is None else nxt.x
            for r in local:
                a = output_groups(t.U[r], t.Z[r], G)
                if block.quantizer is not None:
                    res = nearest(a, block.quantizer.codebook)
                    chosen = res.codes
                    if follow is not None:  # the float32 contract: follow the document where this pass is undecided
                        want = follow[li, r.start + base:r.stop + base].to(chosen.device)
                        chosen = torch.where((chosen != want) & (res.gap <= 4 * (res.gap / 2 - res.radius)), want,
                                             chosen)
                    t.codes[r], t.radius[r], gaps[li, r] = chosen, res.radius, res.gap
                    out = block.correct(lookup(block.lookup_table(), chosen), t.x[r])
                else:  # an unquantized layer: zero codes, and a gap no float noise can close
                    t.codes[r], t.radius[r] = 0, 0
                    out = layer.linear(a.flatten(1), block.fused_weight("o"))
                resid[r] = block.finish(t.x[r], out)
            layers.append(t)
            if nxt is not None:
                t, keys, values = nxt, keys_next, values_next
        hidden = resid.new_empty((resid.shape[0] + spare_rows, resid.shape[1]))[:resid.shape[0]]
        if cache is not None:
            resid[:start - base], hidden[:start - base] = cache.residual[base:start], cache.hidden[base:start]
        for r in local:
            hidden[r] = self.norm(resid[r])
        codes = torch.stack([t.codes for t in layers]) if cfg.quantize else None
        return DenseOutput(codes, gaps, hidden, resid, layers, start=base)

    def _first_key(self, pos: torch.Tensor, row: int) -> int:
        """The first row whose key row ``row`` (and every later row) can see: 0 without a window."""
        if self.config.window is None or row >= pos.numel():
            return 0 if self.config.window is None else row
        return int(torch.searchsorted(pos, pos[row] - self.config.window, right=True))

    # ----------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate_codebooks(self, token_ids: Sequence[int] | torch.Tensor, iters: int = 20, seed: int = 0,
                            progress: bool = False, target_window: Optional[float] | str = "own") -> list[float]:
        """Fit every quantizer in closed form on this model's own activations over token_ids (k-means
        codebooks; for quantize-then-correct also the output codebook and the correction).

        Layer by layer: layer l is fitted on activations computed with layers < l already quantized,
        so each quantizer sees the inputs it will quantize. ``target_window``: what a corrected output
        reproduces: "own" (default), the layer's own attention output; a number or None, the output the
        same layer computes on the same inputs with that window (None: full attention) and no sink, i.e.
        the original model's attention, so the output codebook and correction also make up for the
        window. Returns the seconds each layer took (its share of the dense pass included);
        ``progress`` shows a bar.
        """
        if not self.config.quantize:
            raise ValueError("calibrate_codebooks needs a quantized model (config.quantize=True)")
        from tqdm import tqdm

        g = torch.Generator(device="cpu").manual_seed(seed)
        tok = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        pos = torch.arange(tok.numel(), dtype=torch.float64, device=self.device)
        seconds: list[float] = []
        bar = tqdm(total=len(self.blocks), desc="calibrating", unit="layer", disable=not progress, dynamic_ncols=True)
        last = time.perf_counter()

        def fit(block: Block, a: torch.Tensor, x: torch.Tensor) -> None:
            nonlocal last
            if block.quantizer is not None:
                target = None if target_window == "own" else self._unwindowed_outputs(block, x, pos, target_window)
                block.quantizer.calibrate(a, block.attn_norm(x), iters=iters, generator=g, target=target)
            now = time.perf_counter()
            seconds.append(now - last)
            last = now
            bar.set_postfix_str(f"layer {block.layer_idx}: {seconds[-1]:.1f} s")
            bar.update()

        with bar:
            self._dense(tok, pos, None, 0, before_quantize=fit)
        return seconds

    def _unwindowed_outputs(self, block: Block, x: torch.Tensor, pos: torch.Tensor, window: Optional[float]
                            ) -> torch.Tensor:
        """Attention outputs (n, G, gd) of ``block`` on inputs x at positions pos with ``window`` and no sink."""
        q, k, v, _ = block.qkv(x, pos, self.rope_angles(pos))
        U, Z, _ = ops.attention_rows(q, pos, k, v, pos, window, block.scale)
        return output_groups(U, Z, self.config.n_groups)

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write config.json and model.safetensors into ``directory``.

        ``state`` (default: the whole state dict) may be a delta over a base model named in
        ``config.extra["base"]`` (see ``from_pretrained``): only the tensors that differ from it, and
        low-rank factors ``<linear>.lora_A``/``lora_B`` whose product is added to ``<linear>.weight``.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.save(d / CONFIG_FILE)
        state = self.state_dict() if state is None else state
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(d / WEIGHTS_FILE),
                  metadata={"format": "vqt", "version": "1"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        dtype: Optional[torch.dtype] = None) -> "VQTModel":
        """Load a checkpoint written by ``save_pretrained``; the model comes back in eval mode,
        in ``dtype`` (default: the dtype it was saved in)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"checkpoint directory {d} does not exist")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"checkpoint {d} has no {name} (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = VQTConfig.load(d / CONFIG_FILE)
        try:
            state = load_file(str(d / WEIGHTS_FILE), device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{d / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
        saved_dtype = next(iter(state.values())).dtype if state else torch.float32
        if "base" in cfg.extra:  # a delta over base weights read at run time (e.g. a registry package's GGUF)
            state, saved_dtype = apply_delta(_load_base(cfg), state), torch.float32
        model = cls(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"checkpoint {d} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"checkpoint {d}: {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
        model = model.to(saved_dtype)
        model.load_state_dict(state)
        return model.to(device=map_location, dtype=dtype or saved_dtype).eval()

    def without_quantization(self) -> "VQTModel":
        """The same weights with the quantizers off (W_o applied to the raw attention output): the model
        whose incremental cost is the cone of influence."""
        cfg = VQTConfig.from_dict({**self.config.to_dict(), "quantize": False})
        twin = VQTModel(cfg).to(device=self.device, dtype=self.dtype)
        twin.load_state_dict({k: v for k, v in self.state_dict().items() if ".quantizer." not in k})
        return twin.eval()

    def describe(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        q = (f"{c.quantizer.upper()} {c.granularity} x{c.n_groups} K={c.codebook_size}" if c.quantize
             else "dense twin (no VQ)")
        if c.quantize and c.quantize_layers is not None:
            q += f" on layers {c.quantize_layers}"
        if c.sink != "none":
            q += f", {c.sink} sink"
        return (f"VQT {c.n_layers}L d={c.d_model} H={c.n_heads}/{c.n_kv_heads} {c.pos_encoding} "
                f"window={c.window} {q}, {n / 1e6:.2f}M params, {self.dtype}")

