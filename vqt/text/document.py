"""Text-level documents: character edits -> re-tokenization -> token diff -> one engine update."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from vqt._strings import common_prefix_len, common_suffix_len
from vqt.text import persist
from vqt.text.changes import ChangedRange, LineIndex, PositionEncoding, apply_content_changes, check_encoding, merge_spans, \
    utf8_to_offset
from vqt.engine.spans import check_spans
from vqt.engine.document import Document, EditStats
from vqt.engine.options import DocumentOptions
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer, check_text

TextEdit = tuple[int, int, str]
SURPRISAL_ROWS = 256  # LM-head rows per chunk when surprisals are computed


def splice_surprisal(values: np.ndarray, edits: Sequence[tuple[int, int, Sequence[int]]],
                     hidden_changed: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """Per-token surprisals carried across one token update: the kept ones move with their tokens, and
    NaN (to compute again) marks new tokens, the first token after each edited span (its predecessor is
    another token now) and every token whose predecessor's final hidden state changed. ``edits`` are the
    update's hunks in old coordinates, sorted; ``hidden_changed`` its changed rows (None: all of them)."""
    if hidden_changed is None:
        return None
    for start, end, new in reversed(edits):
        tail = values[end:].copy()
        tail[:1] = np.nan
        values = np.concatenate([values[:start], np.full(len(new), np.nan), tail])
    after = np.asarray(hidden_changed, dtype=np.int64) + 1
    values[after[after < len(values)]] = np.nan
    return values


