"""Atomic edits between revisions: exact round trips on real histories and on arbitrary strings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqt.histories.formats import iter_history
from vqt.histories.edits import (
    MAX_DIFF_LINES,
    Edit,
    RevisionStats,
    apply_edits,
    atomic_edits,
    revision_edits,
)

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wiki"


def _wiki(name: str) -> Path:
    if not WIKI.is_dir():
        pytest.skip(f"shared data folder {WIKI} is absent (see shared/data/README.md)")
    return WIKI / name


def _check(old: str, new: str) -> list[Edit]:
    """atomic_edits(old, new) round-trips, goes left to right and holds no no-op edit."""
    edits = atomic_edits(old, new)
    assert apply_edits(old, edits) == new
    for edit, after in zip(edits, edits[1:]):
        assert after.start >= edit.start + len(edit.text)  # each starts after the text the previous wrote
    assert all(e.start < e.end or e.text for e in edits)
    return edits


# --------------------------------------------------------------------------- real histories


@pytest.mark.parametrize(
    "name", ["adam_himebauch", "american_goldfinch", "japan_cup", "nintendo_switch"]
)
def test_round_trip_api_articles(name: str) -> None:
    texts = [r["text"] for r in iter_history(_wiki(f"api/{name}.json.xz"))]
    assert len(texts) > 1
    for old, new in zip(texts, texts[1:]):
        _check(old, new)


def test_round_trip_first_500_anarchism_revisions() -> None:
    texts = [r["text"] for r in iter_history(_wiki("enwiki-anarchism-history.xml.lzma"), max_revisions=500)]
    assert len(texts) == 500
    start = time.perf_counter()
    hunks = sum(len(_check(old, new)) for old, new in zip(texts, texts[1:]))
    assert hunks >= 499 - sum(a == b for a, b in zip(texts, texts[1:]))
    assert time.perf_counter() - start < 20


def test_revision_edits_replay_anarchism() -> None:
    revisions = list(iter_history(_wiki("enwiki-anarchism-history.xml.lzma"), max_revisions=500))
    text_of = {r["rev_id"]: r["text"] for r in revisions}
    stats = RevisionStats()
    records = list(revision_edits(revisions, stats=stats))
    identical = sum(a["text"] == b["text"] for a, b in zip(revisions, revisions[1:]))
    assert stats.pairs == 499 and stats.identical == identical and len(records) == 499 - identical
    reverts = 0
    for i, (old, new) in enumerate(zip(revisions, revisions[1:])):
        reverts += old["text"] != new["text"] and any(r["text"] == new["text"] for r in revisions[:i])
    assert stats.reverts == reverts == sum(r.flags.revert for r in records) > 0
    for record in records:
        assert apply_edits(text_of[record.parent_rev_id], record.edits) == text_of[record.rev_id]


# --------------------------------------------------------------------------- hand-made cases


def test_identical_texts_need_no_edit() -> None:
    assert atomic_edits("", "") == []
    assert atomic_edits("same\ntext", "same\ntext") == []


def test_one_hunk_is_trimmed_to_the_changed_characters() -> None:
    assert _check("hello world\n", "hello there world\n") == [Edit(6, 6, "there ")]
    assert _check("abc", "") == [Edit(0, 3, "")]
    assert _check("", "abc") == [Edit(0, 0, "abc")]


def test_hunks_are_in_order_with_shifted_offsets() -> None:
    old = "a\nb\nc\nd\ne\n"
    new = "a\nBB\nc\nd\nE\n"  # the first hunk grows by one, so the second moves right by one
    assert _check(old, new) == [Edit(2, 3, "BB"), Edit(9, 10, "E")]


def test_offsets_are_code_points() -> None:
    assert _check("naïve 😀 text", "naïve 😃 text") == [Edit(6, 7, "😃")]


def test_huge_diff_falls_back_to_one_hunk() -> None:
    lines = [f"line {i}\n" for i in range(MAX_DIFF_LINES)]
    start = time.perf_counter()
    edits = _check("".join(lines), "".join(reversed(lines)))
    assert len(edits) == 1
    assert time.perf_counter() - start < 5


def test_apply_edits_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        apply_edits("abc", [Edit(2, 5, "x")])


# --------------------------------------------------------------------------- revision_edits


def _revs(*texts: str, doc_id: str = "d", sha1: bool = False) -> list[dict]:
    return [
        {"doc_id": doc_id, "rev_id": i, "text": t, "sha1": f"h{hash(t)}" if sha1 else ""}
        for i, t in enumerate(texts)
    ]


@pytest.mark.parametrize("sha1", [False, True])
def test_revision_edit_flags(sha1: bool) -> None:
    base = "alpha\n" * 20
    texts = (base, base + "beta\n", base + "beta\n", base, "", base, base + "x" * 300)
    stats = RevisionStats()
    records = list(revision_edits(_revs(*texts, sha1=sha1), max_edit_chars=200, stats=stats))
    assert [(r.parent_rev_id, r.rev_id) for r in records] == [(0, 1), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert [r.flags.revert for r in records] == [False, True, False, True, False]
    assert [r.flags.blanking for r in records] == [False, False, True, False, False]
    assert [r.flags.oversize for r in records] == [False, False, False, False, True]
    assert records[-1].edits == ()
    assert stats == RevisionStats(pairs=6, identical=1, reverts=2, blankings=1, oversize=1)


def test_revision_edits_keeps_identical_on_request_and_restarts_per_document() -> None:
    revisions = _revs("a", "a", "b") + _revs("b", "c", doc_id="e")
    records = list(revision_edits(revisions, skip_identical=False))
    assert [(r.doc_id, r.parent_rev_id, r.rev_id, r.edits) for r in records] == [
        ("d", 0, 1, ()),
        ("d", 1, 2, (Edit(0, 1, "b"),)),
        ("e", 0, 1, (Edit(0, 1, "c"),)),
    ]


# --------------------------------------------------------------------------- properties

# Few distinct characters and many line breaks make the line diff find real matches.
LINEY = st.text(alphabet=st.sampled_from("ab\n\r\u2028é😀"), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), LINEY), st.one_of(st.text(), LINEY))
def test_round_trip_arbitrary_strings(old: str, new: str) -> None:
    _check(old, new)


@st.composite
def _edited(draw: st.DrawFn) -> tuple[str, str]:
    """A text and a copy of it with a few splices, like a real revision."""
    old = draw(st.lists(st.sampled_from(["x\n", "y\n", "z z\n", "\n", "ü\n"]), max_size=40).map("".join))
    new = old
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(new)))
        j = draw(st.integers(i, len(new)))
        new = new[:i] + draw(st.text(max_size=8)) + new[j:]
    return old, new


@settings(max_examples=300, deadline=None)
@given(_edited())
def test_round_trip_spliced_strings(pair: tuple[str, str]) -> None:
    _check(*pair)
