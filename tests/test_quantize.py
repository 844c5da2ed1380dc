"""The quantizer seam (vqt/modeling/quantize.py): plain VQ and quantize-then-correct (QTC)."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import tiny_model
from vqt import Document, VQTConfig, VQTModel
from vqt.engine.macs import dense_macs
from vqt.modeling.quantize import CorrectedQuantizer, VectorQuantizer, fit_qtc
from vqt.ops.search import nearest


def activations(model: VQTModel, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (attention outputs (n, G, gd), normed inputs (n, d)) in a dense pass of ``model``."""
    seen = []
    pos = torch.arange(len(tokens), dtype=torch.float64)
    model._dense(torch.tensor(tokens), pos, None, 0,
                 before_quantize=lambda block, a, x: seen.append((a.clone(), block.attn_norm(x).detach())))
    return seen


def test_quantizer_kinds_and_a_clear_error():
    assert type(tiny_model(calibrate=False).blocks[0].quantizer) is VectorQuantizer
    assert type(tiny_model(calibrate=False, quantizer="qtc").blocks[0].quantizer) is CorrectedQuantizer
    with pytest.raises(ValueError, match="unknown quantizer 'pq'"):
        VQTConfig(quantizer="pq")


@torch.no_grad()
def test_closed_form_correction_beats_plain_codewords_on_the_calibration_data():
    """On the activations it was fitted to, E_out[c] + C h is nearer the attention output than the plain
    codeword E[c] of the same code (same search, same codes): each alternation step can only lower the
    squared error it starts from (E_out = E, C = 0), and on a random model the gain is modest."""
    model = tiny_model(quantizer="qtc", granularity="layer", codebook_size=8, calibrate=False)
    rng = random.Random(1)
    tokens = [rng.randrange(61) for _ in range(512)]
    model.calibrate_codebooks(tokens, iters=5)
    for block, (a, h) in zip(model.blocks, activations(model, tokens)):
        q = block.quantizer
        codes = nearest(a, q.codebook).codes
        plain = (a - q.decode(codes)).pow(2).sum()
        corrected = (a - q.output(codes, h)).pow(2).sum()
        assert float(corrected) < 0.97 * float(plain), (block.layer_idx, float(corrected), float(plain))


def test_fit_qtc_recovers_a_planted_correction():
    """Data made as E_out[c] + C h + b exactly: the fit (no ridge) returns that map and those codewords."""
    g = torch.Generator().manual_seed(0)
    N, d, G, gd, K = 2000, 6, 2, 3, 4
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    C = torch.randn(G * gd, d, generator=g, dtype=torch.float64)
    E_out = torch.randn(G, K, gd, generator=g, dtype=torch.float64)
    codes = torch.randint(0, K, (N, G), generator=g)
    a = E_out[torch.arange(G), codes] + (h @ C.T).view(N, G, gd)
    search = torch.randn(G, K, gd, generator=g, dtype=torch.float64)  # the fit does not need the search to agree
    out, corr = fit_qtc(a, h, codes, search, rounds=30, ridge=0.0)
    fitted = out[torch.arange(G), codes] + (h @ corr.T).view(N, G, gd)
    torch.testing.assert_close(fitted, a, atol=1e-8, rtol=0)


def test_fit_qtc_at_a_rank_recovers_a_planted_low_rank_correction():
    g = torch.Generator().manual_seed(1)
    N, d, G, gd, K, r = 3000, 8, 1, 8, 4, 2
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    C = torch.randn(G * gd, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)
    E_out = torch.randn(G, K, gd, generator=g, dtype=torch.float64)
    codes = torch.randint(0, K, (N, G), generator=g)
    a = E_out[torch.arange(G), codes] + (h @ C.T).view(N, G, gd)
    out, left, right = fit_qtc(a, h, codes, torch.randn(G, K, gd, generator=g, dtype=torch.float64), rounds=30,
                               ridge=0.0, rank=r)
    assert left.shape == (G * gd, r) and right.shape == (r, d)
    fitted = out[torch.arange(G), codes] + (h @ (left @ right).T).view(N, G, gd)
    torch.testing.assert_close(fitted, a, atol=1e-8, rtol=0)
    # one rank too few cannot reproduce it
    out1, l1, r1 = fit_qtc(a, h, codes, out, rounds=30, ridge=0.0, rank=r - 1)
    assert float((out1[torch.arange(G), codes] + (h @ (l1 @ r1).T).view(N, G, gd) - a).abs().max()) > 1e-2


