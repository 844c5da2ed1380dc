"""Training: the loss goes down, the VQ and consistency phases run, and resuming is exact."""

from __future__ import annotations

import csv
import random

import numpy as np
import torch

from vqt import VQTConfig, VQTModel
from vqt.apps.demo import demo_revisions
from vqt.text.tokenizer import Tokenizer
from vqt.training.train import TrainConfig, consistency_loss, edited_copies, sample_batch, train

TOK = Tokenizer.default()
TOKENS = np.asarray([t for _, text in demo_revisions() for t in TOK.encode(text) + [0]] * 4, dtype=np.uint16)
CFG = dict(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, window=16.0, granularity="layer",
           codebook_size=16)


def tcfg(out, **kw):
    base = dict(out_dir=str(out), steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup=2, vq_start=4,
                consistency_start=8, eval_every=6, ckpt_every=6, eval_tokens=256)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_through_all_phases(tmp_path):
    train(VQTConfig(**CFG), tcfg(tmp_path, steps=40, vq_start=10, consistency_start=25), TOKENS, TOKENS,
          progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    lm = [float(r["lm_loss"]) for r in rows]
    assert len(rows) == 40
    assert np.mean(lm[-5:]) < np.mean(lm[:5]) - 1.0
    assert float(rows[-1]["vq_loss"]) > 0 and float(rows[-1]["consistency"]) > 0
    model = VQTModel.from_pretrained(tmp_path / "model")
    assert model.config == VQTConfig(**CFG) and not model.training


def test_resume_is_exact(tmp_path):
    a = train(VQTConfig(**CFG), tcfg(tmp_path / "a"), TOKENS, TOKENS, progress=False)
    partial = train(VQTConfig(**CFG), tcfg(tmp_path / "b", stop_after=7), TOKENS, TOKENS, progress=False)
    assert not (tmp_path / "b" / "model").exists()  # stopped early: only the checkpoint
    b = train(VQTConfig(**CFG), tcfg(tmp_path / "b"), TOKENS, TOKENS, progress=False)
    assert partial is not b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert len(list(csv.DictReader(open(tmp_path / "b" / "log.csv")))) == 12


def test_dense_twin_trains_with_the_same_recipe(tmp_path):
    twin = train(VQTConfig(**CFG, quantize=False), tcfg(tmp_path), TOKENS, TOKENS, progress=False)
    assert all(b.quantizer is None for b in twin.blocks)


def test_edited_copies_align_unedited_tokens():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 100, (6, 40), generator=gen)
    pos = torch.cumsum(torch.rand(6, 40, generator=gen, dtype=torch.float64) + 0.5, 1)
    tok2, pos2, pairs = edited_copies(tokens, pos, 4, random.Random(0))
    for b, (src, dst) in enumerate(pairs):
        assert torch.equal(tokens[b, src], tok2[b, dst]) and torch.equal(pos[b, src], pos2[b, dst])
        assert bool((pos2[b, 1:] > pos2[b, :-1]).all())
    attn = [torch.randn(12, 40, 8)]
    same = [torch.cat([attn[0][:6], attn[0][:6]])]
    assert float(consistency_loss(attn, 6, pairs)) > 0
    ident = [(s, s) for s, _ in pairs]
    assert float(consistency_loss(same, 6, ident)) == 0.0


def test_fold_accuracies_separate_signal_from_noise():
    """The classification protocol: a learnable label is found, a random one is not, and two
    feature sets get identical splits (so their per-fold difference is paired)."""
    from vqt.training.classify import fold_accuracies

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    signal = (x[:, 0] + 0.3 * x[:, 1] > 0).long().tolist()
    noise = torch.randint(0, 2, (200,), generator=g).tolist()
    good = fold_accuracies(x, signal, folds=5, repeats=2)
    assert len(good) == 10 and min(good) > 0.85
    assert abs(sum(fold_accuracies(x, noise, folds=5, repeats=2)) / 10 - 0.5) < 0.1
    assert fold_accuracies(x, signal, folds=5, repeats=2) == good  # deterministic, same splits


def test_position_edits_squeeze_runs_and_open_gaps_but_keep_order():
    t = TrainConfig(batch_size=64, seq_len=128, position_edits=1.0)
    tokens = np.arange(10_000) % 97
    _, pos = sample_batch(tokens, t, torch.Generator().manual_seed(0))
    gaps = pos[:, 1:] - pos[:, :-1]
    assert bool((gaps > 0).all()), "positions must stay strictly increasing"
    assert float(gaps.min()) < 1 / 64 and float(gaps.max()) > 4, "squeezed runs and wide gaps must both occur"
    plain = sample_batch(tokens, TrainConfig(batch_size=64, seq_len=128), torch.Generator().manual_seed(0))[1]
    plain_gaps = plain[:, 1:] - plain[:, :-1]
    assert float(plain_gaps.min()) >= 0.75 - 1e-9 and float(plain_gaps.max()) <= 1.25 + 1e-9
