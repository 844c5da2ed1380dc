"""Exactness of the incremental engine against the dense forward (float64, identical codes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_codes_certified, assert_matches_dense, tiny_model
import vqt.ops
from vqt import Document
from vqt.engine.positions import plan_positions

# Every value of every axis appears at least once: RoPE/none, GQA/MHA, the three
# granularities, K from 4 to 256, with and without a window, quantized and dense twin, no sink,
# a token sink and a logit sink (with and without a window), plain VQ and quantize-then-correct.
CONFIGS = {
    "rope-gqa-head-k16": dict(),
    "rope-mha-layer-k256": dict(n_kv_heads=4, granularity="layer", codebook_size=256),
    "none-gqa-product-k4": dict(pos_encoding="none", granularity="product", n_subvectors=2, codebook_size=4),
    "rope-window-head-k8": dict(window=6.0, codebook_size=8),
    "none-window-layer-k64": dict(pos_encoding="none", window=5.0, granularity="layer", codebook_size=64, n_kv_heads=1),
    "rope-mha-product-k32-window": dict(n_kv_heads=4, granularity="product", n_subvectors=4, codebook_size=32, window=9.0),
    "dense-twin-window": dict(quantize=False, window=7.0),
    "rope-sink-token-window-head-k16": dict(sink="token", window=6.0),
    "none-sink-logit-layer-k64": dict(pos_encoding="none", sink="logit", granularity="layer", codebook_size=64),
    "dense-twin-sink-token": dict(quantize=False, sink="token", window=5.0),
    "rope-sink-window-layer-subset": dict(sink="token", window=6.0, granularity="layer", quantize_layers=[1]),
    # quantize-then-correct: a separate output codebook and a correction of each layer's own input
    "qtc-rope-sink-window-layer-k32": dict(quantizer="qtc", sink="token", window=6.0, granularity="layer",
                                           codebook_size=32),
    "qtc-none-gqa-head-subset-rank5": dict(quantizer="qtc", pos_encoding="none", quantize_layers=[0, 2],
                                           correction_rank=5),
}
MODELS = {name: tiny_model(**kw) for name, kw in CONFIGS.items()}
VOCAB = 61
MAX_TOKENS = 60


@st.composite
def edit(draw, n: int):
    """One edit (a list of sorted, non-overlapping spans) valid for a document of n tokens."""
    kind = draw(st.sampled_from(["insert", "delete", "replace", "multi", "whole", "clear"]))
    ids = lambda lo, hi: draw(st.lists(st.integers(0, VOCAB - 1), min_size=lo, max_size=hi))  # noqa: E731
    room = MAX_TOKENS - n
    where = lambda: draw(st.sampled_from([0, n, None])) if n else 0  # noqa: E731

    def point():
        p = where()
        return draw(st.integers(0, n)) if p is None else p

    if kind == "insert" or n == 0:
        return [(point(),) * 2 + (ids(1, min(6, room)),)] if room else [(0, n, [])]
    if kind == "delete":
        s = point()
        return [(min(s, n - 1), min(n, min(s, n - 1) + draw(st.integers(1, 5))), [])]
    if kind == "replace":
        s = min(point(), n - 1)
        e = min(n, s + draw(st.integers(1, 5)))
        return [(s, e, ids(1, min(5, room + e - s)))]
    if kind == "multi":
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=4, max_size=6)))
        spans, budget = [], room
        for s, e in zip(cuts[::2], cuts[1::2]):
            new = ids(0, min(3, budget + e - s))
            budget -= len(new) - (e - s)
            spans.append((s, e, new))
        return spans
    if kind == "whole":
        return [(0, n, ids(0, 20))]
    return [(0, n, [])]


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_edit_sequences_match_dense(name, data):
    model = MODELS[name]
    init = data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=30), label="initial tokens")
    doc = Document(model, init, position_mode=data.draw(st.sampled_from(["stable", "canonical"])))
    assert_matches_dense(doc)
    for _ in range(50):
        spans = data.draw(edit(len(doc)))
        expected = list(doc.token_ids)
        for s, e, ids in reversed(spans):
            expected[s:e] = ids
        stats = doc.apply_edits(spans)
        assert doc.token_ids == expected
        assert stats.n_tokens == len(expected) and len(stats.dirty_per_layer) == model.config.n_layers
        assert bool((doc.positions[1:] > doc.positions[:-1]).all()), "positions must stay strictly increasing"
        assert_matches_dense(doc)
        if model.config.quantize:
            assert_codes_certified(doc)


def test_canonical_equals_standard_forward():
    model = MODELS["rope-gqa-head-k16"]
    doc = Document(model, list(range(20)), position_mode="canonical")
    doc.replace(5, 7, [1, 2, 3, 4])
    doc.replace(0, 1, [])
    doc.replace(10, 10, [9, 9])
    n = len(doc)
    assert torch.equal(doc.positions, torch.arange(n, dtype=torch.float64))
    with torch.no_grad():
        out = model(torch.tensor([doc.token_ids]))  # the batched training path, default positions 0..n-1
    assert torch.equal(torch.stack(out["codes"])[:, 0], doc.codes)
    torch.testing.assert_close(out["hidden"][0], doc.hidden, atol=1e-9, rtol=0)


def test_stable_positions_keep_untouched_tokens():
    model = MODELS["rope-gqa-head-k16"]
    doc = Document(model, list(range(30)))
    before = doc.positions
    doc.replace(10, 12, [5, 6, 7])
    after = doc.positions
    assert torch.equal(after[:10], before[:10]) and torch.equal(after[13:], before[12:])
    assert bool((after[10:13] > before[9]).all() and (after[10:13] < before[12]).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_multi_edit_positions_follow_the_planner(data):
    """Several hunks in one update (adjacent ones included) place their tokens exactly where
    plan_positions puts them given the kept tokens' old positions."""
    model = MODELS["rope-window-head-k8"]
    doc = Document(model, list(range(12)))
    for _ in range(3):
        n, edits, cur = len(doc), [], 0
        while cur <= n and len(edits) < 3 and data.draw(st.booleans()):
            s = data.draw(st.integers(cur, n))
            e = data.draw(st.integers(s, min(n, s + 3)))
            edits.append((s, e, data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=4))))
            cur = e
        if n + sum(len(t) - (e - s) for s, e, t in edits) > MAX_TOKENS:
            break
        kept, old, cur = [], doc.positions.tolist(), 0
        for s, e, ids in edits:
            kept += old[cur:s] + [None] * len(ids)
            cur = e
        kept += old[cur:]
        doc.apply_edits(edits)
        assert doc.positions.tolist() == plan_positions(kept, doc.position_policy)


