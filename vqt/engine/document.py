"""The incremental engine: a document's cached state, updated exactly after token edits (DESIGN.md section 2).

State is stored by *slot*: every token owns one row in every per-layer tensor for as long
as it lives, an order list says which slot comes where, and deleted slots go to a free
list. An insertion or a deletion therefore moves no large arrays.
"""

from __future__ import annotations

import functools
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from vqt.engine.spans import check_spans
from vqt.engine.macs import MacCounter, dense_and_prefix_macs, dense_macs
from vqt.modeling.model import VQTModel
from vqt.ops import get_backend
from vqt.ops.composite import STATS, finish_outputs, layer_attend, layer_commit
from vqt.engine.positions import PositionMode, SpacingPolicy, plan_position_array

TokenIds = Union[Sequence[int], torch.Tensor]


@dataclass
class EditStats:
    """What one update cost and touched. Ratios compare MACs counted by vqt.macs."""

    macs: int  # MACs the incremental update spent
    n_tokens: int  # document length after the edit
    dirty_per_layer: list[int]  # positions recomputed in full at each layer (D_l)
    affected_per_layer: list[int]  # clean positions whose attention was delta-updated
    flips_per_layer: list[int]  # of those, positions whose code changed (F_l)
    code_flips_per_layer: list[int]  # individual codes that changed among those positions
    certified_skips: int  # code searches skipped by the certified radius
    searches: int  # code searches performed (group vectors)
    refreshes: int  # rows recomputed by the cancellation guard
    renumbered: int  # kept tokens whose position was renumbered
    seconds: float
    first_changed: int = 0  # index of the first changed token (where prefix reuse starts)
    inserted: int = 0  # new tokens
    deleted: int = 0  # removed tokens
    macs_by_kind: dict[str, int] = field(default_factory=dict)
    recomputed: Optional[torch.Tensor] = field(default=None, repr=False)  # (n,) layers that recomputed each token
    full_recompute: bool = False  # True when the state could not be reused
    reason: str = ""
    # (dense_macs, prefix_macs), or what computes them: counting the baselines' MACs is left until asked.
    baselines: Union[tuple[int, int], Callable[[], tuple[int, int]]] = field(default=(0, 0), repr=False)

    def _baselines(self) -> tuple[int, int]:
        if callable(self.baselines):
            self.baselines = self.baselines()
        return self.baselines

    @property
    def dense_macs(self) -> int:
        """MACs of a dense forward of the edited document."""
        return self._baselines()[0]

    @property
    def prefix_macs(self) -> int:
        """MACs of common-prefix KV-cache reuse on the same edit (same positions)."""
        return self._baselines()[1]

    @property
    def ratio(self) -> float:
        """Ops reduction: dense MACs / incremental MACs (inf when the edit cost nothing)."""
        return self.dense_macs / self.macs if self.macs else float("inf")

    @property
    def prefix_ratio(self) -> float:
        """Ops reduction of prefix reuse alone."""
        return self.dense_macs / self.prefix_macs if self.prefix_macs else float("inf")

    def summary(self) -> str:
        return (f"n={self.n_tokens} macs={self.macs:.3g} ratio={self.ratio:.1f}x (prefix {self.prefix_ratio:.1f}x) "
                f"dirty={self.dirty_per_layer} flips={self.flips_per_layer} skips={self.certified_skips} "
                f"refresh={self.refreshes} {self.seconds * 1e3:.1f}ms" + (" FULL RECOMPUTE" if self.full_recompute else ""))


@dataclass
class LayerCache:
    """Per-slot rows of one layer (capacity C)."""

    x: torch.Tensor  # (C, d) layer input
    q: torch.Tensor  # (C, H, hd)
    k: torch.Tensor  # (C, Hkv, hd)
    v: torch.Tensor  # (C, Hkv, hd)
    U: torch.Tensor  # (C, H, hd)
    Z: torch.Tensor  # (C, H)
    M: torch.Tensor  # (C, H)
    a_ref: torch.Tensor  # (C, G, gd) where each code was last searched (dense twin: the current output)
    codes: torch.Tensor  # (C, G)
    radius: torch.Tensor  # (C, G) certified radius around a_ref

    def grow(self, extra: int) -> None:
        for name, t in vars(self).items():
            setattr(self, name, torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]))


Edit = tuple[int, int, TokenIds]


