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

import numpy as np
import torch
import torch.nn.functional as F

from vqt._checks import index_tensor, token_tensor
from vqt.engine.cache import SlotCache
from vqt.engine.macs import Baselines, MacCounter, baseline_macs
from vqt.engine.options import DocumentOptions
from vqt.engine.positions import plan_edit_positions
from vqt.engine.spans import check_spans
from vqt.modeling.model import VQTModel
from vqt.ops import Backend, get_backend
from vqt.ops.tables import EditPlan, FinalNorm, LayerCounts

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
    # How many layers recomputed each token: a (n,) tensor in document order, or what builds it from the
    # edit's own rows when ``recomputed`` is first asked (an O(n) array the edit path does not pay for).
    recomputed_by_slot: Union[None, torch.Tensor, Callable[[], torch.Tensor]] = field(default=None, repr=False)
    # Per layer, the slots whose output changed there (the next layer's dirty rows; for the last layer,
    # whose final hidden state changed), and the document order they are mapped back with, lazily (see
    # changed_rows_per_layer).
    changed_slots: list = field(default_factory=list, repr=False)
    order: Optional[torch.Tensor] = field(default=None, repr=False)
    # Indices (after the edit, ascending) of the tokens whose final hidden state changed bitwise, inserted
    # ones included, or what computes them (``hidden_changed``); None when unknown (a full recompute).
    hidden_changed_of: Union[None, list[int], Callable[[], list[int]]] = field(default=None, repr=False)
    full_recompute: bool = False  # True when the state could not be reused
    reason: str = ""
    # The baselines' MACs, or what computes them: counting them is left until asked.
    baselines: Union[Baselines, Callable[[], Baselines]] = field(default=Baselines(0, 0, 0), repr=False)

    @property
    def hidden_changed(self) -> Optional[list[int]]:
        """Indices (after the edit, ascending) of the tokens whose final hidden state changed bitwise,
        inserted ones included (None after a full recompute)."""
        if callable(self.hidden_changed_of):
            self.hidden_changed_of = self.hidden_changed_of()
        return self.hidden_changed_of

    @property
    def recomputed(self) -> Optional[torch.Tensor]:
        """(n,) int32: how many layers recomputed each token, in document order (None if unknown)."""
        if callable(self.recomputed_by_slot):
            self.recomputed_by_slot = self.recomputed_by_slot()
        return self.recomputed_by_slot

    def _baselines(self) -> Baselines:
        if callable(self.baselines):
            self.baselines = self.baselines()
        return self.baselines

    @property
    def dense_macs(self) -> int:
        """MACs of a dense forward of the edited document."""
        return self._baselines().dense

    @property
    def prefix_macs(self) -> int:
        """MACs of common-prefix KV-cache reuse on the same edit (same positions)."""
        return self._baselines().prefix

    @property
    def cone_macs(self) -> int:
        """MACs of recomputing the edit's cone of influence without quantization (same positions)."""
        return self._baselines().cone

    @property
    def ratio(self) -> float:
        """Ops reduction: dense MACs / incremental MACs (inf when the edit cost nothing)."""
        return self.dense_macs / self.macs if self.macs else float("inf")

    @property
    def prefix_ratio(self) -> float:
        """Ops reduction of prefix reuse alone."""
        return self.dense_macs / self.prefix_macs if self.prefix_macs else float("inf")

    def changed_rows_per_layer(self) -> list[list[int]]:
        """For each layer, the document indices (after the edit) of the tokens whose output that layer
        recomputed and changed: what the edit reached, layer by layer."""
        if self.order is None:
            return []
        index = torch.full((int(self.order.max()) + 1 if self.order.numel() else 0,), -1, dtype=torch.long)
        index[self.order.cpu()] = torch.arange(self.order.numel())
        return [sorted(index[s.cpu()].tolist()) for s in self.changed_slots]

    @property
    def cone_ratio(self) -> float:
        """What VQ saves over the cone of influence: cone MACs / incremental MACs."""
        return self.cone_macs / self.macs if self.macs else float("inf")

    def summary(self) -> str:
        return (f"n={self.n_tokens} macs={self.macs:.3g} ratio={self.ratio:.1f}x (prefix {self.prefix_ratio:.1f}x, "
                f"over the cone {self.cone_ratio:.1f}x) "
                f"dirty={self.dirty_per_layer} flips={self.flips_per_layer} skips={self.certified_skips} "
                f"refresh={self.refreshes} {self.seconds * 1e3:.1f}ms" + (" FULL RECOMPUTE" if self.full_recompute else ""))


