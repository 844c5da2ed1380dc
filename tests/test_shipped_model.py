"""The model shipped in data/ loads, is small, and reproduces the perplexity recorded when it was shipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA
from vqt import Document
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import DATA_DIR, Tokenizer

SHIPPED = DATA_DIR / "vqt-small"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_shipped_model_is_small_and_loads():
    size = sum(f.stat().st_size for f in SHIPPED.iterdir()) + (DATA_DIR / "tokenizer.json").stat().st_size
    assert size <= 20 * 2**20, f"shipped model and tokenizer take {size / 2**20:.1f} MB"
    model = VQTModel.from_pretrained(SHIPPED, dtype=torch.float32)
    assert model.config.quantize and model.config.vocab_size == Tokenizer.default().vocab_size
    assert "command" in model.config.extra, "the training command must travel with the model"


def test_shipped_model_reproduces_recorded_perplexity():
    if not (SHARED_DATA / "wiki" / "api").is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    from ship import shipped_perplexity

    model = VQTModel.from_pretrained(SHIPPED, dtype=torch.float32)
    assert shipped_perplexity(model) == pytest.approx(model.config.extra["heldout_ppl_fp16_512"], rel=1e-3)


def test_shipped_model_edits_stay_exact_in_float64():
    model = VQTModel.from_pretrained(SHIPPED, dtype=torch.float64)
    tok = Tokenizer.default()
    ids = tok.encode("Anarchism is a political philosophy and movement that is skeptical of authority. " * 6)
    doc = Document(model, ids)
    for s, e, new in ((5, 6, tok.encode(" social")), (30, 30, tok.encode(" and more")), (0, 2, [])):
        st = doc.replace(s, e, new)
        out = model.forward_dense(doc.token_ids, doc.positions)
        assert torch.equal(out.codes, doc.codes)
        torch.testing.assert_close(doc.hidden, out.hidden, atol=1e-9, rtol=0)
        assert st.macs < st.dense_macs
