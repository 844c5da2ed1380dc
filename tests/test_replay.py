"""Replaying real and built-in histories; stability metrics agree with brute-force recounts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA, tiny_model
from vqt.engine.options import DocumentOptions
from vqt.histories.edits import revision_edits
from vqt.histories.formats import iter_history
from vqt.apps.demo import demo_history
from vqt.histories.replay import MAX_EDIT_CHARS, ReplayStats, replay, summarize
from vqt.text.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from stability import stability_report  # noqa: E402  (an experiment helper)

TOK = Tokenizer.default()
API = SHARED_DATA / "wiki" / "api"


def needs_data():
    if not API.is_dir():
        pytest.skip(f"shared data folder {API} is absent (see shared/data/README.md)")


def test_vqt_replay_default_runs_verified(tmp_path):
    out = tmp_path / "edits.jsonl"
    res = subprocess.run([sys.executable, "-m", "vqt", "replay", "--verify", "--dtype", "float64", "--quiet",
                          "--jsonl", str(out), "--plot", str(tmp_path / "plots")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "every edit matched the dense forward" in res.stdout and "MAC ratio vs dense" in res.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(demo_history()) - 1  # one atomic edit per scripted revision
    assert all(r["exact"] and r["dense_seconds"] > 0 and r["macs"] <= r["dense_macs"] for r in records)
    assert (tmp_path / "plots" / "ratio_cdf.png").stat().st_size > 1000


def test_vqt_replay_from_a_late_revision_replays_only_the_rest(tmp_path):
    """--start-revision N: revision N is the first document (computed densely), its later edits are replayed
    and verified; with corpus options it is refused in one line."""
    runs = {}
    for start in (0, 3):
        out = tmp_path / f"from{start}.jsonl"
        res = subprocess.run([sys.executable, "-m", "vqt", "replay", "--verify", "--dtype", "float64", "--quiet",
                              "--no-baselines", "--start-revision", str(start), "--jsonl", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        runs[start] = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(r["exact"] for r in runs[start])
    assert "from revision 3" in res.stdout
    assert len(runs[3]) == len(runs[0]) - 3 and runs[3][0]["n_tokens"] == runs[0][3]["n_tokens"]
    res = subprocess.run([sys.executable, "-m", "vqt", "replay", "--start-revision", "2", "--workers", "2",
                          "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "--start-revision 2 replays one history" in res.stderr


def test_vqt_replay_with_bf16_products_is_verified_against_the_dense_forward_multiplying_in_bf16(tmp_path):
    """--dtype bf16: float32 activations, bfloat16 weights in every product, for the replayed document and its
    dense oracle alike (the float32 contract); --dtype auto is not a replay choice (it would change numbers
    by machine)."""
    out = tmp_path / "bf16.jsonl"
    res = subprocess.run([sys.executable, "-m", "vqt", "replay", "--verify", "--dtype", "bf16", "--quiet",
                          "--no-baselines", "--jsonl", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "(bfloat16 products)" in res.stdout and "every edit matched the dense forward" in res.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(demo_history()) - 1 and all(r["exact"] for r in records)
    res = subprocess.run([sys.executable, "-m", "vqt", "replay", "--dtype", "auto"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "invalid choice: 'auto'" in res.stderr


def windowed_model(**overrides):
    kw = dict(vocab_size=TOK.vocab_size, max_len=256, window=24.0, granularity="layer", codebook_size=64)
    return tiny_model(**{**kw, **overrides})


def test_replay_real_history_replays_whole_documents_verified():
    """Every atomic edit of every pair is replayed wherever it falls (far past token 1024 too), each one equal to
    the dense forward of the whole document, and the document ends as the last revision's text."""
    needs_data()
    path = API / "nintendo_switch.json.xz"  # 30 revisions of 320 to 1,800 tokens
    model = windowed_model()  # max_len 256: a windowed model has no length cap
    last = {}
    stats = ReplayStats()
    records = list(replay(model, iter_history(path), TOK, verify=True, stats=stats,
                          observe=lambda doc, rec: last.update(text=doc.text)))
    pairs = list(revision_edits(iter_history(path), max_edit_chars=MAX_EDIT_CHARS))
    replayed = [p for p in pairs if not (p.flags.oversize or p.flags.blanking)]
    assert len(records) == sum(len(p.edits) for p in replayed) == stats.edits  # none left out
    assert [(r.rev_id, r.edit_index) for r in records] == [(p.rev_id, i) for p in replayed for i in range(len(p.edits))]
    assert stats.pairs == len(pairs) and stats.rebuilds == 1 + len(pairs) - len(replayed)
    beyond = [r for r in records if r.first_changed >= 1024]
    assert len(beyond) >= 5 and max(r.n_tokens for r in records) > 1700
    assert all(r.exact for r in records), [(r.rev_id, r.edit_index) for r in records if not r.exact]
    assert last["text"] == list(iter_history(path))[-1]["text"]
    # The old behaviour, now asked for by name: edits after the first 1024 tokens are left out.
    prefix = ReplayStats()
    kept = list(replay(model, iter_history(path), TOK, prefix_tokens=1024, baselines=False, stats=prefix))
    assert prefix.outside_prefix > 0 and len(kept) + prefix.outside_prefix == len(records)
    assert max(r.n_tokens for r in kept) < max(r.n_tokens for r in records)


