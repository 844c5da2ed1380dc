"""A document's slot table: every per-token row of every layer, by slot (DESIGN.md section 2).

Every token owns one slot (one row in every table) for as long as it lives; ``order`` says which
slot comes where in the document and deleted slots go to a free list, so an insertion or a
deletion moves no large arrays. The cache owns its tensors, hands out slots (``alloc``), takes them
back (``release``), compacts itself when an eighth of its slots are free (``compact``), and reads and
writes itself as a flat dict of tensors (``state_dict``/``load_state_dict``).

Growing copies nothing: every per-slot tensor the cache owns sits at the start of a storage with room
for as many rows again (allocated, never touched until used: address space, not memory), and a growth
by ``GROW_ROWS`` slots (or what an edit needs) only extends the tensors over their room and zeroes the
new rows, O(edit). Only when the room is spent are the tables moved, into storage with room for as
many rows again (so such moves are geometric: amortized O(1) per slot). No single edit pays for the
document's length, and the allocated state stays within GROW_ROWS slots of the live tokens' after
growth, and within 1/7 above them before a compaction.

Besides the per-slot rows it keeps ``doc_pos``, the positions in document order (a CPU float64
tensor, replaced, never modified, by each update), so that the edit path finds what an edit
reaches by binary search instead of scanning the document; ``prev_positions``, the positions
before the update in progress (equal to ``positions`` between updates); and the per-slot flags
``is_new``/``is_forced`` of the update in progress (all False between updates).
"""

from __future__ import annotations

import dataclasses
import torch

from vqt._memory import release_free_memory
from vqt.ops.composite import output_groups
from vqt.ops.tables import LayerTables

_DOC_TENSORS = ("tokens", "positions", "hidden")  # per-slot rows outside the layers
RELEASE_BYTES = 64 << 20  # replaced tables at least this large are handed back to the kernel (SlotCache._release)
GROW_ROWS = 64  # the fewest slots a growth adds (it zeroes their rows: O(edit), never O(n))