# Walking a model's modules for its tensors costs more than a small edit, so the list is cached and
# walked again only after some module, parameter or buffer was (re)assigned anywhere. The hooks that
# count such assignments are installed when the first model key is asked for, not at import.
_registrations = 0
_hooks_installed = False
_watched: "weakref.WeakKeyDictionary[VQTModel, tuple[int, list[torch.Tensor], tuple[int, ...]]]" = \
    weakref.WeakKeyDictionary()


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


def model_key(model: VQTModel) -> tuple:
    """Changes whenever any parameter or buffer of ``model`` is replaced or modified in place, or its matmul
    dtype changes."""
    global _hooks_installed
    if not _hooks_installed:
        for register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                         torch.nn.modules.module.register_module_buffer_registration_hook,
                         torch.nn.modules.module.register_module_module_registration_hook):
            register(_count_registration)
        _hooks_installed = True
    hit = _watched.get(model)
    if hit is None or hit[0] != _registrations:
        tensors = list(model.parameters()) + list(model.buffers())
        hit = (_registrations, tensors, tuple(id(t) for t in tensors))
        _watched[model] = hit
    # Version counters only grow, so their sum changes with any in-place modification.
    return hit[2], sum(t._version for t in hit[1]), model.matmul_dtype


Edit = tuple[int, int, TokenIds]


@dataclass
class _Planned:
    """The bookkeeping of one update before its layers run."""

    plan: EditPlan
    dirty: torch.Tensor  # layer 0's dirty slots (new and moved)
    new_slots: torch.Tensor
    renumbered: torch.Tensor  # kept slots whose position changed
    moved: torch.Tensor  # slots whose position is new (new ones, then renumbered ones)
    first_changed: int  # index of the first changed token (where prefix reuse starts)