def test_tight_spacing_renumbers_a_window_and_stays_exact():
    model = MODELS["rope-window-head-k8"]
    doc = Document(model, list(range(40)))
    total = 0
    for _ in range(8):  # keep inserting at the same gap until spacing degenerates
        total += doc.replace(20, 20, [3]).renumbered
    assert total > 0, "repeated insertion into one gap must trigger a renumbering"
    gaps = doc.positions[1:] - doc.positions[:-1]
    assert float(gaps.min()) >= doc.position_policy.min_spacing
    assert_matches_dense(doc)


def test_append_costs_no_more_than_prefix_reuse():
    for name in ("rope-gqa-head-k16", "rope-window-head-k8", "dense-twin-window"):
        doc = Document(MODELS[name], list(range(30)))
        for m in (1, 4):
            stats = doc.replace(len(doc), len(doc), [7] * m)
            assert stats.macs <= stats.prefix_macs, (name, stats.macs, stats.prefix_macs)
            assert stats.dirty_per_layer == [m] * MODELS[name].config.n_layers


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_queries_seeing_more_changed_keys_than_keys_get_full_rows(backend):
    """A delta update costs one (query, key) pair per changed key a clean query sees, a full row one per key
    it sees: where the delta costs more the row is recomputed in full. The delta pairs of a one-layer
    windowed model are worked out here from the positions alone; the result still equals the dense forward."""
    if vqt.ops.unavailable_reason(backend):
        pytest.skip(vqt.ops.unavailable_reason(backend))
    model, w = tiny_model(seed=5, n_layers=1, window=6.0), 6.0
    doc = Document(model, list(range(1, 31)), backend=backend)
    old = doc.positions.tolist()
    stats = doc.replace(10, 15, [40, 41, 42, 43, 44])
    new = doc.positions.tolist()
    sees = lambda p, keys: sum(p - w < k <= p for k in keys)  # noqa: E731
    delta_pairs, cheaper = 0, 0
    for i in [*range(10), *range(15, 30)]:  # the clean queries (same index before and after)
        hits = sees(old[i], old[10:15]) + sees(new[i], new[10:15])
        if hits > sees(new[i], new):
            cheaper += 1
        else:
            delta_pairs += hits
    assert cheaper > 0, "no query saw more changed keys than keys: the case does not test the rule"
    assert stats.macs_by_kind.get("attention_delta", 0) == delta_pairs * 2 * model.config.n_heads * model.config.head_dim
    assert_matches_dense(doc)


