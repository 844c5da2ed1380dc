"""The editor API of TextDocument: LSP changes and encodings, byte edits, changed ranges, snapshots, saved states."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from helpers import assert_matches_dense, tiny_model
from lsp_helpers import lsp_position
from vqt import TextDocument
from vqt.engine.options import DocumentOptions
from vqt.text.changes import LineIndex, apply_content_changes
from vqt.text.document import token_diff
from vqt.text.persist import FORMAT_VERSION, MAGIC
from vqt.text.tokenizer import Tokenizer

TOKENIZER = Tokenizer.default()
MODEL = tiny_model(vocab_size=TOKENIZER.vocab_size, max_len=160, window=16.0)
OTHER_MODEL = tiny_model(vocab_size=TOKENIZER.vocab_size, max_len=160, window=16.0, seed=1, calibrate=False)
BASE = "Café owners in Zürich\r\nmet 東京 people 😀 on a Tuesday.\nThe 🦀 crab\rwalked away — slowly."
ENCODINGS = ("utf-16", "utf-8", "utf-32")
CHARS = st.sampled_from(list("ab xé東😀🦀\n\r—") + ["\r\n"])


def full_state(doc: TextDocument):
    return doc.text, doc.version, doc.doc.token_ids, doc.doc.state_dict()


def assert_same_state(a, b):
    assert a[:3] == b[:3]
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        assert torch.equal(a[3][k], b[3][k]), k


# ------------------------------------------------------------------ positions
@given(st.lists(CHARS, max_size=25).map("".join), st.data())
def test_positions_round_trip_against_an_independent_oracle(text, data):
    index = LineIndex(text)
    offset = data.draw(st.integers(0, len(text)))
    if 0 < offset < len(text) and text[offset - 1:offset + 1] == "\r\n":
        offset -= 1  # between \r and \n is not a position of its own
    for enc in ENCODINGS:
        pos = lsp_position(text, offset, enc)
        assert index.position(offset, enc) == (pos["line"], pos["character"])
        assert index.offset(pos["line"], pos["character"], enc) == offset


def test_clamping_and_errors():
    text = "ab😀c\né\n"
    index = LineIndex(text)
    assert index.offset(0, 99) == 4  # past the line's end: the line's end, before the break
    assert index.offset(1, 99, "utf-8") == 6
    assert index.offset(7, 0) == len(text)  # past the last line: the end of the text
    assert index.offset(0, 4, "utf-16") == 3 and index.offset(0, 6, "utf-8") == 3 and index.offset(0, 3, "utf-32") == 3
    with pytest.raises(ValueError, match="inside the surrogate pair of '😀'"):
        index.offset(0, 3, "utf-16")
    for ch in (3, 4, 5):
        with pytest.raises(ValueError, match="inside the utf-8 byte sequence of '😀'"):
            index.offset(0, ch, "utf-8")
    with pytest.raises(ValueError, match="inside the utf-8 byte sequence of 'é'"):
        index.offset(1, 1, "utf-8")
    with pytest.raises(ValueError, match="past the end of the document"):
        index.offset(7, 0, clamp_lines=False)
    with pytest.raises(ValueError, match="line must be >= 0"):
        index.offset(-1, 0)
    with pytest.raises(TypeError, match="character must be an int"):
        index.offset(0, "1")
    bad = [({"range": {"start": {"line": 0, "character": 2}, "end": {"line": 0, "character": 1}}, "text": ""},
            ValueError, "before its start"),
           ({"range": {"start": {"line": 0}, "end": {"line": 0, "character": 1}}, "text": ""}, ValueError,
            "needs 'line'"),
           ({"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 1}}}, TypeError,
            "'text' must"),
           ({"text": "x\ud800"}, ValueError, "lone surrogate"),
           ("not a change", TypeError, "must be an object")]
    for change, exc, match in bad:
        with pytest.raises(exc, match=match):
            apply_content_changes(text, [{"text": text}, change])
    with pytest.raises(ValueError, match="unknown position encoding"):
        apply_content_changes(text, [], "utf-7")


# ------------------------------------------------------------- apply_changes
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ENCODINGS), st.data())
def test_apply_changes_is_one_exact_update(encoding, data):
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    doc.position_encoding = encoding
    calls = []
    engine_apply = doc.doc.apply_edits
    doc.doc.apply_edits = lambda edits: calls.append(1) or engine_apply(edits)
    for version in range(1, 4):
        expected, changes = doc.text, []
        for _ in range(data.draw(st.integers(1, 3))):
            if data.draw(st.integers(0, 9)) == 0:
                new = data.draw(st.lists(CHARS, max_size=20).map("".join))
                changes.append({"text": new})
                expected = new
                continue
            s = data.draw(st.integers(0, len(expected)))
            e = data.draw(st.integers(s, min(len(expected), s + 8)))
            if expected[s - 1:s + 1] == "\r\n" or expected[e - 1:e + 1] == "\r\n":
                continue
            new = data.draw(st.lists(CHARS, max_size=4).map("".join))
            changes.append({"range": {"start": lsp_position(expected, s, encoding),
                                      "end": lsp_position(expected, e, encoding)}, "text": new})
            expected = expected[:s] + new + expected[e:]
        doc.apply_changes(changes, version)
        assert (doc.text, doc.version, len(calls)) == (expected, version, version)
        assert doc.doc.token_ids == TOKENIZER.encode(expected)
        assert_matches_dense(doc.doc)


def test_failed_changes_leave_everything_unchanged():
    doc = TextDocument(MODEL, TOKENIZER, BASE, DocumentOptions(max_tokens=160))
    doc.apply_changes([{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 4}},
                        "text": "Tea"}], 5)
    before = full_state(doc)
    good = {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}
    inside_pair = {"range": {"start": {"line": 1, "character": 15}, "end": {"line": 1, "character": 15}}, "text": "y"}
    assert doc.text.splitlines()[1][14] == "😀"
    cases = [([good], 5, ValueError, "stale version 5: the document is at version 5"),
             ([good], 4, ValueError, "stale version"),
             ([good], "6", TypeError, "version must be an int"),
             ([good, inside_pair], 6, ValueError, "content change 1: position 1:15 is inside the surrogate pair"),
             ([good, {"text": "word " * 400}], 6, ValueError, "exceeds max_tokens=160"),
             ({"text": "x"}, 6, TypeError, "must be a list")]
    for changes, version, exc, match in cases:
        with pytest.raises(exc, match=match):
            doc.apply_changes(changes, version)
        assert_same_state(before, full_state(doc))
    doc.apply_changes([good], 6)  # a later good change still applies
    assert doc.text == "x" + before[0] and doc.version == 6


def test_lines_and_characters_past_the_end_clamp():
    doc = TextDocument(MODEL, TOKENIZER, "one\ntwo")
    doc.apply_changes([{"range": {"start": {"line": 0, "character": 50}, "end": {"line": 0, "character": 60}},
                        "text": "!"},
                       {"range": {"start": {"line": 9, "character": 0}, "end": {"line": 12, "character": 3}},
                        "text": " end"}], 1)
    assert doc.text == "one!\ntwo end"
    assert_matches_dense(doc.doc)


# ---------------------------------------------------------------- edit_bytes
def test_edit_bytes_matches_code_point_edits():
    doc, ref = TextDocument(MODEL, TOKENIZER, BASE), TextDocument(MODEL, TOKENIZER, BASE)
    data = BASE.encode()
    i = data.index("東".encode())
    doc.edit_bytes(i, i + 6, i + 5, "Tokyo")  # "東京" (6 bytes) -> "Tokyo"
    j = BASE.index("東")
    ref.edit(j, j + 2, "Tokyo")
    k = doc.text.encode().index("😀".encode())
    doc.edit_bytes(k, k + 4, k + 8, "🦀🦀".encode())
    ref.edit(ref.text.index("😀"), ref.text.index("😀") + 1, "🦀🦀")
    assert doc.text == ref.text
    assert_same_state(full_state(doc), full_state(ref))
    assert_matches_dense(doc.doc)
    before = full_state(doc)
    for args, match in [((k + 1, k + 4, k + 1, ""), "start_byte .* inside a UTF-8 multi-byte sequence"),
                        ((0, 10_000, 0, ""), "past the end of the text"),
                        ((5, 3, 5, ""), "before start_byte"),
                        ((0, 0, 3, "é"), r"new_end_byte 3 should be start_byte \+ 2"),
                        ((0, 0, 1, b"\xff"), "not valid UTF-8")]:
        with pytest.raises(ValueError, match=match):
            doc.edit_bytes(*args)
        assert_same_state(before, full_state(doc))


# ------------------------------------------------------------ changed_ranges
def changed_tokens(old_ids, old_hidden: torch.Tensor, new_ids, new_hidden: torch.Tensor) -> list[int]:
    """The definition, in O(n): indices of new tokens whose final hidden state differs from the one they
    had before (inserted tokens always count), kept tokens matched with ``token_diff`` as the engine does."""
    changed = torch.ones(len(new_ids), dtype=torch.bool)
    old_i = new_i = 0
    for s, e, rep in token_diff(old_ids, new_ids) + [(len(old_ids), len(old_ids), [])]:
        k = s - old_i  # kept tokens old[old_i:s] are new[new_i:new_i + k]
        changed[new_i:new_i + k] = (new_hidden[new_i:new_i + k] != old_hidden[old_i:s]).any(-1)
        old_i, new_i = e, new_i + k + len(rep)
    return changed.nonzero().flatten().tolist()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_engine_reports_exactly_the_tokens_whose_outputs_changed(backend):
    """``EditStats.hidden_changed`` (O(edit): what the final norm rewrote and found different) against the
    O(n) definition, over random text edits, float32 included."""
    rng = random.Random(4)
    for model in (MODEL, tiny_model(dtype=torch.float32, vocab_size=TOKENIZER.vocab_size, window=16.0)):
        doc = TextDocument(model, TOKENIZER, BASE, backend=backend)
        for version in range(1, 40):
            old_ids, old_hidden = doc.doc.token_ids, doc.doc.hidden
            s = rng.randrange(len(doc.text) + 1)
            new = doc.text[:s] + rng.choice(["", "x", " tea", "é 😀"]) + doc.text[s + rng.randrange(4):]
            stats = doc.update(new, version)
            assert stats.hidden_changed == changed_tokens(old_ids, old_hidden, doc.doc.token_ids, doc.doc.hidden)


def test_changed_ranges_cover_exactly_the_tokens_whose_outputs_moved():
    text = " ".join(f"word{i}" for i in range(40)) + "\nlast 😀 line"
    doc = TextDocument(MODEL, TOKENIZER, text)
    assert doc.changed_ranges() == []
    before = doc.doc.hidden
    cut = text.index("word20")
    doc.apply_changes([{"range": {"start": {"line": 0, "character": cut}, "end": {"line": 0, "character": cut + 6}},
                        "text": "WORD"}], 1)
    ranges = doc.changed_ranges()
    assert ranges and ranges[0].start >= cut - 1  # causal: nothing before the edit (and its leading space) moved
    index = LineIndex(doc.text)
    for r in ranges:
        assert r.range == index.lsp_range(r.start, r.end)
    grown = len(doc.doc) - len(before)
    for i, ((s, e), h) in enumerate(zip(doc.token_offsets, doc.doc.hidden)):
        if not any(r.start <= s and e <= r.end for r in ranges):  # outside: a kept token, output bitwise unchanged
            assert e <= cut or s >= cut + 4, "a new token must lie inside a changed range"
            assert torch.equal(before[i if e <= cut else i - grown], h)
    assert ranges[-1].end < len(doc.text), "the sliding window should stop the change before the end"
    doc.edit(0, 1, "W")
    with pytest.raises(ValueError, match="last update was made by another method"):
        doc.changed_ranges()


# ------------------------------------------------------ snapshots and states
def edit_script(doc: TextDocument, start_version: int) -> None:
    """Edits that insert, delete, grow the slot table and renumber positions."""
    doc.apply_changes([{"range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 6}},
                        "text": "大阪 and 😀😀"}], start_version)
    doc.edit_bytes(0, 5, 3, "Tea")
    doc.update(doc.text + " Another sentence, appended at the end." * 3, start_version + 1)
    doc.apply_changes([{"range": {"start": {"line": 0, "character": 2}, "end": {"line": 2, "character": 1}},
                        "text": ""}], start_version + 2)


def test_snapshot_restore_continues_exactly():
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    doc.update(BASE + " More.", 1)
    snap = doc.snapshot()
    ranges = doc.changed_ranges()
    edit_script(doc, 2)
    after_script = full_state(doc)
    doc.restore(snap)
    assert doc.version == 1 and doc.changed_ranges() == ranges
    twin = TextDocument(MODEL, TOKENIZER, "unrelated")
    twin.restore(snap)
    edit_script(doc, 2)
    edit_script(twin, 2)
    assert_same_state(after_script, full_state(doc))
    assert_same_state(after_script, full_state(twin))
    assert_matches_dense(twin.doc)
    other = TextDocument(OTHER_MODEL, TOKENIZER, BASE)
    before = full_state(other)
    with pytest.raises(ValueError, match="computed with another model"):
        other.restore(snap)
    assert_same_state(before, full_state(other))


def test_saved_state_continues_exactly(tmp_path):
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    doc.position_encoding = "utf-32"  # edit_script's positions are the same in UTF-16 and UTF-32
    edit_script(doc, 1)
    path = tmp_path / "doc.vqts"
    doc.save_state(path)
    loaded = TextDocument.load_state(path, MODEL, TOKENIZER)
    assert (loaded.version, loaded.position_encoding) == (doc.version, "utf-32")
    assert loaded.token_offsets == doc.token_offsets
    assert loaded.changed_ranges() == doc.changed_ranges()
    assert torch.equal(loaded.last_stats.recomputed, doc.last_stats.recomputed)
    assert loaded.doc.cache.free == doc.doc.cache.free and torch.equal(loaded.doc.cache.order, doc.doc.cache.order)
    assert_same_state(full_state(doc), full_state(loaded))
    for d in (doc, loaded):
        edit_script(d, 10)
    assert_same_state(full_state(doc), full_state(loaded))
    assert_matches_dense(loaded.doc)


def test_failed_saves_leave_nothing_and_name_the_path(tmp_path):
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    folder = tmp_path / "states"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"it is a folder: give a file name: '{folder}'"):
        doc.save_state(folder)
    missing = tmp_path / "nowhere" / "doc.vqts"
    with pytest.raises(FileNotFoundError, match=f"the folder {missing.parent} does not exist: '{missing}'"):
        doc.save_state(missing)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["states"]


def rewrite_header(path, **changes):
    data = path.read_bytes()
    nl = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC):nl])
    header.update(changes)
    path.write_bytes(MAGIC + json.dumps(header).encode() + data[nl:])


def test_bad_states_are_refused(tmp_path):
    doc = TextDocument(MODEL, TOKENIZER, BASE)
    path = tmp_path / "doc.vqts"
    doc.save_state(path)
    good = path.read_bytes()

    def refused(match, model=MODEL, tokenizer=TOKENIZER):
        with pytest.raises(ValueError, match=match):
            TextDocument.load_state(path, model, tokenizer)
        path.write_bytes(good)

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    refused("corrupted: its SHA-256 checksum does not match")
    path.write_bytes(good[:len(good) // 2])
    refused("corrupted: its SHA-256")
    path.write_bytes(b"PK\x03\x04" + good)
    refused("is not a VQT document state")
    path.write_bytes(good.replace(b'"text":"Caf', b'"text":"Kaf'))
    refused("corrupted: its SHA-256")
    path.write_bytes(good[:len(MAGIC) + 5])
    refused("corrupted: its header is not")
    rewrite_header(path, format_version=FORMAT_VERSION + 1)
    refused(f"state format version {FORMAT_VERSION + 1}; this version of vqt reads version {FORMAT_VERSION}")
    refused("saved with another model", model=OTHER_MODEL)
    refused("saved with another model", model=copy.deepcopy(MODEL).float())
    other_tok = Tokenizer(HFTokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    refused("saved with another tokenizer", tokenizer=other_tok)
    changed = copy.deepcopy(MODEL)
    with torch.no_grad():
        changed.blocks[0].wq.weight[0, 0] += 1e-3
    refused("saved with another model", model=changed)
    assert TextDocument.load_state(path, MODEL, TOKENIZER).text == BASE