class Document:
    """A document's incremental state under a frozen VQT model.

    ``replace``/``apply_edits`` update it after token edits so that it always equals a dense
    forward of the same model on the current tokens and positions (codes identical in
    float64; see DESIGN.md section 8 for the float32 contract). Settings come as one
    ``DocumentOptions`` (``options``), or as its fields by keyword (``backend="cpu"``,
    ``position_mode="canonical"``, ``positions=PositionPolicy(...)``, ``tau=...``).
    """

    def __init__(self, model: VQTModel, token_ids: TokenIds = (), options: Optional[DocumentOptions] = None,
                 positions: Optional[Sequence[float]] = None, **settings) -> None:
        if not isinstance(model, VQTModel):
            raise TypeError(f"model must be a VQTModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() first (cached codes need frozen codebooks)")
        self.model, self.cfg = model, model.config
        self.configure(DocumentOptions.make(options, **settings))
        # Positions only matter for RoPE and windows; with neither, renumbering changes nothing.
        self._pos_matters = self.cfg.pos_encoding == "rope" or self.cfg.window is not None
        tok = self._check_tokens(token_ids, "token_ids")
        self._check_length(len(tok))
        self._build(tok, positions)

    def configure(self, options: DocumentOptions) -> None:
        """Adopt engine settings (resolving the backend); the cached state is kept as it is."""
        self.options = options
        # The policy with the model's own minimum spacing (how squeezed it saw positions in training).
        self.position_policy = options.positions.for_model(self.cfg.min_spacing)
        self.backend: Backend = get_backend(options.backend, self.model.device)
        # Cancellation guard: refresh a row whose denominator keeps less than tau of its mass.
        self.tau = options.tau if options.tau is not None else (1e-4 if self.model.dtype == torch.float64 else 1e-2)
        # Rounding-error budget of delta-updated rows (DESIGN.md section 8).
        self.drift_budget = (options.drift_budget if options.drift_budget is not None
                             else 2.0 ** -40 if self.model.dtype == torch.float64 else 2.0 ** -16)
        if hasattr(self, "cache"):
            self.bind_model()

    # ----------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.cache)

    @property
    def position_mode(self) -> str:
        return self.position_policy.mode

    @property
    def token_ids(self) -> list[int]:
        return self.cache.tokens[self.cache.order].tolist()

    @property
    def positions(self) -> torch.Tensor:
        """(n,) float64 positions in document order."""
        return self.cache.doc_pos.to(self.model.device, copy=True)

    @property
    def codes(self) -> torch.Tensor:
        """(L, n, G) current codes in document order."""
        o = self.cache.order
        return torch.stack([t.codes[o] for t in self.cache.layers])

    @property
    def hidden(self) -> torch.Tensor:
        """(n, d) final hidden states (after the final norm) in document order."""
        return self.cache.hidden[self.cache.order].clone()

    @property
    def pooled(self) -> torch.Tensor:
        """(d,) mean of the final hidden states, maintained incrementally."""
        return self.cache.pooled_sum / max(len(self), 1)

    def classify(self) -> torch.Tensor:
        """Class logits from the pooled features (needs a model with a classification head)."""
        with torch.no_grad():
            return self.model.classify(self.pooled)

    def logits(self, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """LM logits computed now, only for the requested token indices (default: all)."""
        o = self.cache.order
        idx = o if indices is None else o[index_tensor(indices, len(self), self.model.device)]
        with torch.no_grad():
            return self.model.logits(self.cache.hidden[idx])

    def state_bytes(self) -> int:
        """Bytes of every tensor the document's state holds: the slot tables with their free slots,
        the order and the document-order positions (RoPE angles are formed per update, for the rows
        a layer recomputes, and not kept)."""
        return self.cache.allocated_bytes()

    def state_bytes_per_token(self) -> float:
        """Allocated state bytes per live token (``state_bytes`` / length)."""
        return self.state_bytes() / max(len(self), 1)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes per token of a plain KV cache of the same model (keys and values of every layer)."""
        c = self.cfg
        return c.n_layers * 2 * c.n_kv_heads * c.head_dim * self.cache.layers[0].k.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every cached tensor in document order (copies; for comparisons and tests)."""
        return self.cache.live_state()

    # ---------------------------------------------------------------- checks
    def _check_tokens(self, token_ids: TokenIds, what: str) -> torch.Tensor:
        tok = token_tensor(token_ids, what, self.model.device, self.cfg.vocab_size)
        if isinstance(token_ids, torch.Tensor):  # (a sequence's range was checked in Python, without reductions)
            self.model.check_inputs(tok)
        return tok

    def _check_length(self, n: int) -> None:
        self.options.check_length(n, self.cfg)

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
        n = tok.numel()
        if positions is None:
            positions = [float(i) for i in range(n)]
        # The tables get room for as many rows again (address space: the cache grows into it, copying nothing).
        out = self.model.forward_dense(tok, positions, spare_rows=n)
        pos = torch.as_tensor(positions, dtype=torch.float64, device=self.model.device).reshape(-1)
        self.cache = SlotCache.from_dense(out.layers, tok, pos, out.hidden, roomy=True)
        self.bind_model()

    def bind_model(self) -> None:
        """Record the model's version and gather what the layer steps read from it. Called after the
        cache is (re)built or loaded."""
        self._model_key = model_key(self.model)
        self._weights = [self.backend.prepare(b.layer_weights()) for b in self.model.blocks]
        self._macs = MacCounter(self.cfg)  # (each update counts into a fresh copy of it)
        self._rope = self.model.rope_frequencies()
        self._final_norm = (self.model.norm.weight.detach(), self.model.norm.eps)

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
        if model_key(self.model) != self._model_key:
            return self._full_recompute(norm, t0, "the model's parameters or matmul dtype changed since this document was built")
        # What a rollback needs, kept by reference (no copies): an update replaces ``order`` and ``doc_pos``
        # rather than modifying them, and writes new tokens only into slots that were free.
        order, doc_pos = self.cache.order, self.cache.doc_pos
        try:
            with torch.no_grad():
                return self._update(norm, t0)
        except BaseException:
            # Inputs were validated above, so this is an internal failure or an interrupt: rebuild the
            # pre-edit state densely (one dense pass) rather than leave a half-updated one.
            self._build(self.cache.tokens[order], doc_pos.tolist())
            raise

    def _full_recompute(self, norm, t0: float, reason: str) -> EditStats:
        warnings.warn(f"VQT: full recompute ({reason})", stacklevel=3)
        tokens = self.token_ids
        for s, e, ids in reversed(norm):
            tokens[s:e] = ids.tolist()
        self._build(torch.tensor(tokens, dtype=torch.long, device=self.model.device), None)
        n, L = len(tokens), self.cfg.n_layers
        dm = baseline_macs(self.cfg, self.cache.positions[:n], 0).dense
        return EditStats(macs=dm, n_tokens=n, dirty_per_layer=[n] * L, affected_per_layer=[0] * L,
                         flips_per_layer=[0] * L, code_flips_per_layer=[0] * L, certified_skips=0, searches=0,
                         refreshes=0, renumbered=0, seconds=time.perf_counter() - t0, full_recompute=True,
                         reason=reason, baselines=Baselines(dm, dm, dm))

    def _plan(self, norm: list[tuple[int, int, torch.Tensor]]) -> _Planned:
        """New order, slots for the new tokens, new positions (DESIGN.md section 3): the plan every
        layer step shares. Writes the new tokens and positions into the cache. Its work is
        O(edit) apart from splicing ``order`` and ``doc_pos`` (two memcpys of the document length)."""
        cache, dev = self.cache, self.model.device
        old_order, old_doc_pos = cache.order, cache.doc_pos.numpy()  # (doc_pos lives on the CPU: numpy is cheaper)
        new_t = torch.tensor(cache.alloc(sum(ids.numel() for _, _, ids in norm)), dtype=torch.long, device=dev)
        orders, doc_pos, deleted_pieces, runs, joins = [], [], [], [], []
        cur = used = at = 0  # (at: index in the new document)
        for s, e, ids in norm:
            k = ids.numel()
            orders += [old_order[cur:s], new_t[used:used + k]]
            doc_pos += [old_doc_pos[cur:s], np.full(k, np.nan)]
            deleted_pieces.append(old_order[s:e])
            at += s - cur
            if k and runs and runs[-1][1] == at - 1:
                runs[-1] = (runs[-1][0], at + k - 1)  # (adjacent edits: one run of new tokens)
            elif k:
                runs.append((at, at + k - 1))
            elif e > s:
                joins.append(at)
            cur, used, at = e, used + k, at + k
        orders.append(old_order[cur:])
        doc_pos.append(old_doc_pos[cur:])
        order, doc_pos_np = torch.cat(orders), np.concatenate(doc_pos)
        deleted = torch.cat(deleted_pieces) if deleted_pieces else old_order[:0]
        windows = plan_edit_positions(doc_pos_np, runs, joins, self.position_policy)
        doc_pos = torch.from_numpy(doc_pos_np)

        is_new = cache.is_new
        is_new[new_t] = True
        touched_np = (np.unique(np.concatenate([np.arange(a, b + 1) for a, b in windows])) if windows
                      else np.zeros(0, dtype=np.int64))
        touched = torch.from_numpy(touched_np)
        slots = order[touched.to(dev)]
        new_values = torch.from_numpy(doc_pos_np[touched_np]).to(dev)
        moved_kept = ~is_new[slots] & (cache.positions[slots] != new_values)
        renumbered = slots[moved_kept]
        first_changed = norm[0][0] if norm else len(old_order)
        if renumbered.numel():
            first_changed = min(first_changed, int(touched[moved_kept.cpu()].min()))
        cache.positions[slots] = new_values
        if new_t.numel():
            new_ids = torch.cat([ids for _, _, ids in norm])
            cache.tokens[new_t] = new_ids
            cache.layers[0].x[new_t] = F.embedding(new_ids, self.model.embed.weight)
        moved = torch.cat([new_t, renumbered])  # slots whose position is new
        forced = moved if self._pos_matters else new_t
        cache.is_forced[forced] = True
        plan = EditPlan(deleted=deleted, order=order, pos=cache.positions, old_pos=cache.prev_positions, is_new=is_new,
                        is_forced=cache.is_forced, rope=self._rope, window=self.cfg.window, tau=self.tau, drift_budget=self.drift_budget,
                        pos_order=doc_pos)
        return _Planned(plan, forced, new_t, renumbered, moved, first_changed)

    def _update(self, norm: list[tuple[int, int, torch.Tensor]], t0: float) -> EditStats:
        planned = self._plan(norm)
        plan, cache = planned.plan, self.cache
        try:
            dirty, counts, changed = planned.dirty, [], []
            outputs = FinalNorm(cache.hidden, cache.pooled_sum, *self._final_norm)
            for li, (w, t) in enumerate(zip(self._weights, cache.layers)):  # DESIGN.md section 2, steps 2-5
                target = cache.layers[li + 1].x if li + 1 < len(cache.layers) else outputs
                dirty, c = self.backend.layer_step(w, t, target, dirty, plan)
                counts.append(c)
                changed.append(dirty)
            final = dirty  # after the last layer: the slots whose final hidden state changed
            stats = self._stats(planned, counts, changed, final, t0)
            cache.order, cache.doc_pos = plan.order, plan.pos_order
        finally:  # the per-update state goes back to its resting values (O(edit)), whatever happened
            cache.prev_positions[planned.moved] = cache.positions[planned.moved]
            cache.is_new[planned.new_slots] = False
            cache.is_forced[planned.moved] = False
        cache.release(plan.deleted)
        if cache.wants_compaction():
            cache.compact()
        return stats

    def _stats(self, planned: _Planned, counts: list[LayerCounts], changed_slots: list[torch.Tensor],
               final: torch.Tensor, t0: float) -> EditStats:
        plan, cfg = planned.plan, self.cfg
        macs = self._macs.fresh()
        for w, c in zip(self._weights, counts):
            macs.layer(c, w.quantized)
        # For the cone: positions of the rows whose layer-0 input changed, and those keys left from.
        changed = plan.pos[planned.dirty]
        removed = plan.old_pos[torch.cat([plan.deleted, planned.renumbered])]
        total = lambda name: sum(getattr(c, name) for c in counts)  # noqa: E731
        # The tokens whose final hidden state changed: their positions now, found in the document-order
        # positions by binary search when asked for (O(edit log n)).
        final_pos, pos_order = plan.pos[final].cpu(), plan.pos_order
        hidden_changed = lambda: torch.searchsorted(pos_order, final_pos).sort().values.tolist()  # noqa: E731
        # How many layers recomputed each token: counted over the layers' own rows (O(edit)), placed in
        # document order by the same binary search when asked.
        slots, layers = (torch.cat(plan.posts) if plan.posts else plan.deleted[:0]).unique(return_counts=True)
        slot_pos = plan.pos[slots].cpu()

        def recomputed() -> torch.Tensor:
            out = torch.zeros(len(pos_order), dtype=torch.int32)
            out[torch.searchsorted(pos_order, slot_pos)] = layers.cpu().to(torch.int32)
            return out

        return EditStats(
            macs=macs.total, baselines=functools.partial(baseline_macs, cfg, plan.pos_order, planned.first_changed,
                                                         changed, removed),
            n_tokens=plan.order.numel(), dirty_per_layer=[c.dirty for c in counts],
            affected_per_layer=[c.affected for c in counts], flips_per_layer=[c.flipped for c in counts],
            code_flips_per_layer=[c.code_flips for c in counts], certified_skips=total("skips"),
            searches=total("searches"), refreshes=total("refreshes"), renumbered=planned.renumbered.numel(),
            seconds=time.perf_counter() - t0, first_changed=planned.first_changed, inserted=planned.new_slots.numel(),
            deleted=plan.deleted.numel(), macs_by_kind=dict(macs.by_kind),
            recomputed_by_slot=recomputed, changed_slots=changed_slots, order=plan.order,
            hidden_changed_of=hidden_changed)
