"""Atomic edits between consecutive revisions: one replace per diff hunk.

All offsets are Unicode code points (Python `str` indices). A list of edits is
applied in order, each to the text the previous one produced, like LSP's
ordered content changes; `apply_edits(old, atomic_edits(old, new)) == new`.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vqt._strings import common_prefix_len, common_suffix_len

# Above this many lines (old and new together, after trimming the common prefix
# and suffix) the line diff is skipped and the middle becomes a single hunk, so
# that a pathological pair cannot make difflib run for minutes.
MAX_DIFF_LINES = 20_000

# A revision shorter than this fraction of its parent counts as a blanking.
BLANKING_RATIO = 0.1


@dataclass(frozen=True)
class Edit:
    """Replace `text[start:end]` (code points) of the current text by `text`."""

    start: int
    end: int
    text: str

    @property
    def size(self) -> int:
        """Code points removed or inserted, whichever is more."""
        return max(self.end - self.start, len(self.text))


def apply_edits(text: str, edits: Iterable[Edit]) -> str:
    """Apply `edits` in order, each to the text the previous one produced (offsets are code points)."""
    for edit in edits:
        if not 0 <= edit.start <= edit.end <= len(text):
            raise ValueError(f"{edit} is out of range for a text of {len(text)} code points")
        text = text[: edit.start] + edit.text + text[edit.end :]
    return text


def atomic_edits(old: str, new: str) -> list[Edit]:
    """Edits turning `old` into `new`: one replace per line-diff hunk, trimmed to the changed characters.

    Offsets are code points, and each edit's offsets refer to the text left by
    the edits before it (hunks go left to right, so earlier ones shift later ones).
    """
    prefix = common_prefix_len(old, new)
    suffix = common_suffix_len(old, new, min(len(old), len(new)) - prefix)
    a, b = old[prefix : len(old) - suffix], new[prefix : len(new) - suffix]
    edits: list[Edit] = []
    shift = prefix  # where position 0 of `a` lies in the current text
    for a0, a1, b0, b1 in _line_hunks(a, b):
        head = common_prefix_len(a[a0:a1], b[b0:b1])
        tail = common_suffix_len(a[a0:a1], b[b0:b1], min(a1 - a0, b1 - b0) - head)
        edits.append(Edit(shift + a0 + head, shift + a1 - tail, b[b0 + head : b1 - tail]))
        shift += (b1 - b0) - (a1 - a0)
    return edits


def _line_hunks(a: str, b: str) -> list[tuple[int, int, int, int]]:
    """Character ranges (a0, a1, b0, b1) of the hunks of a line diff of `a` and `b`."""
    if not a and not b:
        return []
    a_lines, b_lines = a.splitlines(keepends=True), b.splitlines(keepends=True)
    if len(a_lines) + len(b_lines) > MAX_DIFF_LINES:
        return [(0, len(a), 0, len(b))]
    a_at, b_at = _line_starts(a_lines), _line_starts(b_lines)
    matcher = difflib.SequenceMatcher(None, a_lines, b_lines, autojunk=True)
    return [
        (a_at[i1], a_at[i2], b_at[j1], b_at[j2])
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def _line_starts(lines: Sequence[str]) -> list[int]:
    """Offset of each line and, last, the total length."""
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return starts




@dataclass(frozen=True)
class EditFlags:
    """What kind of change a revision is; see `revision_edits`."""

    revert: bool = False
    blanking: bool = False
    oversize: bool = False


@dataclass(frozen=True)
class RevisionEdits:
    """The edits that turn revision `parent_rev_id` of a document into revision `rev_id`."""

    doc_id: str
    rev_id: int
    parent_rev_id: int
    edits: tuple[Edit, ...]
    flags: EditFlags


@dataclass
class RevisionStats:
    """Counts kept by `revision_edits` over the pairs it has seen."""

    pairs: int = 0
    identical: int = 0
    reverts: int = 0
    blankings: int = 0
    oversize: int = 0


def revision_edits(
    revisions: Iterable[Mapping[str, Any]],
    max_edit_chars: int | None = None,
    skip_identical: bool = True,
    stats: RevisionStats | None = None,
) -> Iterator[RevisionEdits]:
    """Yield the atomic edits between consecutive revisions (dicts like `vqt.data.Revision`).

    The previous revision is the one before in the stream, whatever its
    `parent_id` says; the state restarts when `doc_id` changes. Flags:
    `revert` when the new text (or sha1) equals that of a revision before the
    immediate parent; `blanking` when the new text is empty or shorter than
    10% of the old; `oversize` when `max_edit_chars` is set and an edit's size
    (code points) exceeds it: such a pair is skipped, that is yielded with no
    edits so that a replay knows to start afresh from its text. Identical
    consecutive revisions are skipped unless `skip_identical` is False.
    `stats`, when given, is updated with the counts.
    """
    stats = RevisionStats() if stats is None else stats
    prev: Mapping[str, Any] | None = None
    seen_text: set[bytes] = set()  # revisions before `prev` of the current document
    seen_sha1: set[str] = set()
    for rev in revisions:
        if prev is None or rev["doc_id"] != prev["doc_id"]:
            prev = rev
            seen_text.clear()
            seen_sha1.clear()
            continue
        stats.pairs += 1
        old, new = prev["text"], rev["text"]
        if old == new:
            stats.identical += 1
        if old != new or not skip_identical:
            digest, sha1 = _digest(new), rev.get("sha1", "")
            revert = digest in seen_text or (bool(sha1) and sha1 in seen_sha1)
            blanking = len(new) < BLANKING_RATIO * len(old)
            edits = tuple(atomic_edits(old, new))
            oversize = max_edit_chars is not None and any(e.size > max_edit_chars for e in edits)
            stats.reverts += revert
            stats.blankings += blanking
            stats.oversize += oversize
            yield RevisionEdits(
                doc_id=rev["doc_id"],
                rev_id=rev["rev_id"],
                parent_rev_id=prev["rev_id"],
                edits=() if oversize else edits,
                flags=EditFlags(revert=revert, blanking=blanking, oversize=oversize),
            )
        seen_text.add(_digest(old))
        if prev.get("sha1"):
            seen_sha1.add(prev["sha1"])
        prev = rev


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