def _radius_after_move(a: torch.Tensor, a_ref: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """A certified radius around ``a`` from one around ``a_ref``: radius - |a - a_ref|, rounded down (the
    triangle inequality; what states saved with reference points convert to)."""
    moved = (a.double() - a_ref.double()).pow(2).sum(-1).sqrt() * (1 + 2.0 ** -40)
    rem = (radius.double() - moved).to(radius.dtype)
    return torch.nextafter(rem, torch.full_like(rem, float("-inf")))


class SlotCache:
    """Per-slot rows of one document: ``layers`` (one ``LayerTables`` each), token ids, positions and
    the final hidden states (the last block's output after the final norm; the output itself is not
    kept), plus ``pooled_sum`` (the sum of the live hidden rows), ``order`` (slots in document order)
    and the free list."""

    def __init__(self, layers: list[LayerTables], tokens: torch.Tensor, positions: torch.Tensor,
                 hidden: torch.Tensor, pooled_sum: torch.Tensor, order: torch.Tensor, free: list[int],
                 roomy: bool = False) -> None:
        """``roomy``: the layers' tables and ``hidden`` each own their storage, with room after their rows
        (``VQTModel.forward_dense(spare_rows=...)``), and the cache may grow into it; otherwise the first
        growth moves them."""
        layers = [t.map(torch.Tensor.contiguous) for t in layers]  # (the kernels index rows of dense tables)
        self._roomy: set[int] = set()  # storages this cache owns, with room after the rows of its tensor
        self.layers, self.hidden, self.pooled_sum = layers, hidden.contiguous(), pooled_sum
        if roomy:
            for t in (self.hidden, *(v for layer in layers for _, v in layer.items())):
                self._own(t)
        self.tokens, self.positions = self._moved(tokens, 0), self._moved(positions, 0)
        self.order, self.free = order, free  # free: pop() hands out the lowest free slot
        for t in self.layers:
            if t.drift is None:  # (a dense pass's rows are computed in full)
                t.drift = self._moved(t.Z[:0], self.capacity)
        self._derive()

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        self._roomy.add(t.untyped_storage().data_ptr())
        return t

    def _moved(self, t: torch.Tensor, extra: int) -> torch.Tensor:
        """A copy of t with ``extra`` zero rows after its own, in storage with room for as many rows again."""
        rows = t.shape[0] + extra
        out = t.new_empty((2 * rows, *t.shape[1:]))[:rows]
        out[:t.shape[0]] = t
        out[t.shape[0]:] = 0
        return self._own(out)

    def _grown(self, t: torch.Tensor, extra: int) -> torch.Tensor:
        """t with ``extra`` zero rows after its own: over its storage's room when the cache owns it and it has
        room (O(extra)), else moved (O(n))."""
        storage, rows = t.untyped_storage(), t.shape[0] + extra
        if (storage.data_ptr() in self._roomy and t.storage_offset() == 0 and t.is_contiguous()
                and storage.nbytes() >= rows * t.shape[1:].numel() * t.element_size()):
            out = t.new_empty(0).set_(storage, 0, (rows, *t.shape[1:]))
            out[t.shape[0]:] = 0
            return out
        self._roomy.discard(storage.data_ptr())
        return self._moved(t, extra)

    def _derive(self) -> None:
        """The derived per-slot state: document-order positions, previous positions, update flags."""
        self.doc_pos = self.positions[self.order].cpu()
        self.prev_positions = self._moved(self.positions, 0)
        self.is_new = self._moved(torch.zeros(0, dtype=torch.bool, device=self.tokens.device), self.capacity)
        self.is_forced = self._moved(self.is_new, 0)

    @classmethod
    def from_dense(cls, layers: list[LayerTables], tokens: torch.Tensor, positions: torch.Tensor,
                   hidden: torch.Tensor, roomy: bool = False) -> "SlotCache":
        """The cache of a dense pass over n tokens (slot i = token i), the tables exactly n rows long
        (``roomy``: allocated with room after them, see ``__init__``)."""
        n = tokens.numel()
        return cls(layers, tokens, positions, hidden, hidden.sum(0), torch.arange(n, device=tokens.device), [],
                   roomy=roomy)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]

    def __len__(self) -> int:
        return self.order.numel()

    def _per_slot(self) -> list[str]:
        return [*_DOC_TENSORS, "prev_positions", "is_new", "is_forced"]

    def alloc(self, count: int) -> list[int]:
        """``count`` free slots (lowest first), growing every table by ``GROW_ROWS`` slots (at least what is
        needed) when there are not enough: into the tables' room, without copying them."""
        if len(self.free) < count:
            old = self.capacity
            extra = max(count - len(self.free), GROW_ROWS)
            moved = False
            for t in self.layers:
                for name, v in t.items():
                    grown = self._grown(v, extra)
                    moved |= grown.data_ptr() != v.data_ptr()
                    setattr(t, name, grown)
            for name in self._per_slot():
                setattr(self, name, self._grown(getattr(self, name), extra))
            self.free = list(range(old + extra - 1, old - 1, -1)) + self.free
            if moved:
                self._release(old)
        return [self.free.pop() for _ in range(count)]

    def _release(self, slots: int) -> None:
        """After tables of ``slots`` rows were replaced: hand their pages back to the kernel when they were
        large (the allocator would keep them, fragmented, for reuse, and a long-lived document's RSS would
        drift). Small ones are left to the allocator: trimming makes the next allocations fault their
        pages in again, which costs more than it saves."""
        if slots * self.bytes_per_slot() >= RELEASE_BYTES:
            release_free_memory()

    def release(self, slots: torch.Tensor) -> None:
        """Return deleted slots to the free list."""
        self.free.extend(reversed(slots.tolist()))

    def wants_compaction(self) -> bool:
        """More than an eighth of the slots (and over 64) are free: ``compact`` pays for itself (it leaves no
        free slot, so an eighth of the document must go again before the next)."""
        return len(self.free) > max(64, self.capacity // 8)

    def compact(self) -> torch.Tensor:
        """Move the live rows to slots 0..n-1 in document order and shrink every table to n rows (with room
        for as many again); returns the old slot of each new one. O(n), and only when an eighth of the
        slots are free, so amortized O(1) per deleted token."""
        n, rows, old_cap = len(self), self.order, self.capacity
        self._roomy = set()
        for t in self.layers:
            for name, v in t.items():
                setattr(t, name, self._moved(v[rows], 0))
        for name in _DOC_TENSORS:
            setattr(self, name, self._moved(getattr(self, name)[rows], 0))
        self.order = torch.arange(n, device=rows.device)
        self.free = []
        self._derive()
        self._release(old_cap)
        return rows

    def bytes_per_slot(self) -> int:
        """Bytes of one slot's rows over every table."""
        rows = [getattr(self, n) for n in self._per_slot()]
        return sum(t.bytes_per_row() for t in self.layers) + sum(t.shape[1:].numel() * t.element_size() for t in rows)

    def allocated_bytes(self) -> int:
        """Bytes of every tensor the cache holds (free slots included)."""
        return self.capacity * self.bytes_per_slot() + sum(
            t.numel() * t.element_size() for t in (self.order, self.doc_pos, self.pooled_sum))

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor (all capacity rows, free ones included), the order and the free list, by name."""
        out = {name: getattr(self, name) for name in _DOC_TENSORS}  # (the derived state is not saved)
        out["pooled_sum"] = self.pooled_sum
        for li, t in enumerate(self.layers):
            out.update({f"layer{li}.{name}": v for name, v in t.items()})
        out["order"] = self.order.cpu()
        out["free"] = torch.tensor(self.free, dtype=torch.long)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this cache's contents by ``state`` (copied), after checking that it has the same
        tensors with the same dtypes and row shapes, and that order and free list partition its slots.
        Raises ValueError naming what does not fit, and then changes nothing."""
        cur = self.state_dict()
        state = dict(state)
        state.pop("residual", None)  # saved when the last block's output was kept: only its norm is
        for li, t in enumerate(self.layers):
            key = f"layer{li}."
            if key + "drift" not in state and key + "Z" in state:  # saved before the drift bound: rows as computed
                state[key + "drift"] = torch.zeros_like(state[key + "Z"])
            a_ref = state.pop(key + "a_ref", None)  # saved with reference points: radii around them, made current
            if a_ref is not None and {key + "U", key + "Z", key + "radius"} <= set(state) and a_ref.dim() == 3:
                a = output_groups(state[key + "U"], state[key + "Z"], a_ref.shape[1])
                state[key + "radius"] = _radius_after_move(a, a_ref, state[key + "radius"])
        if set(state) != set(cur):
            missing, unexpected = sorted(set(cur) - set(state)), sorted(set(state) - set(cur))
            raise ValueError(f"the state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        cap = state["tokens"].shape[0]
        for k, now in cur.items():
            v = state[k]
            want = now.shape if k in ("pooled_sum", "order", "free") else (cap, *now.shape[1:])
            if v.dtype != now.dtype or (k not in ("order", "free") and tuple(v.shape) != tuple(want)):
                raise ValueError(f"state tensor {k} is {v.dtype}{tuple(v.shape)}, this model needs {now.dtype}{tuple(want)}")
        order, free = state["order"].tolist(), state["free"].tolist()
        if sorted(order + free) != list(range(cap)):
            raise ValueError(f"the state's order and free lists do not partition its {cap} slots")
        dev = self.tokens.device
        t = {k: v.to(dev, copy=True) for k, v in state.items() if k not in ("order", "free")}
        for name in _DOC_TENSORS:
            setattr(self, name, t[name])
        self.pooled_sum = t["pooled_sum"]
        self.layers = [LayerTables(**{f.name: t.get(f"layer{li}.{f.name}") for f in dataclasses.fields(LayerTables)})
                       for li in range(len(self.layers))]
        self.order, self.free = torch.tensor(order, dtype=torch.long, device=dev), free
        self._roomy = set()  # (loaded tables are exactly their size: the first growth moves them)
        self._derive()

    def live_state(self) -> dict[str, torch.Tensor]:
        """Every per-token tensor in document order (copies), plus the pooled sum: what must equal a
        dense forward, whatever the slot layout."""
        o = self.order
        out = {"tokens": self.tokens[o], "positions": self.positions[o], "hidden": self.hidden[o],
               "pooled_sum": self.pooled_sum.clone()}
        for li, t in enumerate(self.layers):
            out.update({f"layer{li}.{name}": v[o] for name, v in t.items()})
        return out

