"""Distillation (vqt/pretrained/adapt.py) on tiny real models: layer-wise matching, the cached top-k KL,
exact resumption across calls."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from vqt.pretrained.adapt import (STAGE1_FILE, STATE_FILE, AdaptConfig, adapt, block_io, fix_codes, layerwise_loss,
                                  merged, topk_kl)

VOCAB = 61


def pair(seed: int = 0):
    """(student, teacher): a full-attention teacher, and a windowed QTC student with the teacher's weights."""
    teacher = tiny_model(quantize=False, seed=seed, calibrate=False)
    student = tiny_model(quantizer="qtc", window=6.0, sink="token", granularity="layer", codebook_size=16,
                         seed=seed, calibrate=False)
    student.load_state_dict(teacher.state_dict(), strict=False)
    rng = random.Random(seed)
    student.calibrate_codebooks([rng.randrange(VOCAB) for _ in range(256)], iters=3)
    return student, teacher


def tokens(n: int = 2000, seed: int = 1) -> np.ndarray:
    rng = random.Random(seed)
    return np.asarray([rng.randrange(VOCAB) for _ in range(n)], dtype=np.int64)


def layer_error(student, teacher, data: np.ndarray) -> float:
    batch = torch.from_numpy(data[:64].reshape(2, 32))
    pos = torch.arange(32, dtype=torch.float64).expand(2, 32)
    with torch.no_grad():
        return layerwise_loss(student, block_io(teacher, batch, pos), pos)[0]


def test_topk_kl_with_every_token_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, VOCAB, generator=g, dtype=torch.float64), torch.randn(3, 5, VOCAB, generator=g,
                                                                                     dtype=torch.float64)
    lt = torch.log_softmax(t, -1)
    top = lt.topk(VOCAB, -1)
    full = F.kl_div(torch.log_softmax(s, -1), lt, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(topk_kl(s, top.indices, top.values), full.float(), atol=1e-5, rtol=1e-5)
    # with fewer tokens it is the KL of the coarser (k + 1)-outcome distributions: smaller, still positive
    few = lt.topk(4, -1)
    assert 0 < float(topk_kl(s, few.indices, few.values)) < float(full)


def test_layerwise_stage_lowers_the_layer_error(tmp_path):
    student, teacher = pair()
    data = tokens()
    before = layer_error(student, teacher, data)
    cfg = AdaptConfig(steps=25, layerwise_steps=25, seq_len=32, batch_size=2, lr=3e-3, train="lora", lora_rank=4,
                      eval_every=0, checkpoint_every=1000)
    factors = adapt(student, teacher, data, cfg, tmp_path, progress=False)
    after = layer_error(merged(student, factors), teacher, data)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("fixed", [False, True])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, fixed):
    """3 steps, stop, 3 more in a new call (layer-wise, then the cached top-k KL, with or without fixed
    codes) end in exactly the state of 6 steps in one call: weights, adapters, optimizer, sampling and the
    teacher cache."""
    data = tokens()
    kw = dict(seq_len=32, batch_size=2, lr=1e-3, kl_lr=5e-4, train="lora", lora_rank=4, eval_every=0,
              layerwise_steps=2, topk=8, checkpoint_every=1000, fix_codes=fixed)
    results = []
    for stops in ([6], [3, 6]):
        student, teacher = pair()
        for steps in stops:
            factors = adapt(student, teacher, data, AdaptConfig(steps=steps, **kw), tmp_path / str(len(stops)),
                            progress=False)
        state = torch.load(tmp_path / str(len(stops)) / "adapt_state.pt", weights_only=False)
        results.append((student.state_dict(), factors, state["teacher_topk"], state["step"]))
        # stage 2 runs on a fresh optimizer at its own rate: its moments count only stage 2's 4 steps
        group = state["opt"]["param_groups"][0]
        assert group["lr"] == 5e-4 and int(state["opt"]["state"][group["params"][0]]["step"]) == 4
    (sd1, f1, cache1, step1), (sd2, f2, cache2, step2) = results
    assert step1 == step2 == 6 and sorted(cache1) == sorted(cache2) and cache1
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    for k in f1:
        assert torch.equal(f1[k], f2[k]), k
    assert any(float(v.abs().sum()) > 0 for k, v in f1.items() if k.endswith("lora_B")), "nothing was trained"


def test_fixed_codes_send_no_gradient_into_the_attention():
    """With fixed codes a quantized block's q/k/v get no gradient (a QTC output does not follow its
    attention output between code changes); with the straight-through estimator they do."""
    student, _ = pair()
    student.train()
    batch = torch.from_numpy(tokens()[:64].reshape(2, 32))
    grads = {}
    for fixed in (True, False):
        student.zero_grad(set_to_none=True)
        for p in student.parameters():
            p.requires_grad_(True)
        fix_codes(student, fixed)
        student(batch)["logits"].logsumexp(-1).sum().backward()
        block = student.blocks[-1]
        grads[fixed] = [float(getattr(block, n).weight.grad.abs().sum()) if getattr(block, n).weight.grad is not None
                        else 0.0 for n in ("wq", "wk", "wv", "w_up")]
    fix_codes(student, False)
    assert grads[True][:3] == [0.0, 0.0, 0.0] and grads[True][3] > 0, grads
    assert min(grads[False]) > 0, grads


def test_fixed_codes_stage_trains_only_what_reads_the_codes(tmp_path):
    """Stage 2 with fix_codes leaves codebooks, q/k/v adapters, attention norms and sinks exactly as stage 1
    left them (kept in its own checkpoint), and trains the output tables, corrections and MLPs."""
    student, teacher = pair()
    cfg = AdaptConfig(steps=5, layerwise_steps=2, fix_codes=True, topk=8, seq_len=32, batch_size=2, lr=1e-3,
                      train="lora", lora_rank=4, eval_every=0, checkpoint_every=1000)
    adapt(student, teacher, tokens(), cfg, tmp_path, progress=False)
    s1, s2 = (torch.load(tmp_path / f, weights_only=False) for f in (STAGE1_FILE, STATE_FILE))
    assert (s1["step"], s2["step"]) == (2, 5)
    frozen = [k for k in s1["model"] if k.endswith(("quantizer.codebook", "attn_norm.weight")) or ".sink_" in k]
    moved = [k for k in s1["model"] if k.endswith(("quantizer.out_codebook", "quantizer.correction_weight"))]
    assert frozen and moved
    for k in frozen:
        assert torch.equal(s1["model"][k], s2["model"][k]), k
    for name in s1["lora"]:
        same = all(torch.equal(s1["lora"][name][f], s2["lora"][name][f]) for f in ("A", "B"))
        assert same == name.endswith((".wq", ".wk", ".wv")), name
    assert all(not torch.equal(s1["model"][k], s2["model"][k]) for k in moved)