# Walking a model's modules for its tensors costs more than a small edit, so the list is cached and
# walked again only after some module, parameter or buffer was (re)assigned anywhere.
_registrations = 0
_watched: "weakref.WeakKeyDictionary[VQTModel, tuple[int, list[torch.Tensor], tuple[int, ...]]]" = \
    weakref.WeakKeyDictionary()


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


def _model_key(model: VQTModel) -> tuple:
    """Changes whenever any parameter or buffer is replaced or modified in place."""
    hit = _watched.get(model)
    if hit is None or hit[0] != _registrations:
        tensors = list(model.parameters()) + list(model.buffers())
        hit = (_registrations, tensors, tuple(id(t) for t in tensors))
        _watched[model] = hit
    # Version counters only grow, so their sum changes with any in-place modification.
    return hit[2], sum(t._version for t in hit[1])


class Document:
    """A document's incremental state under a frozen VQT model.

    ``replace``/``apply_edits`` update it after token edits so that it always equals a dense
    forward of the same model on the current tokens and positions (codes identical in
    float64; see DESIGN.md section 2 for the float32 contract).
    """

    def __init__(self, model: VQTModel, token_ids: TokenIds = (), position_mode: PositionMode = "stable",
                 backend: str = "reference", positions: Optional[Sequence[float]] = None,
                 tau: Optional[float] = None, spacing: Optional[SpacingPolicy] = None) -> None:
        if not isinstance(model, VQTModel):
            raise TypeError(f"model must be a VQTModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() first (cached codes need frozen codebooks)")
        if position_mode not in ("stable", "canonical"):
            raise ValueError(f"unknown position_mode {position_mode!r} (use 'stable' or 'canonical')")
        self.model, self.cfg = model, model.config
        self.position_mode: PositionMode = position_mode
        # Default: the model's own minimum spacing (how squeezed it saw positions in training).
        self.spacing = spacing if spacing is not None else SpacingPolicy(min_spacing=model.config.min_spacing)
        self.ops = get_backend(backend, model.device)
        self.backend = self.ops.name
        fused = getattr(self.ops, "layer_attend", None)
        self._attend = fused if fused is not None else functools.partial(layer_attend, self.ops)
        self._commit = getattr(self.ops, "layer_commit", layer_commit)
        self._finish = getattr(self.ops, "finish_outputs", finish_outputs)
        # A backend may run a whole (quantized, Llama-style) layer in one call: vqt.ops.cpu.layer_step.
        self._step = getattr(self.ops, "layer_step", None)
        self._step_weights: list = []  # per layer, gathered at _build (valid while the model key holds)
        # Cancellation guard: refresh a row whose denominator keeps less than tau of its mass.
        self.tau = tau if tau is not None else (1e-4 if model.dtype == torch.float64 else 1e-2)
        # Positions only matter for RoPE and windows; with neither, renumbering changes nothing.
        self._pos_matters = self.cfg.pos_encoding == "rope" or self.cfg.window is not None
        tok = self._check_tokens(token_ids, "token_ids")
        self._check_length(len(tok))
        self._build(tok, positions)

    # ----------------------------------------------------------------- views
    def __len__(self) -> int:
        return self._order_t.numel()

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[self._order_t].tolist()

    @property
    def positions(self) -> torch.Tensor:
        """(n,) float64 positions in document order."""
        return self._pos[self._order_t].clone()

    @property
    def codes(self) -> torch.Tensor:
        """(L, n, G) current codes in document order."""
        o = self._order_t
        return torch.stack([c.codes[o] for c in self._layers]) if self._layers else torch.zeros(0, len(o), self.cfg.n_groups, dtype=torch.long)

    @property
    def hidden(self) -> torch.Tensor:
        """(n, d) final hidden states (after the final norm) in document order."""
        return self._hidden[self._order_t].clone()

    @property
    def pooled(self) -> torch.Tensor:
        """(d,) mean of the final hidden states, maintained incrementally."""
        return self._pooled_sum / max(len(self), 1)

    def classify(self) -> torch.Tensor:
        """Class logits from the pooled features (needs a model with a classification head)."""
        with torch.no_grad():
            return self.model.classify(self.pooled)

    def logits(self, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """LM logits computed now, only for the requested token indices (default: all)."""
        idx = self._order_t if indices is None else self._order_t[torch.as_tensor(indices, dtype=torch.long)]
        with torch.no_grad():
            return self.model.logits(self._hidden[idx])

    def state_bytes_per_token(self) -> int:
        """Bytes of cached state per token (every per-slot row of every layer, plus the output rows)."""
        rows = [t for c in self._layers for t in vars(c).values()] + [self._tokens, self._pos, self._resid, self._hidden]
        rows += list(self._angles or ())  # the per-slot RoPE table
        return sum(t[0].numel() * t.element_size() for t in rows)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes per token of a plain KV cache of the same model (keys and values of every layer)."""
        c = self.cfg
        return c.n_layers * 2 * c.n_kv_heads * c.head_dim * self._layers[0].k.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every cached tensor in document order (for comparisons and tests)."""
        o = self._order_t
        out = {"tokens": self._tokens[o], "positions": self._pos[o], "hidden": self._hidden[o],
               "residual": self._resid[o], "pooled_sum": self._pooled_sum}
        for li, c in enumerate(self._layers):
            for name, t in vars(c).items():
                out[f"layer{li}.{name}"] = t[o]
        return {k: v.clone() for k, v in out.items()}

    # ---------------------------------------------------------------- checks
    def _check_tokens(self, token_ids: TokenIds, what: str) -> torch.Tensor:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.device != self.model.device:
                raise ValueError(f"{what} are on {token_ids.device} but the model is on {self.model.device}")
            if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
                raise TypeError(f"{what} must be integers, got a {token_ids.dtype} tensor")
            tok = token_ids.reshape(-1).long()
        elif isinstance(token_ids, (str, bytes)):
            raise TypeError(f"{what} must be a sequence of token ids, not {type(token_ids).__name__} (use TextDocument for text)")
        else:
            vals = list(token_ids)
            for t in vals:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"{what} must be ints, got {t!r} ({type(t).__name__})")
            tok = torch.tensor(vals, dtype=torch.long, device=self.model.device)
        self.model.check_inputs(tok)
        return tok

    def _check_length(self, n: int) -> None:
        if n > self.cfg.max_len:
            raise ValueError(f"document of {n} tokens exceeds the model's max_len={self.cfg.max_len}")

    def _normalize_edits(self, edits: Sequence[Edit]) -> list[tuple[int, int, torch.Tensor]]:
        n = len(self)
        out = [(s, e, self._check_tokens(ids, "new_token_ids"))
               for s, e, ids in check_spans(edits, n, "token", "(start, end, new_token_ids)")]
        new_len = n + sum(len(t) - (e - s) for s, e, t in out)
        self._check_length(new_len)
        return out

    # ----------------------------------------------------------------- build
    def _build(self, tok: torch.Tensor, positions: Optional[Sequence[float]]) -> None:
        """Dense pass over the whole document; allocates the slot table."""
        cfg, model = self.cfg, self.model
        n = tok.numel()
        if positions is None:
            positions = [float(i) for i in range(n)]
        out = model.forward_dense(tok, positions)
        cap = max(16, 2 * n)
        dev, dt = model.device, model.dtype
        pad = lambda t: torch.cat([t, t.new_zeros((cap - n, *t.shape[1:]))])  # noqa: E731
        self._layers = []
        for s in out.layers:
            a_ref = s.a
            codes = s.codes if s.codes is not None else torch.zeros(n, cfg.n_groups, dtype=torch.long, device=dev)
            radius = s.radius if s.radius is not None else torch.zeros(n, cfg.n_groups, dtype=dt, device=dev)
            self._layers.append(LayerCache(*(pad(t) for t in (s.x, s.q, s.k, s.v, s.U, s.Z, s.M, a_ref, codes, radius))))
        self._tokens = pad(tok)
        self._pos = pad(torch.as_tensor(positions, dtype=torch.float64, device=dev).reshape(-1))
        self._resid = pad(out.residual)
        self._hidden = pad(out.hidden)
        self._set_angles()
        self._pooled_sum = out.hidden.sum(0)
        self._order_t = torch.arange(n, device=dev)  # slot of each token, in document order
        self._free = list(range(cap - 1, n - 1, -1))  # pop() hands out the lowest free slot
        self._bind_model()

    def _bind_model(self) -> None:
        """Record the model's version and gather what the fused layer step reads from it."""
        self._model_key = _model_key(self.model)
        if self._step is not None:
            self._step_weights = [self.ops.layer_weights(b) if b.quantizer is not None else None
                                  for b in self.model.blocks]

    def _set_angles(self, slots: Optional[torch.Tensor] = None) -> None:
        """Recompute the per-slot RoPE table (cos, sin) for ``slots`` (default: every slot)."""
        if self.cfg.pos_encoding != "rope":
            self._angles = None
        elif slots is None:
            self._angles = self.model.rope_angles(self._pos)
        elif slots.numel():
            for table, new in zip(self._angles, self.model.rope_angles(self._pos[slots])):
                table[slots] = new

    def _alloc(self, count: int) -> list[int]:
        if len(self._free) < count:
            old = self._tokens.shape[0]
            extra = max(old, count - len(self._free) + 16)
            for c in self._layers:
                c.grow(extra)
            for name in ("_tokens", "_pos", "_resid", "_hidden"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]))
            if self._angles is not None:
                self._angles = tuple(torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) for t in self._angles)
            self._free = list(range(old + extra - 1, old - 1, -1)) + self._free
        return [self._free.pop() for _ in range(count)]

    # ---------------------------------------------------------------- edits
    def replace(self, start: int, end: int, new_token_ids: TokenIds) -> EditStats:
        """Replace tokens [start, end) by new_token_ids (insert: start == end; delete: empty ids)."""
        return self.apply_edits([(start, end, new_token_ids)])

    def insert(self, index: int, new_token_ids: TokenIds) -> EditStats:
        return self.replace(index, index, new_token_ids)

    def delete(self, start: int, end: int) -> EditStats:
        return self.replace(start, end, [])

    def apply_edits(self, edits: Sequence[Edit]) -> EditStats:
        """Apply several token edits in one update. Ranges refer to the document before the
        update, must be sorted and must not overlap. On any error the document is unchanged."""
        t0 = time.perf_counter()
        norm = self._normalize_edits(edits)
        if self.model.training:
            raise ValueError("the model was put in training mode: call model.eval() before editing")
        if _model_key(self.model) != self._model_key:
            return self._full_recompute(norm, t0, "the model's parameters changed since this document was built")
        order = self._order_t
        tokens, pos = self._tokens[order], self._pos[order]
        try:
            with torch.no_grad():
                return self._update(norm, t0)
        except BaseException:
            # Inputs were validated above, so this is an internal failure or an interrupt:
            # rebuild the pre-edit state densely rather than leave a half-updated one.
            self._build(tokens, pos.tolist())
            raise

    def _full_recompute(self, norm, t0: float, reason: str) -> EditStats:
        warnings.warn(f"VQT: full recompute ({reason})", stacklevel=3)
        tokens = self.token_ids
        for s, e, ids in reversed(norm):
            tokens[s:e] = ids.tolist()
        tok = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        self._build(tok, None)
        pos = self._pos[: len(tokens)]
        dm = dense_macs(self.cfg, pos)
        L = self.cfg.n_layers
        return EditStats(dm, len(tokens), [len(tokens)] * L, [0] * L, [0] * L, [0] * L, 0, 0, 0, 0,
                         time.perf_counter() - t0, full_recompute=True, reason=reason, baselines=(dm, dm))

    def _update(self, norm: list[tuple[int, int, torch.Tensor]], t0: float) -> EditStats:
        cfg, model = self.cfg, self.model
        dev = model.device
        macs = MacCounter(cfg)

        # 1. New order: kept slots and new tokens; old positions for kept ones.
        old_order = self._order_t
        new_slots = self._alloc(sum(ids.numel() for _, _, ids in norm))
        new_t = torch.tensor(new_slots, dtype=torch.long, device=dev)
        pieces, deleted_pieces, cur, used = [], [], 0, 0
        for s, e, ids in norm:
            pieces += [old_order[cur:s], new_t[used:used + ids.numel()]]
            deleted_pieces.append(old_order[s:e])
            cur, used = e, used + ids.numel()
        pieces.append(old_order[cur:])
        order_t = torch.cat(pieces)
        del_t = torch.cat(deleted_pieces) if deleted_pieces else old_order[:0]
        first_changed = norm[0][0] if norm else len(old_order)
        is_new = torch.zeros(self._tokens.shape[0], dtype=torch.bool, device=dev)
        is_new[new_t] = True
        new_at = is_new[order_t]

        kept_pos = self._pos[order_t]
        kept_pos[new_at] = float("nan")
        new_pos = torch.from_numpy(plan_position_array(kept_pos.cpu().numpy(), self.position_mode, self.spacing))
        new_pos = new_pos.to(dev)
        renumbered_at = (~new_at & (kept_pos != new_pos)).nonzero().squeeze(1)
        renumbered = order_t[renumbered_at]
        if renumbered_at.numel():
            first_changed = min(first_changed, int(renumbered_at[0]))
        old_pos_all = self._pos.clone()
        self._pos[order_t] = new_pos
        if new_t.numel():
            self._tokens[new_t] = torch.cat([ids for _, _, ids in norm])
        moved = torch.cat([new_t, renumbered])  # slots whose position is new
        self._set_angles(moved)
        forced = moved if self._pos_matters else new_t
        is_forced = is_new.clone()
        is_forced[forced] = True

        if new_t.numel():
            self._layers[0].x[new_t] = model.embed(self._tokens[new_t])
        pos, angles = self._pos, self._angles
        pos_order = pos[order_t]  # sorted
        dirty = forced
        per_layer = []  # (quantized, dirty rows, MLP rows, layer_attend's counts by name)
        recomputed = torch.zeros(self._tokens.shape[0], dtype=torch.int32, device=dev)

        for li, (block, c) in enumerate(zip(model.blocks, self._layers)):
            target = self._layers[li + 1].x if li + 1 < len(self._layers) else self._resid
            n_dirty = dirty.numel()
            quantized = block.quantizer is not None
            if self._step is not None and quantized:  # the whole layer in one fused call
                dirty, counts = self._step(self._step_weights[li], c, target, dirty, del_t, order_t, pos, old_pos_all,
                                           is_new, is_forced, recomputed, angles, cfg.window, self.tau)
                n_post = counts[-1]
            else:
                # 2-4. New q, k, v of dirty rows; delta updates, full rows and re-quantization (DESIGN.md section 2).
                q, k, v = block.qkv(c.x[dirty], pos[dirty], angles and (angles[0][dirty], angles[1][dirty]))
                post, attn_out, counts = self._attend(
                    c.q, c.k, c.v, c.U, c.Z, c.M, c.a_ref, c.codes, c.radius, q, k, v, dirty, del_t, order_t, pos,
                    old_pos_all, is_new, block.quantizer.codebook if quantized else None,
                    block.lookup_table() if quantized else None, cfg.window, block.scale, self.tau)
                # 5. Lookup + MLP for dirty and flipped rows; the next layer's dirty set.
                if attn_out is None:
                    attn_out = block.attn_output(c.a_ref[post])
                x_next = block.finish(c.x[post], attn_out)
                dirty = self._commit(target, post, x_next, is_new, is_forced, recomputed)
                n_post = post.numel()
            per_layer.append((quantized, n_dirty, n_post, dict(zip(STATS, counts))))

        # Final norm and pooled sum for rows whose output changed.
        self._finish(self._resid, self._hidden, self._pooled_sum, dirty, del_t, is_new, model.norm.weight,
                     model.norm.eps)

        self._order_t = order_t
        self._free.extend(reversed(del_t.tolist()))
        for quantized, n_dirty, n_post, st in per_layer:
            macs.qkv(n_dirty)
            if st["affected"]:
                macs.attention(st["delta_pairs"], "attention_delta")
            macs.attention(st["full_pairs"])
            if quantized:
                macs.quantize_skip(st["skip_checks"])
                macs.quantize_search(st["searches"])
            macs.output(n_post)
            macs.mlp(n_post)
        total = lambda name: sum(st[name] for *_, st in per_layer)  # noqa: E731
        return EditStats(
            macs=macs.total, baselines=functools.partial(dense_and_prefix_macs, cfg, pos_order, first_changed),
            n_tokens=order_t.numel(), dirty_per_layer=[n for _, n, _, _ in per_layer],
            affected_per_layer=[st["affected"] for *_, st in per_layer],
            flips_per_layer=[st["flipped"] for *_, st in per_layer],
            code_flips_per_layer=[st["code_flips"] for *_, st in per_layer], certified_skips=total("skips"),
            searches=total("searches"), refreshes=total("refreshes"), renumbered=len(renumbered),
            seconds=time.perf_counter() - t0, first_changed=first_changed, inserted=len(new_slots),
            deleted=del_t.numel(), macs_by_kind=dict(macs.by_kind), recomputed=recomputed[order_t].cpu())