def test_batched_training_forward_equals_the_dense_oracle():
    model = tiny_model(quantizer="qtc", sink="token", window=6.0)
    rng = random.Random(2)
    tokens = [rng.randrange(61) for _ in range(40)]
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    dense = model.forward_dense(tokens)
    assert torch.equal(torch.stack(out["codes"])[:, 0], dense.codes)
    torch.testing.assert_close(out["hidden"][0], dense.hidden, atol=1e-9, rtol=0)


def test_correction_reaches_the_output_and_its_gradient_trains():
    """The correction is not dead weight: zeroing it changes the dense output, and a loss on the
    training path puts gradient on the output codebook and the correction."""
    model = tiny_model(quantizer="qtc")
    tokens = list(range(30))
    before = model.forward_dense(tokens).hidden
    with torch.no_grad():
        model.blocks[1].quantizer.correction_weight.zero_()
    assert not torch.allclose(model.forward_dense(tokens).hidden, before)
    model.train()
    model(torch.tensor([tokens]))["hidden"].pow(2).sum().backward()
    q = model.blocks[0].quantizer
    assert q.out_codebook.grad.abs().sum() > 0 and q.correction_weight.grad.abs().sum() > 0


def test_macs_charge_the_correction_per_row_and_quantized_layer():
    pos = torch.arange(50, dtype=torch.float64)
    kw = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, quantize_layers=[0, 2])
    vq, qtc = VQTConfig(**kw), VQTConfig(quantizer="qtc", **kw)
    assert dense_macs(qtc, pos) - dense_macs(vq, pos) == 50 * 2 * 32 * 32


def test_qtc_checkpoint_round_trip_keeps_codes_and_outputs(tmp_path):
    model = tiny_model(quantizer="qtc", window=6.0)
    model.save_pretrained(tmp_path / "m")
    loaded = VQTModel.from_pretrained(tmp_path / "m").double()
    assert loaded.config.quantizer == "qtc"
    tokens = list(range(5, 40))
    doc = Document(loaded, tokens)
    doc.replace(3, 4, [7, 8])
    want = model.forward_dense(doc.token_ids, doc.positions)
    assert torch.equal(doc.codes, want.codes)
    torch.testing.assert_close(doc.hidden, want.hidden, atol=1e-9, rtol=0)


@torch.no_grad()
def test_calibrating_toward_full_attention_makes_up_for_part_of_the_window():
    """Fitted to the full-attention outputs of the same inputs (target_window=None), the corrected outputs
    of a windowed model's first layer are nearer those outputs than when fitted to its own windowed ones."""
    rng = random.Random(3)
    tokens = [rng.randrange(61) for _ in range(400)]
    errors = {}
    for target in ("own", None):
        model = tiny_model(quantizer="qtc", window=4.0, granularity="layer", codebook_size=8, calibrate=False)
        model.calibrate_codebooks(tokens, iters=5, target_window=target)
        block = model.blocks[0]
        a, h = activations(model, tokens)[0]
        pos = torch.arange(len(tokens), dtype=torch.float64)
        x = model.embed(torch.tensor(tokens))
        full = model._unwindowed_outputs(block, x, pos, None)
        codes = nearest(a, block.quantizer.codebook).codes
        errors[target] = float((full - block.quantizer.output(codes, h)).pow(2).sum())
    assert errors[None] < 0.9 * errors["own"], errors


def test_ema_update_and_dead_code_restart_take_bfloat16_outputs():
    """Under bf16 autocast the attention outputs are bfloat16: the EMA update and a dead-code restart keep
    the codebook in its own dtype (a distillation run once died on it)."""
    q = VectorQuantizer(VQTConfig(d_model=8, n_heads=2, granularity="layer", codebook_size=16, dead_code_threshold=2.0))
    q.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(torch.randn(32, 1, 8).to(torch.bfloat16))
    assert q.codebook.dtype == torch.float32 and bool(torch.isfinite(q.codebook).all())