def test_replay_real_history_is_exact_on_a_prefix():
    needs_data()
    revs = iter_history(API / "nintendo_switch.json.xz")
    records = list(replay(windowed_model(), revs, TOK, prefix_tokens=128, max_edits=25, verify=True))
    assert 10 <= len(records) <= 25  # only edits that touch the first 128 tokens count
    assert all(r.exact for r in records)
    s = summarize(records)
    assert s["MAC ratio vs dense"]["median"] >= 1.0 and "wall speedup vs prefix" in s


def test_documents_over_the_memory_guard_are_skipped_counted_and_named():
    needs_data()
    path = API / "nintendo_switch.json.xz"
    reasons: list[str] = []
    stats = ReplayStats()
    records = list(replay(windowed_model(), iter_history(path), TOK, baselines=False, stats=stats,
                          options=DocumentOptions(max_tokens=1000), on_skip=reasons.append))
    assert records and all(r.n_tokens <= 1000 for r in records)
    assert stats.over_guard > 0 and stats.edits == len(records)
    assert reasons and all("exceed the memory guard max_tokens=1000" in r for r in reasons)
    assert "of documents over the memory guard (--max-tokens)" in stats.describe()
    # A full-attention model's guard is its max_len.
    full = list(replay(tiny_model(vocab_size=TOK.vocab_size, max_len=512), iter_history(path), TOK, baselines=False,
                       stats=(capped := ReplayStats())))
    assert capped.over_guard > 0 and full and all(r.n_tokens <= 512 for r in full)


def test_window_tokens_is_the_deprecated_name_of_prefix_tokens():
    model = windowed_model()
    with pytest.warns(DeprecationWarning, match="prefix_tokens"):
        old = list(replay(model, demo_history(), TOK, window_tokens=64, baselines=False))
    new = list(replay(model, demo_history(), TOK, prefix_tokens=64, baselines=False))
    assert [r.macs for r in old] == [r.macs for r in new]
    with pytest.raises(ValueError, match="not both"):
        replay(model, demo_history(), TOK, window_tokens=64, prefix_tokens=64)


def test_layer1_flip_count_matches_brute_force():
    """The engine's layer-1 code-flip count equals a recount from two dense forwards."""
    model = tiny_model(vocab_size=TOK.vocab_size, max_len=256, window=12.0, codebook_size=8)
    text = demo_history()[0]["text"][:400]
    edited = text[:100] + "XYZ" + text[104:]
    revs = [dict(demo_history()[0], text=text, rev_id=0), dict(demo_history()[0], text=edited, rev_id=1)]
    (rec,) = list(replay(model, revs, TOK, baselines=False))
    from vqt.text.document import TextDocument

    doc = TextDocument(model, TOK, text)
    d0 = model.forward_dense(doc.doc.token_ids, doc.doc.positions).codes[0]
    n0 = len(doc.doc)
    doc.edit(100, 104, "XYZ")  # the same edit, to read the stable positions the replay used
    d1 = model.forward_dense(doc.doc.token_ids, doc.doc.positions).codes[0]
    # Unedited positions after the edit: the same tokens, aligned from the end.
    tail = rec.n_tokens - rec.first_changed - rec.inserted_tokens
    flips = int((d0[n0 - tail:] != d1[len(doc.doc) - tail:]).sum())
    assert rec.code_flips_per_layer[0] == flips
    assert rec.layer1_flip_rate == pytest.approx(flips / (tail * model.config.n_groups))


def test_stability_report_on_real_edits():
    needs_data()
    model = tiny_model(vocab_size=TOK.vocab_size, max_len=256, window=16.0, granularity="layer")
    report, records = stability_report(model, iter_history(API / "adam_himebauch.json.xz"), TOK, 128, 10)
    assert report["edits"] == len(records) == 10
    assert report["mac_ratio"]["p10"] <= report["mac_ratio"]["median"] <= report["mac_ratio"]["p90"]
    assert 0 <= report["layer1_flip_rate"] <= 1
    assert len(report["dirty_fraction_per_layer"]) == model.config.n_layers
    assert torch.tensor(report["dirty_fraction_per_layer"]).le(1).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix_tokens": 0}, "prefix_tokens must be a positive integer, got 0"),
    ({"prefix_tokens": -5}, "prefix_tokens must be a positive integer, got -5"),
    ({"prefix_tokens": 2.5}, "prefix_tokens must be a positive integer, got 2.5"),
    ({"max_edit_chars": 0}, "max_edit_chars must be a positive integer, got 0"),
    ({"max_edits": 0}, "max_edits must be a positive integer, got 0"),
    ({"max_edits": -1}, "max_edits must be a positive integer, got -1"),
])
def test_replay_refuses_nonsense_prefixes_and_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(replay(tiny_model(vocab_size=TOK.vocab_size), demo_history(), TOK, **kwargs))
