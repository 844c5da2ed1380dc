"""Replaying revision histories edit by edit through the incremental engine, with baselines.

Window policy: a document longer than the model's context is replayed on its first
``window_tokens`` tokens. An atomic edit counts when it starts inside the window (the part
of an edit that runs past the window's end is clipped); edits after the window are skipped.
When the window's token count drifts outside [0.75, 1.25] x ``window_tokens`` (or past the
model's ``max_len``), the document is re-windowed from the current revision with a dense
pass that is not counted as an edit.

``replay`` is a pure function of its arguments (model, revisions, options): replays of
different pages share nothing, so a corpus can be split across processes or machines.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from vqt.engine.options import DocumentOptions
from vqt.histories.edits import revision_edits
from vqt.modeling.model import VQTModel
from vqt.text.document import TextDocument
from vqt.text.tokenizer import Tokenizer


@dataclass
class EditRecord:
    """One atomic edit as replayed: what VQT spent and what the baselines cost on the same edit."""

    doc_id: str
    rev_id: int
    edit_index: int  # index of the atomic edit within its revision pair
    chars_removed: int
    chars_inserted: int
    n_tokens: int
    inserted_tokens: int
    deleted_tokens: int
    first_changed: int
    macs: int
    dense_macs: int
    prefix_macs: int
    cone_macs: int  # the cone of influence recomputed without quantization (vqt.engine.macs)
    ratio: float
    prefix_ratio: float
    cone_ratio: float  # what VQ saves over the cone: cone_macs / macs
    dirty_per_layer: list[int]
    flips_per_layer: list[int]
    code_flips_per_layer: list[int]
    affected_per_layer: list[int]
    certified_skips: int
    refreshes: int
    renumbered: int
    seconds: float  # the engine's update (Document.apply_edits; re-tokenization and the diff excluded, as for the baselines)
    dense_seconds: Optional[float] = None  # dense forward of the edited window, same process
    prefix_seconds: Optional[float] = None  # common-prefix KV reuse on the same edit
    exact: Optional[bool] = None  # with verify: codes equal and hidden allclose to the dense forward
    n_groups: int = 1  # codes per position per layer
    macs_by_kind: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)

    @property
    def dirty_fraction(self) -> float:
        return sum(self.dirty_per_layer) / max(1, len(self.dirty_per_layer) * self.n_tokens)

    @property
    def layer1_flip_rate(self) -> float:
        """Per-code flip rate at the first layer among unedited positions after the edit."""
        after = self.n_tokens - self.first_changed - self.inserted_tokens
        return self.code_flips_per_layer[0] / max(1, after * self.n_groups)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dirty_fraction"] = self.dirty_fraction
        return d


# EditRecord fields copied as they are from the engine's EditStats.
_FROM_STATS = ("n_tokens", "first_changed", "macs", "dense_macs", "prefix_macs", "cone_macs", "ratio", "prefix_ratio",
               "cone_ratio",
               "dirty_per_layer", "flips_per_layer", "code_flips_per_layer", "affected_per_layer",
               "certified_skips", "refreshes", "renumbered", "seconds", "macs_by_kind")


def _window_end(tokenizer: Tokenizer, text: str, window_tokens: int) -> int:
    """Code-point offset where the first ``window_tokens`` tokens of ``text`` end."""
    _, offsets = tokenizer.encode_with_offsets(text)
    return len(text) if len(offsets) <= window_tokens else offsets[window_tokens - 1][1]


def replay(model: VQTModel, revisions: Iterable[Mapping[str, Any]], tokenizer: Tokenizer,
           window_tokens: int = 1024, max_edits: Optional[int] = None, baselines: bool = True,
           verify: bool = False, max_edit_chars: Optional[int] = 2000, skip_reverts: bool = False,
           observe: Optional[Callable[[TextDocument, EditRecord], None]] = None,
           options: Optional[DocumentOptions] = None) -> Iterator[EditRecord]:
    """Yield one ``EditRecord`` per atomic edit that touches the window.

    baselines: also time a dense forward and prefix reuse on every edited window (same
    process, same model). verify: check every step against the dense forward. observe: called
    with the document and the record after every edit, before the record is yielded (to
    measure anything else about the edited state). options: the documents' engine settings.
    """
    if model.training:
        raise ValueError("call model.eval() before replaying")
    for name, value in (("window_tokens", window_tokens), ("max_edits", max_edits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    window_tokens = min(window_tokens, model.config.max_len)
    texts: dict[int, str] = {}

    def remember(revs):
        for rev in revs:
            texts[rev["rev_id"]] = rev["text"]
            if len(texts) > 3:
                texts.pop(next(iter(texts)))
            yield rev

    doc: Optional[TextDocument] = None
    doc_key: Optional[tuple[str, int]] = None  # (doc_id, rev_id) whose window the document holds
    wend = 0
    dense = None
    count = 0
    for pair in revision_edits(remember(revisions), max_edit_chars=max_edit_chars):
        if max_edits is not None and count >= max_edits:
            return
        if pair.flags.oversize or pair.flags.blanking or (skip_reverts and pair.flags.revert):
            doc = None  # start afresh from the next revision
            continue
        if doc is None or doc_key != (pair.doc_id, pair.parent_rev_id) or not (
                0.75 * window_tokens <= len(doc.doc) <= min(1.25 * window_tokens, model.config.max_len)):
            parent = texts[pair.parent_rev_id]
            wend = _window_end(tokenizer, parent, window_tokens)
            doc = TextDocument(model, tokenizer, parent[:wend], options)
            dense = model.forward_dense(doc.doc.token_ids, doc.doc.positions) if baselines or verify else None
        full_len = len(texts[pair.parent_rev_id])  # length of the whole text the next edit applies to
        for i, e in enumerate(pair.edits):
            text_len = full_len
            full_len += len(e.text) - (e.end - e.start)
            if e.start > wend or e.start == wend < text_len:
                continue  # after the window (an insertion exactly at its end counts only at the text's end)
            end = min(e.end, wend)
            new_len = len(doc.text) + len(e.text) - (end - e.start)
            try:
                st = doc.edit(e.start, end, e.text)
            except ValueError as err:  # the window outgrew max_len: re-window at the next pair
                if "max_len" not in str(err):
                    raise
                doc = None
                break
            wend = new_len
            rec = EditRecord(doc_id=pair.doc_id, rev_id=pair.rev_id, edit_index=i, chars_removed=end - e.start,
                             chars_inserted=len(e.text), inserted_tokens=st.inserted, deleted_tokens=st.deleted,
                             n_groups=model.config.n_groups, flags={"revert": pair.flags.revert},
                             **{name: getattr(st, name) for name in _FROM_STATS})
            if baselines or verify:
                tok, pos = doc.doc.token_ids, doc.doc.positions
                t0 = time.perf_counter()
                new_dense = model.forward_dense(tok, pos)
                rec.dense_seconds = time.perf_counter() - t0
                if baselines:
                    t0 = time.perf_counter()
                    model.forward_dense(tok, pos, cache=dense, start=st.first_changed)
                    rec.prefix_seconds = time.perf_counter() - t0
                if verify:
                    atol = 1e-9 if model.dtype == torch.float64 else 1e-4
                    rec.exact = new_dense.codes_agree(doc.doc.codes) and bool(
                        torch.allclose(new_dense.hidden, doc.doc.hidden, atol=atol))
                dense = new_dense
            count += 1
            if observe is not None:
                observe(doc, rec)
            yield rec
            if max_edits is not None and count >= max_edits:
                return
        if doc is not None:
            doc_key = (pair.doc_id, pair.rev_id)


def quantiles(values: list[float]) -> dict[str, float]:
    """median, p10, p90 and mean of a list (inf-safe for the median)."""
    if not values:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan"), "mean": float("nan")}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    finite = [v for v in s if v != float("inf")]
    return {"median": statistics.median(s), "p10": pick(0.1), "p90": pick(0.9),
            "mean": statistics.fmean(finite) if finite else float("inf")}


def summarize(records: list[EditRecord]) -> dict[str, dict[str, float]]:
    """Distribution of every per-edit metric the replay reports."""
    out = {
        "MAC ratio vs dense": quantiles([r.ratio for r in records]),
        "prefix-reuse MAC ratio": quantiles([r.prefix_ratio for r in records]),
        "cone MAC ratio vs dense": quantiles([r.dense_macs / r.cone_macs if r.cone_macs else float("inf")
                                              for r in records]),
        "VQ saving over the cone": quantiles([r.cone_ratio for r in records]),
        "dirty fraction": quantiles([r.dirty_fraction for r in records]),
        "layer-1 code flip rate": quantiles([r.layer1_flip_rate for r in records]),
        "incremental ms": quantiles([r.seconds * 1e3 for r in records]),
    }
    timed = [r for r in records if r.dense_seconds is not None]
    if timed:
        out["dense ms"] = quantiles([r.dense_seconds * 1e3 for r in timed])
        out["prefix ms"] = quantiles([r.prefix_seconds * 1e3 for r in timed if r.prefix_seconds is not None])
        out["wall speedup vs dense"] = quantiles([r.dense_seconds / r.seconds for r in timed])
        out["wall speedup vs prefix"] = quantiles([r.prefix_seconds / r.seconds for r in timed
                                                   if r.prefix_seconds is not None])
    return out


def format_summary(summary: dict[str, dict[str, float]], n: int) -> str:
    lines = [f"{n} edits", f"{'metric':<26} {'median':>10} {'p10':>10} {'p90':>10} {'mean':>10}"]
    for name, q in summary.items():
        lines.append(f"{name:<26} " + " ".join(f"{q[k]:>10.3g}" for k in ("median", "p10", "p90", "mean")))
    return "\n".join(lines)
