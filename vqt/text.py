"""Text-level documents: character edits -> re-tokenization -> token diff -> one engine update."""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

from .engine import Document, EditStats
from .model import VQTModel
from .tokenizer import Tokenizer, check_text

TextEdit = tuple[int, int, str]


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


class TextDocument:
    """A text whose model state follows character edits.

    Offsets are Unicode code points (Python ``str`` indices), not bytes or UTF-16 units.
    Each edit re-tokenizes the text, diffs the token sequences (several hunks are
    allowed) and applies the diff to the underlying ``Document`` in one update. A failed
    edit leaves text, tokens and state unchanged.
    """

    def __init__(self, model: VQTModel, tokenizer: Optional[Tokenizer] = None, text: str = "", **doc_kwargs) -> None:
        check_text(text, "text")
        self.tokenizer = tokenizer or Tokenizer.default()
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        ids, self._offsets = self.tokenizer.encode_with_offsets(text)
        self.doc = Document(model, ids, **doc_kwargs)
        self._text = text
        self.last_stats: Optional[EditStats] = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def token_offsets(self) -> list[tuple[int, int]]:
        """(start, end) code-point span of every token."""
        return list(self._offsets)

    def __len__(self) -> int:
        return len(self._text)

    def edit(self, start: int, end: int, replacement: str) -> EditStats:
        """Replace text[start:end] by ``replacement`` (code-point offsets)."""
        return self.apply_text_edits([(start, end, replacement)])

    def apply_text_edits(self, edits: Sequence[TextEdit]) -> EditStats:
        """Apply several character edits, sorted and non-overlapping in the current text, in one update."""
        n, prev, pieces, cur = len(self._text), 0, [], 0
        for e in edits:
            if not isinstance(e, (tuple, list)) or len(e) != 3:
                raise TypeError(f"a text edit is (start, end, replacement), got {e!r}")
            start, end, rep = e
            for name, v in (("start", start), ("end", end)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"edit {name} must be an int (a code-point offset), got {v!r}")
            if not 0 <= start <= end <= n:
                raise ValueError(f"invalid character range [{start}, {end}) for a text of {n} code points")
            if start < prev:
                raise ValueError(f"text edits must be sorted and non-overlapping: [{start}, {end}) starts before {prev}")
            check_text(rep, "replacement")
            pieces += [self._text[cur:start], rep]
            cur = prev = end
        pieces.append(self._text[cur:])
        return self.set_text("".join(pieces))

    def set_text(self, new_text: str) -> EditStats:
        """Make the document hold ``new_text``, recomputing only what the token diff requires."""
        check_text(new_text, "text")
        ids, offsets = self.tokenizer.encode_with_offsets(new_text)
        stats = self.doc.apply_edits(token_diff(self.doc.token_ids, ids))
        self._text, self._offsets, self.last_stats = new_text, offsets, stats
        return stats