def test_from_and_to_empty_document():
    model = MODELS["none-gqa-product-k4"]
    doc = Document(model, [])
    assert len(doc) == 0 and doc.hidden.shape == (0, model.config.d_model)
    doc.replace(0, 0, [1, 2, 3])
    assert_matches_dense(doc)
    doc.replace(0, 3, [])
    assert len(doc) == 0 and torch.count_nonzero(doc.pooled) == 0
    doc.insert(0, [4])
    assert_matches_dense(doc)


def test_cancellation_guard_fires_and_recovers():
    """One key holds nearly all attention mass; deleting it must trigger a row refresh."""
    model = tiny_model(seed=3, n_layers=1, n_heads=2, n_kv_heads=1, pos_encoding="none", quantize=False)
    d, hd = model.config.d_model, model.config.head_dim
    with torch.no_grad():
        e, f = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        e[0], f[1] = 1.0, 1.0
        emb = model.embed.weight
        emb[:, 0] = 0.0  # only token 0 has a component along e
        emb[:, 1] = 1.0  # every token has a constant component along f
        emb[0, 0] = 3.0
        u = torch.zeros(hd, dtype=torch.float64)
        u[0] = 1.0
        blk = model.blocks[0]
        blk.wq.weight.zero_()
        blk.wq.weight[:hd] = 10.0 * torch.outer(u, f)  # every query points along u (head 0)
        blk.wk.weight.zero_()
        blk.wk.weight[:] = 40.0 * torch.outer(u, e)  # only token 0's key points along u
    doc = Document(model, [5, 0] + list(range(6, 30)))
    s = doc.state_dict()
    assert float(s["layer0.Z"][2:, 0].max()) < 1.0 + 1e-6, "token 0 should hold nearly all the attention mass"
    stats = doc.delete(1, 2)
    assert stats.refreshes > 0
    assert_matches_dense(doc)


@pytest.mark.parametrize("name", ["rope-sink-token-window-head-k16", "none-sink-logit-layer-k64"])
def test_sink_score_does_not_depend_on_positions(name):
    """The sink is scored at a fixed relative offset: shifting every position (RoPE is relative)
    leaves every output unchanged, and the sink changes the outputs (it is not a no-op)."""
    model = MODELS[name]
    tok = list(range(3, 40))
    pos = torch.arange(len(tok), dtype=torch.float64) * 0.75
    a, b = model.forward_dense(tok, pos), model.forward_dense(tok, pos + 1234.5)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-9, rtol=0)
    without = tiny_model(**{**CONFIGS[name], "sink": "none"})
    without.load_state_dict({k: v for k, v in model.state_dict().items() if "sink" not in k})
    assert not torch.allclose(without.forward_dense(tok, pos).hidden, a.hidden, atol=1e-3)


def test_sink_training_path_equals_dense_forward():
    """The batched training path (SDPA with the sink as an extra key) computes what forward_dense does."""
    model = tiny_model(sink="token", window=6.0, quantize=False)
    tok = list(range(5, 35))
    with torch.no_grad():
        out = model(torch.tensor([tok]))
    torch.testing.assert_close(out["hidden"][0], model.forward_dense(tok).hidden, atol=1e-9, rtol=0)


def test_kmeans_codebooks_have_no_duplicates():
    """With fewer distinct vectors than codewords, k-means leaves copies; they are separated, so the
    nearest codeword is never a tie (DESIGN.md section 8)."""
    from vqt.modeling.quantize import VectorQuantizer, separate_duplicates
    from vqt import VQTConfig

    q = VectorQuantizer(VQTConfig(d_model=8, n_heads=2, granularity="layer", codebook_size=16)).double()
    few = torch.randn(5, 1, 8, dtype=torch.float64).repeat(20, 1, 1)  # 5 distinct vectors, K = 16
    q.init_kmeans(few, iters=3, generator=torch.Generator().manual_seed(0))
    assert torch.unique(q.codebook[0], dim=0).shape[0] == 16
    dup = torch.zeros(6, 3, dtype=torch.float64)
    assert torch.unique(separate_duplicates(dup), dim=0).shape[0] == 6
