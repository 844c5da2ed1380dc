"""Replaying revision histories edit by edit through the incremental engine, with baselines.

Whole documents by default: the document of each revision pair is the parent revision's whole
text, and every atomic edit of the pair is applied to it wherever it falls, so the document
follows the history exactly (checked after every pair). A revision pair is skipped, and the
document rebuilt from the next revision with a dense pass that is not counted as an edit, when
it holds an edit larger than ``max_edit_chars``, blanks the document, is a revert (with
``skip_reverts``), or would make the document longer than the engine's memory guard
(``DocumentOptions.max_tokens``; for full-attention models the model's ``max_len``): such
documents are skipped with a reason passed to ``on_skip`` and counted in ``ReplayStats``,
never an error.

``prefix_tokens=N`` replays only the first N tokens of each document instead (the behaviour
before whole-document replay): an atomic edit counts when it starts inside the prefix (the
part that runs past the prefix's end is clipped); edits after the prefix are skipped. When the
prefix's token count drifts outside [0.75, 1.25] x N (or past the memory guard), the document
is re-cut from the current revision with an uncounted dense pass.

``replay`` is a pure function of its arguments (model, revisions, options): replays of
different pages share nothing, so a corpus can be split across processes or machines.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from vqt.engine.options import DocumentOptions
from vqt.histories.edits import revision_edits
from vqt.modeling.model import VQTModel
from vqt.ops import get_backend
from vqt.text.document import TextDocument
from vqt.text.tokenizer import Tokenizer


# Revision pairs with an atomic edit larger than this (code points) are skipped by default: such an edit is
# a rewrite, not the small edit whose cost the replay measures.
MAX_EDIT_CHARS = 2000


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
    dense_seconds: Optional[float] = None  # dense forward of the edited document (or prefix), same process
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


@dataclass
class ReplayStats:
    """What a replay did besides the edits it yielded; ``replay`` updates the one it is given."""

    pairs: int = 0  # revision pairs read (identical consecutive revisions are not pairs)
    edits: int = 0  # atomic edits replayed (records yielded)
    rebuilds: int = 0  # uncounted dense passes that (re)started a document
    oversize: int = 0  # pairs skipped: an atomic edit larger than max_edit_chars
    blankings: int = 0  # pairs skipped: the new revision blanks the document
    reverts: int = 0  # pairs skipped with skip_reverts
    over_guard: int = 0  # pairs skipped: the document is (or would grow) longer than the memory guard
    outside_prefix: int = 0  # with prefix_tokens: atomic edits after the prefix, not replayed

    def skipped_pairs(self) -> int:
        return self.oversize + self.blankings + self.reverts + self.over_guard

    def describe(self, max_edit_chars: Optional[int] = MAX_EDIT_CHARS) -> str:
        """One line: the pairs read and every reason pairs or edits were left out (the non-zero ones)."""
        reasons = [(self.oversize, f"with an edit over {max_edit_chars} characters"),
                   (self.blankings, "blanking the document"), (self.reverts, "reverts"),
                   (self.over_guard, "of documents over the memory guard (--max-tokens)")]
        parts = [f"{n} {what}" for n, what in reasons if n]
        line = f"{self.pairs} revision pairs, {self.edits} edits replayed"
        if parts:
            line += f"; skipped {self.skipped_pairs()} pairs: " + ", ".join(parts)
        if self.outside_prefix:
            line += f"; {self.outside_prefix} edits after the replayed prefix left out"
        return line


# EditRecord fields copied as they are from the engine's EditStats.
_FROM_STATS = ("n_tokens", "first_changed", "macs", "dense_macs", "prefix_macs", "cone_macs", "ratio", "prefix_ratio",
               "cone_ratio",
               "dirty_per_layer", "flips_per_layer", "code_flips_per_layer", "affected_per_layer",
               "certified_skips", "refreshes", "renumbered", "seconds", "macs_by_kind")


def _prefix_end(offsets: list[tuple[int, int]], text: str, prefix_tokens: int) -> int:
    """Code-point offset where the first ``prefix_tokens`` tokens (of ``offsets``) of ``text`` end."""
    return len(text) if len(offsets) <= prefix_tokens else offsets[prefix_tokens - 1][1]


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def replay(model: VQTModel, revisions: Iterable[Mapping[str, Any]], tokenizer: Tokenizer,
           prefix_tokens: Optional[int] = None, max_edits: Optional[int] = None, baselines: bool = True,
           verify: bool = False, max_edit_chars: Optional[int] = MAX_EDIT_CHARS, skip_reverts: bool = False,
           observe: Optional[Callable[[TextDocument, EditRecord], None]] = None,
           options: Optional[DocumentOptions] = None, stats: Optional[ReplayStats] = None,
           on_skip: Optional[Callable[[str], None]] = None,
           window_tokens: Optional[int] = None) -> Iterator[EditRecord]:
    """Yield one ``EditRecord`` per atomic edit replayed (every edit of the whole document by default).

    prefix_tokens: replay only the first N tokens of each document (see the module's docstring).
    baselines: also time a dense forward and prefix reuse on every edited document (same process,
    same model, each on the fastest backend's kernels: ``get_backend("auto")``). verify: check every
    step against the dense forward of the reference operators, under the contract (``dense_check``). observe: called with the
    document and the record after every edit, before the record is yielded (to measure anything
    else about the edited state). options: the documents' engine settings, whose ``max_tokens``
    memory guard skips longer documents. stats: updated with what was replayed and skipped.
    on_skip: called with a one-line reason when a document is first found over the memory guard
    (its pairs are then skipped until it fits again). window_tokens: the former name of
    ``prefix_tokens`` (deprecated).
    """
    if window_tokens is not None:
        if prefix_tokens is not None:
            raise ValueError("give prefix_tokens or its deprecated name window_tokens, not both")
        warnings.warn("replay(window_tokens=N) is now replay(prefix_tokens=N); without it the whole document is "
                      "replayed", DeprecationWarning, stacklevel=2)
        _positive("window_tokens", window_tokens)
        prefix_tokens = window_tokens
    if model.training:
        raise ValueError("call model.eval() before replaying")
    for name, value in (("prefix_tokens", prefix_tokens), ("max_edits", max_edits),
                        ("max_edit_chars", max_edit_chars)):
        _positive(name, value)
    return _replay(model, revisions, tokenizer, prefix_tokens, max_edits, baselines, verify, max_edit_chars,
                   skip_reverts, observe, options or DocumentOptions(), stats if stats is not None else ReplayStats(),
                   on_skip)


def _replay(model: VQTModel, revisions: Iterable[Mapping[str, Any]], tokenizer: Tokenizer,
            prefix_tokens: Optional[int], max_edits: Optional[int], baselines: bool, verify: bool,
            max_edit_chars: Optional[int], skip_reverts: bool,
            observe: Optional[Callable[[TextDocument, EditRecord], None]], options: DocumentOptions,
            stats: ReplayStats, on_skip: Optional[Callable[[str], None]]) -> Iterator[EditRecord]:
    limit = options.token_limit(model.config)  # the memory guard (None: no cap)
    fastest = get_backend("auto", model.device) if baselines else None
    if prefix_tokens is not None and limit is not None:
        prefix_tokens = min(prefix_tokens, limit)
    texts: dict[int, str] = {}

    def remember(revs):
        for rev in revs:
            texts[rev["rev_id"]] = rev["text"]
            if len(texts) > 3:
                texts.pop(next(iter(texts)))
            yield rev

    def over_guard(n_tokens: int) -> bool:
        return limit is not None and n_tokens > limit

    doc: Optional[TextDocument] = None
    doc_of: Optional[tuple[str, str]] = None  # (doc_id, the revision's whole text) whose text or prefix doc holds
    guarded: Optional[str] = None  # the doc_id last found over the memory guard, until it fits again
    pend = 0  # with prefix_tokens: where the prefix ends in the current text (code points)
    dense = None
    count = 0
    for pair in revision_edits(remember(revisions), max_edit_chars=max_edit_chars):
        if max_edits is not None and count >= max_edits:
            return
        stats.pairs += 1
        skip = ("oversize" if pair.flags.oversize else "blankings" if pair.flags.blanking else
                "reverts" if skip_reverts and pair.flags.revert else None)
        if skip is not None:
            setattr(stats, skip, getattr(stats, skip) + 1)
            doc = None  # start afresh from the next revision
            continue
        parent = texts[pair.parent_rev_id]
        if doc is None or doc_of != (pair.doc_id, parent) or (prefix_tokens is not None and not (
                0.75 * prefix_tokens <= len(doc.doc) <= min(1.25 * prefix_tokens, limit or float("inf")))):
            doc = None
            ids, offsets = tokenizer.encode_with_offsets(parent)
            if prefix_tokens is not None:
                pend = _prefix_end(offsets, parent, prefix_tokens)
            elif over_guard(len(ids)):
                stats.over_guard += 1
                if guarded != pair.doc_id and on_skip is not None:
                    on_skip(f"{pair.doc_id} revision {pair.parent_rev_id}: {len(ids)} tokens exceed the memory "
                            f"guard max_tokens={limit}; its revision pairs are skipped until it fits")
                guarded = pair.doc_id
                continue
            guarded = None
            doc = TextDocument(model, tokenizer, parent[:pend] if prefix_tokens is not None else parent, options)
            stats.rebuilds += 1
            dense = model.forward_dense(doc.doc.token_ids, doc.doc.positions, backend=fastest) if baselines else None
        full_len = len(parent)  # length of the whole text the next edit applies to
        for i, e in enumerate(pair.edits):
            text_len = full_len
            full_len += len(e.text) - (e.end - e.start)
            end = e.end
            if prefix_tokens is not None:
                if e.start > pend or e.start == pend < text_len:
                    stats.outside_prefix += 1
                    continue  # after the prefix (an insertion exactly at its end counts only at the text's end)
                end = min(e.end, pend)
            new_len = len(doc.text) + len(e.text) - (end - e.start)
            try:
                st = doc.edit(e.start, end, e.text)
            except ValueError:  # over the memory guard? (the document is left as it was)
                new_text = doc.text[:e.start] + e.text + doc.text[end:]
                n_new = len(tokenizer.encode(new_text))
                if not over_guard(n_new):
                    raise
                doc = None
                if prefix_tokens is None:  # the prefix is re-cut at the next pair; a whole document is skipped
                    stats.over_guard += 1
                    if on_skip is not None:
                        on_skip(f"{pair.doc_id} revision {pair.rev_id}: {n_new} tokens would exceed the memory "
                                f"guard max_tokens={limit}; its revision pairs are skipped until it fits")
                    guarded = pair.doc_id
                break
            pend = new_len
            rec = EditRecord(doc_id=pair.doc_id, rev_id=pair.rev_id, edit_index=i, chars_removed=end - e.start,
                             chars_inserted=len(e.text), inserted_tokens=st.inserted, deleted_tokens=st.deleted,
                             n_groups=model.config.n_groups, flags={"revert": pair.flags.revert},
                             **{name: getattr(st, name) for name in _FROM_STATS})
            if baselines:  # each on its fastest exact path: the fastest backend's kernels
                tok, pos = doc.doc.token_ids, doc.doc.positions
                t0 = time.perf_counter()
                new_dense = model.forward_dense(tok, pos, backend=fastest)
                rec.dense_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.forward_dense(tok, pos, cache=dense, start=st.first_changed, keep_prefix=False, backend=fastest)
                rec.prefix_seconds = time.perf_counter() - t0
                dense = new_dense
            if verify:  # against the reference operators: independent of the backend the document runs on
                rec.exact = matches_dense(model, doc)
            count += 1
            stats.edits += 1
            if observe is not None:
                observe(doc, rec)
            yield rec
            if max_edits is not None and count >= max_edits:
                return
        if doc is not None:
            if prefix_tokens is None and doc.text != texts[pair.rev_id]:
                raise RuntimeError(f"{pair.doc_id} revision {pair.rev_id}: the replayed document differs from the "
                                   f"revision's text (a bug in the atomic edits or the document)")
            doc_of = (pair.doc_id, texts[pair.rev_id])


def dense_tolerance(model: VQTModel) -> float:
    """The absolute tolerance of hidden states against a dense forward: float noise of the model's dtype."""
    return 1e-9 if model.dtype == torch.float64 else 1e-4


def dense_check(model: VQTModel, doc: TextDocument) -> tuple[bool, int, float]:
    """``doc``'s state against a dense forward of its tokens and positions (the reference operators),
    under the contract (DESIGN.md section 8): codes identical and hidden states within ``dense_tolerance``,
    where in float32 the dense forward follows the document's codes wherever its own choice is undecided
    at float noise (each layer judged given the codes below; ``forward_dense(follow_codes=...)``).
    Returns (ok, codes that differ, largest hidden-state difference)."""
    codes = doc.doc.codes if model.config.quantize else None
    dense = model.forward_dense(doc.doc.token_ids, doc.doc.positions, follow_codes=codes)
    differ = 0 if codes is None else int((dense.codes != codes).sum())
    diff = float((dense.hidden - doc.doc.hidden).abs().max()) if len(doc.doc) else 0.0
    return differ == 0 and diff <= dense_tolerance(model), differ, diff


def matches_dense(model: VQTModel, doc: TextDocument) -> bool:
    """Whether ``doc``'s state matches a dense forward under the contract (``dense_check``)."""
    return dense_check(model, doc)[0]


def percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` of a non-empty list (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def quantiles(values: list[float]) -> dict[str, float]:
    """median, p10, p90 and mean of a list (inf-safe for the median)."""
    if not values:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan"), "mean": float("nan")}
    finite = [v for v in values if v != float("inf")]
    return {"median": statistics.median(values), "p10": percentile(values, 0.1), "p90": percentile(values, 0.9),
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
