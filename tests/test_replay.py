"""Replaying real and built-in histories; stability metrics agree with brute-force recounts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA, tiny_model
from vqt.histories.formats import iter_history
from vqt.apps.demo import demo_history
from vqt.histories.replay import replay, summarize
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


def test_replay_real_history_is_exact_and_windowed():
    needs_data()
    model = tiny_model(vocab_size=TOK.vocab_size, max_len=256, window=24.0, granularity="layer", codebook_size=64)
    revs = iter_history(API / "nintendo_switch.json.xz")
    records = list(replay(model, revs, TOK, window_tokens=128, max_edits=25, verify=True))
    assert 10 <= len(records) <= 25  # only edits that touch the first 128 tokens count
    assert all(r.exact for r in records)
    assert all(r.n_tokens <= 256 for r in records)
    s = summarize(records)
    assert s["MAC ratio vs dense"]["median"] >= 1.0 and "wall speedup vs prefix" in s


def test_layer1_flip_count_matches_brute_force():
    """The engine's layer-1 code-flip count equals a recount from two dense forwards."""
    model = tiny_model(vocab_size=TOK.vocab_size, max_len=256, window=12.0, codebook_size=8)
    text = demo_history()[0]["text"][:400]
    edited = text[:100] + "XYZ" + text[104:]
    revs = [dict(demo_history()[0], text=text, rev_id=0), dict(demo_history()[0], text=edited, rev_id=1)]
    (rec,) = list(replay(model, revs, TOK, window_tokens=256, baselines=False))
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
    ({"window_tokens": 0}, "window_tokens must be a positive integer, got 0"),
    ({"window_tokens": -5}, "window_tokens must be a positive integer, got -5"),
    ({"max_edits": 0}, "max_edits must be a positive integer, got 0"),
    ({"max_edits": -1}, "max_edits must be a positive integer, got -1"),
])
def test_replay_refuses_nonsense_windows_and_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(replay(tiny_model(vocab_size=TOK.vocab_size), demo_history(), TOK, **kwargs))
