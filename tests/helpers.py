"""Shared test utilities: tiny random models and the dense-forward oracle check."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from vqt import Document, VQTConfig, VQTModel
from vqt.ops.search import nearest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, calibrate: bool = True, **overrides) -> VQTModel:
    """A random tiny model whose codebooks are k-means fits to its own activations, so codes vary."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, codebook_size=16, max_len=96)
    kw.update(overrides)
    model = VQTModel(VQTConfig(**kw)).to(dtype).eval()
    if model.config.sink != "none":  # a sink that matters: sizeable logits, keys and values
        with torch.no_grad():
            for b in model.blocks:
                b.sink_logit.normal_(0.0, 1.5)
                if model.config.sink == "token":
                    b.sink_k.normal_(0.0, 1.0)
                    b.sink_v.normal_(0.0, 1.0)
    if calibrate and model.config.quantize:
        rng = random.Random(seed)
        model.calibrate_codebooks([rng.randrange(kw["vocab_size"]) for _ in range(256)], iters=5)
    return model


def assert_matches_dense(doc: Document, atol: float = 1e-9) -> None:
    """Codes identical and hidden states allclose to a dense forward on the same tokens and positions."""
    out = doc.model.forward_dense(doc.token_ids, doc.positions)
    if doc.model.config.quantize:
        assert torch.equal(out.codes, doc.codes), f"{int((out.codes != doc.codes).sum())} codes differ from the dense forward"
    torch.testing.assert_close(doc.hidden, out.hidden, atol=atol, rtol=0)
    torch.testing.assert_close(doc.pooled, out.hidden.mean(0) if len(doc) else torch.zeros_like(doc.pooled),
                               atol=atol * 10, rtol=0)


def dense_surprisal(model: VQTModel, tokens: list[int], positions) -> np.ndarray:
    """Bits of every token (-log2 p given the tokens before it; token 0: NaN) from a dense forward of
    ``tokens`` at ``positions``."""
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(model.forward_dense(tokens, positions).hidden).double(), -1)
    bits = (logp[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0] / -math.log(2)).numpy()
    return np.concatenate([[np.nan], bits])


def assert_codes_certified(doc: Document) -> None:
    """Every stored code equals a brute-force search on the engine's own current attention outputs, and
    every stored radius still certifies its code around that output: no point within the radius can be
    nearer another codeword (radius <= (d2 - d1) / 2, computed here in float64)."""
    st = doc.state_dict()
    cfg = doc.model.config
    for li, block in enumerate(doc.model.blocks):
        if block.quantizer is None:
            continue
        U, Z = st[f"layer{li}.U"], st[f"layer{li}.Z"]
        a = (U / Z.unsqueeze(-1)).reshape(len(doc), cfg.n_groups, cfg.group_dim)
        codes = st[f"layer{li}.codes"]
        brute = nearest(a, block.quantizer.codebook).codes
        assert torch.equal(brute, codes), f"layer {li}: a skipped code is stale"
        dist = (a.double().unsqueeze(2) - block.quantizer.codebook.double()).pow(2).sum(-1).sqrt()  # (n, G, K)
        d1 = dist.gather(2, codes.unsqueeze(2)).squeeze(2)
        d2 = dist.scatter(2, codes.unsqueeze(2), float("inf")).amin(2)
        radius = st[f"layer{li}.radius"].double()
        assert bool((radius <= (d2 - d1) / 2).all()), f"layer {li}: a radius certifies more than its code's cell"