def token_diff(old: Sequence[int], new: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Hunks (start, end, replacement) in ``old`` coordinates that turn ``old`` into ``new``."""
    p = 0
    limit = min(len(old), len(new))
    while p < limit and old[p] == new[p]:
        p += 1
    s = 0
    while s < limit - p and old[len(old) - 1 - s] == new[len(new) - 1 - s]:
        s += 1
    a, b = old[p:len(old) - s], new[p:len(new) - s]
    if not a or not b:
        return [(p, p + len(a), list(b))] if a or b else []
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return [(p + i1, p + i2, list(b[j1:j2])) for tag, i1, i2, j1, j2 in ops if tag != "equal"]




def local_encode(tokenizer: Tokenizer, old_text: str, old_ids: Sequence[int] | np.ndarray,
                 old_offsets: Sequence[tuple[int, int]] | np.ndarray, new_text: str, margin: int = 4
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, list[int]]]]:
    """Tokenize ``new_text`` by re-encoding only a neighbourhood of what changed from ``old_text``.

    The neighbourhood starts ``margin`` tokens before the first changed character and ends ``margin``
    tokens after the last; it is accepted when its re-encoding reproduces the old tokens at both of its
    ends (the outermost ``margin`` tokens on each side, ids and offsets), i.e. the new tokens meet the
    old tokenization at a boundary on both sides (and neither side cuts a run of whitespace), and
    widened (margin doubled) until it does or covers the whole text. Returns the new ids (n,) and code-point offsets (n, 2) as int64 arrays
    (spliced with array copies: no per-token Python work outside the window), and the token edits
    (``token_diff`` of the re-encoded window, in old-token coordinates: the same hunks a diff of the
    whole sequences finds).
    """
    old_ids = np.asarray(old_ids, dtype=np.int64).reshape(-1)
    old_offsets = np.asarray(old_offsets, dtype=np.int64).reshape(-1, 2)
    n, delta = len(old_ids), len(new_text) - len(old_text)
    p = common_prefix_len(old_text, new_text)
    q = common_suffix_len(old_text, new_text, min(len(old_text), len(new_text)) - p)
    first = int(np.searchsorted(old_offsets[:, 1], p, side="right"))  # tokens before it end at or before p
    last = int(np.searchsorted(old_offsets[:, 0], len(old_text) - q, side="left"))  # from it: after the change
    last = max(last, first)
    edge = margin
    while True:
        i0, i1 = max(0, first - margin), min(n, last + margin)
        start = int(old_offsets[i0, 0]) if i0 < n else len(old_text)
        if i0 == 0:
            start = 0
        end_old = int(old_offsets[i1, 0]) if i1 < n else len(old_text)
        window_ids, window_offsets = tokenizer.encode_with_offsets(new_text[start:end_old + delta])
        ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
        offsets = np.asarray(window_offsets, dtype=np.int64).reshape(-1, 2) + start
        # The window's outermost tokens (up to ``edge`` on each side) must be the old ones: tokens nearer the
        # change may legitimately re-tokenize (a deletion can merge the token after it into the one before).
        left, right = min(edge, first - i0), min(edge, i1 - last)
        left_ok = i0 == 0 or (len(ids) >= left and np.array_equal(ids[:left], old_ids[i0:i0 + left])
                              and np.array_equal(offsets[:left], old_offsets[i0:i0 + left]))
        right_ok = i1 == n or (right <= len(ids) and np.array_equal(ids[len(ids) - right:], old_ids[i1 - right:i1])
                               and np.array_equal(offsets[len(offsets) - right:], old_offsets[i1 - right:i1] + delta))
        # A boundary inside a run of whitespace is not a boundary at all: how a run splits depends on its
        # whole length (GPT-2-style pre-tokenizers), so such a window is widened too.
        left_ok = left_ok and not (0 < start < len(new_text) and new_text[start - 1].isspace() and new_text[start].isspace())
        end_new = end_old + delta
        right_ok = right_ok and not (0 < end_new < len(new_text) and new_text[end_new - 1].isspace()
                                     and new_text[end_new].isspace())
        if (left_ok and right_ok) or (i0 == 0 and i1 == n):
            break
        margin *= 2
    new_ids = np.concatenate([old_ids[:i0], ids, old_ids[i1:]])
    new_offsets = np.concatenate([old_offsets[:i0], offsets, old_offsets[i1:] + delta])
    return new_ids, new_offsets, [(i0 + s, i0 + e, rep) for s, e, rep in token_diff(old_ids[i0:i1].tolist(),
                                                                                    ids.tolist())]


@dataclass(frozen=True)
class TextSnapshot:
    """Everything a TextDocument holds, copied: ``TextDocument.restore`` brings it back."""

    text: str
    offsets: list[tuple[int, int]]
    version: Optional[int]
    position_encoding: PositionEncoding
    last_stats: Optional[EditStats]
    changed: Optional[list[int]]  # tokens whose outputs changed with the last tracked update
    tokenizer: str  # fingerprint of the tokenizer
    state: persist.DocumentState


class TextDocument:
    """A text whose model state follows character edits.

    Offsets are Unicode code points (Python ``str`` indices), not bytes or UTF-16 units.
    Each edit re-tokenizes the text, diffs the token sequences (several hunks are
    allowed) and applies the diff to the underlying ``Document`` in one update. A failed
    edit leaves text, tokens and state unchanged.

    The editor API (``update``, ``apply_changes``, ``edit_bytes``, ``changed_ranges``, snapshots
    and saved states) adds an editor's version number and LSP position encodings on top.
    """

    version: Optional[int] = None  # the editor's version of the text: each versioned update must raise it
    _position_encoding: PositionEncoding = "utf-16"
    _changed: Optional[tuple[EditStats, list[int]]] = None  # (the last tracked update, its changed tokens)
    _surprisal: Optional[np.ndarray] = None  # bits per token once asked for (NaN: to compute), kept across edits

    def __init__(self, model: VQTModel, tokenizer: Optional[Tokenizer] = None, text: str = "",
                 options: Optional[DocumentOptions] = None, **settings) -> None:
        """``options`` (or its fields by keyword, as for ``Document``): the engine settings."""
        if not isinstance(model, VQTModel):
            raise TypeError(f"model must be a VQTModel, got {type(model).__name__}")
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            hint = " (the text is the third argument: TextDocument(model, tokenizer, text) or text=...)" \
                if isinstance(tokenizer, str) else ""
            raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__} {tokenizer!r:.40}{hint}")
        check_text(text, "text")
        self.tokenizer = tokenizer or Tokenizer.default()
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        # Tokens and their code-point spans as arrays, spliced by local_encode without per-token Python work.
        self._ids, self._offsets = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        self.doc = Document(model, ids, options, **settings)
        self._text = text
        self.last_stats: Optional[EditStats] = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def token_offsets(self) -> list[tuple[int, int]]:
        """(start, end) code-point span of every token."""
        return [(int(a), int(b)) for a, b in self._offsets.tolist()]

    def __len__(self) -> int:
        return len(self._text)

    def token_span(self, index: int) -> tuple[int, int]:
        """(start, end) code-point span of token ``index``."""
        if not 0 <= index < len(self._ids):
            raise IndexError(f"token index {index} is outside the document's {len(self._ids)} tokens")
        return int(self._offsets[index, 0]), int(self._offsets[index, 1])

    def last_token_ending_by(self, offset: int) -> int:
        """Index of the last token that ends at or before code-point ``offset`` (-1 if none); O(log n)."""
        return int(np.searchsorted(self._offsets[:, 1], offset, side="right")) - 1

    def edit(self, start: int, end: int, replacement: str) -> EditStats:
        """Replace text[start:end] by ``replacement`` (code-point offsets)."""
        return self.apply_text_edits([(start, end, replacement)])

    def apply_text_edits(self, edits: Sequence[TextEdit]) -> EditStats:
        """Apply several character edits, sorted and non-overlapping in the current text, in one update."""
        pieces, cur = [], 0
        for start, end, rep in check_spans(edits, len(self._text), "code-point", "(start, end, replacement)"):
            check_text(rep, "replacement")
            pieces += [self._text[cur:start], rep]
            cur = end
        pieces.append(self._text[cur:])
        return self.set_text("".join(pieces))

    def set_text(self, new_text: str) -> EditStats:
        """Make the document hold ``new_text``, re-tokenizing only around what changed (``local_encode``)
        and recomputing only what that token edit requires."""
        check_text(new_text, "text")
        ids, offsets, edits = local_encode(self.tokenizer, self._text, self._ids, self._offsets, new_text)
        stats = self.doc.apply_edits(edits)
        self._text, self._ids, self._offsets, self.last_stats = new_text, ids, offsets, stats
        if self._surprisal is not None:
            self._surprisal = splice_surprisal(self._surprisal, edits, stats.hidden_changed)
        return stats

    def surprisal(self) -> np.ndarray:
        """Surprisal of every token given the text before it, in bits (-log2 p; token 0 has none: NaN).

        Computed from the incremental state and kept across updates: after an edit the LM head runs
        only for new tokens, the first token after each edited span and tokens whose predecessor's
        final hidden state changed (``EditStats.hidden_changed``), so its cost follows the edit, not
        the document. Returns a read-only view.
        """
        n = len(self._ids)
        if self._surprisal is None or len(self._surprisal) != n:
            self._surprisal = np.full(n, np.nan)
        todo = np.flatnonzero(np.isnan(self._surprisal[1:])) + 1
        for at in range(0, len(todo), SURPRISAL_ROWS):
            rows = todo[at:at + SURPRISAL_ROWS]
            self._surprisal[rows] = self._bits(rows)
        view = self._surprisal.view()
        view.flags.writeable = False
        return view

    def surprisal_of(self, index: int) -> float:
        """Surprisal of token ``index`` in bits (token 0: NaN), from the kept values when they are
        there, else computed for this token alone."""
        self.token_span(index)  # validates the index
        if index == 0:
            return float("nan")
        if self._surprisal is not None and len(self._surprisal) == len(self._ids) and \
                not np.isnan(self._surprisal[index]):
            return float(self._surprisal[index])
        return float(self._bits(np.asarray([index]))[0])

    def _bits(self, rows: np.ndarray) -> np.ndarray:
        # -log p from log_softmax in the logits' dtype (no float64 copy of the (rows, vocab) logits; torch's
        # fused log_softmax is about twice as fast as logsumexp here)
        logits = self.doc.logits((rows - 1).tolist())
        ids = torch.from_numpy(self._ids[rows]).to(logits.device)
        nats = -torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0].double()
        return (nats / math.log(2)).cpu().numpy()

    # --------------------------------------------------------------- editor API
    @property
    def position_encoding(self) -> PositionEncoding:
        """How LSP positions count a line's characters: "utf-16" (the LSP default), "utf-8" or "utf-32"."""
        return self._position_encoding

    @position_encoding.setter
    def position_encoding(self, encoding: str) -> None:
        self._position_encoding = check_encoding(encoding)

    def _check_version(self, version: Optional[int]) -> None:
        if version is None:
            return
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {version!r}")
        if self.version is not None and version <= self.version:
            raise ValueError(f"stale version {version}: the document is at version {self.version} "
                             f"and versions must increase")

    def update(self, new_text: str, version: Optional[int] = None) -> EditStats:
        """``set_text`` for editors: checks that ``version`` (when given) increases and records which
        tokens' outputs changed, for ``changed_ranges``. On any error nothing changes."""
        self._check_version(version)
        stats = self.set_text(new_text)
        changed = stats.hidden_changed if stats.hidden_changed is not None else list(range(len(self.doc)))
        self._changed = (stats, changed)
        if version is not None:
            self.version = version
        return stats

    def apply_changes(self, changes: Sequence[Mapping[str, Any]], version: Optional[int]) -> EditStats:
        """Apply LSP TextDocumentContentChangeEvents in order, as ONE engine update.

        A change is ``{"range": {"start": {"line", "character"}, "end": {...}}, "text": ...}`` with
        characters counted in ``position_encoding`` units, or ``{"text": ...}`` for the whole text.
        ``version`` must exceed the current one (None skips the check). On any error (a stale
        version, a position inside a character, a text too long for the model) nothing changes.
        """
        self._check_version(version)
        return self.update(apply_content_changes(self._text, changes, self._position_encoding), version)

    def edit_bytes(self, start_byte: int, old_end_byte: int, new_end_byte: int, new_text: str | bytes,
                   version: Optional[int] = None) -> EditStats:
        """tree-sitter's edit: UTF-8 bytes [start_byte, old_end_byte) become ``new_text``, which ends
        at ``new_end_byte``. Byte offsets must fall between characters."""
        if isinstance(new_text, (bytes, bytearray)):
            try:
                new_text = bytes(new_text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"new_text is not valid UTF-8: {e}") from None
        check_text(new_text, "new_text")
        data = self._text.encode("utf-8")
        start, end = utf8_to_offset(data, start_byte, "start_byte"), utf8_to_offset(data, old_end_byte, "old_end_byte")
        if end < start:
            raise ValueError(f"old_end_byte {old_end_byte} is before start_byte {start_byte}")
        n_new = len(new_text.encode("utf-8"))
        if new_end_byte != start_byte + n_new:
            raise ValueError(f"new_end_byte {new_end_byte} should be start_byte + {n_new} "
                             f"(the UTF-8 length of new_text) = {start_byte + n_new}")
        return self.update(self._text[:start] + new_text + self._text[end:], version)

    def changed_ranges(self) -> list[ChangedRange]:
        """Text spans whose tokens' final hidden states changed with the last update (new tokens
        included), merged and sorted, with LSP ranges in ``position_encoding`` units. Deleted text
        has no span of its own: the tokens around it show up when their outputs moved.

        Follows updates made by ``update``, ``apply_changes`` and ``edit_bytes``; after one made by
        another method (``edit``, ``set_text``) it raises ValueError.
        """
        if self.last_stats is None:
            return []
        if self._changed is None or self._changed[0] is not self.last_stats:
            raise ValueError("changed_ranges() follows updates made by update(), apply_changes() or edit_bytes(); "
                             "the last update was made by another method")
        index = LineIndex(self._text)
        spans = merge_spans((int(self._offsets[i, 0]), int(self._offsets[i, 1])) for i in self._changed[1])
        return [ChangedRange(s, e, index.lsp_range(s, e, self._position_encoding)) for s, e in spans]

    def snapshot(self) -> TextSnapshot:
        """A copy of the whole state; ``restore`` brings it back."""
        changed = list(self._changed[1]) if self._changed and self._changed[0] is self.last_stats else None
        return TextSnapshot(self._text, self.token_offsets, self.version, self._position_encoding, self.last_stats,
                            changed, persist.tokenizer_fingerprint(self.tokenizer), persist.capture(self.doc))

    def restore(self, snapshot: TextSnapshot) -> None:
        """Return to ``snapshot`` (taken from a document with the same model and tokenizer).
        Refused with ValueError, leaving the document unchanged, otherwise."""
        if not isinstance(snapshot, TextSnapshot):
            raise TypeError(f"restore() takes a TextSnapshot, got {type(snapshot).__name__}")
        if snapshot.tokenizer != persist.tokenizer_fingerprint(self.tokenizer):
            raise ValueError("the snapshot was taken with another tokenizer")
        persist.restore(self.doc, snapshot.state)
        self._text, self.version = snapshot.text, snapshot.version
        self._offsets = np.asarray(snapshot.offsets, dtype=np.int64).reshape(-1, 2)
        self._ids = np.asarray(self.doc.token_ids, dtype=np.int64)
        self._position_encoding = snapshot.position_encoding
        self.last_stats = snapshot.last_stats
        self._surprisal = None  # (computed again when asked)
        self._changed = None if snapshot.changed is None else (snapshot.last_stats, list(snapshot.changed))

    def save_state(self, path: str | Path) -> None:
        """Write the whole state (text, version, tokens, positions, every cached tensor) to ``path``
        in the versioned, checksummed format of ``vqt.persist``."""
        changed = self._changed[1] if self._changed and self._changed[0] is self.last_stats else None
        meta = {"text": self._text, "version": self.version, "position_encoding": self._position_encoding,
                "last_stats": None if self.last_stats is None else persist.stats_to_json(self.last_stats),
                "changed": changed}
        persist.write_state(path, persist.capture(self.doc, copy=False), self.tokenizer, meta)

    @classmethod
    def load_state(cls, path: str | Path, model: VQTModel, tokenizer: Optional[Tokenizer] = None) -> "TextDocument":
        """A document saved by ``save_state``, continuing exactly as the original would.

        Raises ValueError for a corrupted file, another format version, or a state saved with
        another model or tokenizer.
        """
        tokenizer = tokenizer or Tokenizer.default()
        state, meta = persist.read_state(path, model, tokenizer)
        try:
            text = meta["text"]
            check_text(text, "saved text")
            stats = None if meta["last_stats"] is None else persist.stats_from_json(meta["last_stats"])
            version, encoding, changed = meta["version"], check_encoding(meta["position_encoding"]), meta["changed"]
            doc = cls(model, tokenizer, "", persist.document_options(state))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed document metadata ({e})") from None
        ids, offsets = tokenizer.encode_with_offsets(text)
        doc.restore(TextSnapshot(text, offsets, version, encoding, stats, changed,
                                 persist.tokenizer_fingerprint(tokenizer), state))
        if doc.doc.token_ids != ids:
            raise ValueError(f"{path}: the saved tokens are not the tokenization of the saved text")
        return doc
