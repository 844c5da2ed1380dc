"""Engine behaviour beyond float64 exactness: float32 contract, MAC accounting, errors, fallbacks."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import vqt.ops
from vqt.ops import layer

from helpers import assert_matches_dense, tiny_model
from vqt import Document, VQTConfig, VQTModel
from vqt.engine.macs import MacCounter, baseline_macs, dense_macs, prefix_reuse_macs
from vqt.text.persist import model_fingerprint


def random_edits(doc: Document, rng: random.Random, count: int, vocab: int = 61):
    for _ in range(count):
        n = len(doc)
        s = rng.randrange(n + 1)
        e = min(n, s + rng.randrange(4))
        yield doc.replace(s, e, [rng.randrange(vocab) for _ in range(rng.randrange(4))] if n < 80 else [])


def test_float32_codes_differ_only_at_float_noise_gaps():
    model = tiny_model(dtype=torch.float32, seed=1, codebook_size=64)
    rng = random.Random(0)
    doc = Document(model, [rng.randrange(61) for _ in range(48)])
    mismatches = 0
    for _ in random_edits(doc, rng, 60):
        out = model.forward_dense(doc.token_ids, doc.positions)
        diff = out.codes != doc.codes
        mismatches += int(diff.sum())
        # Where codes differ the dense forward itself was undecided: its own gap is float noise.
        assert bool((out.gaps[diff] < 1e-4).all()), out.gaps[diff]
        torch.testing.assert_close(doc.hidden, out.hidden, atol=1e-4, rtol=0)
    assert mismatches <= 5, "float32 should rarely hit a near-tie"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bf16_products_stay_within_the_contract_of_the_bf16_dense_forward(backend):
    """With bfloat16 products (float32 activations) the incremental document matches the dense forward
    that multiplies in bfloat16 too, as the float32 contract asks (codes identical but at float-noise
    gaps, hidden states within 1e-5), while the float32 products' dense forward is far from both: the
    engine and its oracle really run the bfloat16 products."""
    if backend == "cpu" and vqt.ops.unavailable_reason("cpu"):
        pytest.skip(vqt.ops.unavailable_reason("cpu"))
    model = tiny_model(dtype=torch.float32, seed=1, codebook_size=64, sink="token", window=12.0, quantizer="qtc")
    reference = copy.deepcopy(model)
    assert model.set_matmul_dtype(torch.bfloat16).matmul_dtype == torch.bfloat16
    rng = random.Random(0)
    doc = Document(model, [rng.randrange(61) for _ in range(48)], backend=backend)
    worst, apart = 0.0, []
    for _ in random_edits(doc, rng, 40):
        out = model.forward_dense(doc.token_ids, doc.positions, follow_codes=doc.codes)
        assert out.codes_agree(doc.codes)
        worst = max(worst, float((doc.hidden - out.hidden).abs().max()))
        apart.append(float((reference.forward_dense(doc.token_ids, doc.positions).hidden - out.hidden).abs().max()))
    assert worst < 1e-5, worst
    assert min(apart) > 100 * max(worst, 1e-7), (worst, apart)
    with torch.no_grad():  # the LM head multiplies in bfloat16 as well
        h = doc.hidden[:4]
        torch.testing.assert_close(doc.logits(range(4)), F.linear(h.bfloat16(), model.embed.weight.bfloat16()).float(),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(96, 32), (960, 576)])
def test_bf16_products_pad_rows_to_buckets_without_changing_a_bit(shape):
    """bfloat16 products run at a few row counts (vqt.ops.layer.product_rows: oneDNN compiles a kernel per
    shape), the rows padded with zeros. That is exact only because a row's bfloat16 product does not depend
    on the rows beside it: each m-row product must equal the same rows of one 300-row product, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    x = torch.randn(300, shape[1], generator=gen)
    whole = F.linear(x.to(torch.bfloat16), w).float()
    for m in [*range(1, 70), 100, 129, 255, 257, 300]:
        assert m <= layer.product_rows(m) < m + 64
        assert torch.equal(layer.linear(x[:m], w), whole[:m]), m
    assert len({layer.product_rows(m) for m in range(1, 257)}) < 30  # few shapes to compile


def test_matmul_dtype_changes_rebuild_documents_and_bad_ones_are_refused():
    model = tiny_model(dtype=torch.float32, seed=2)
    doc = Document(model, list(range(20)))
    with pytest.raises(ValueError, match="matmul dtype must be torch.bfloat16 or the model's torch.float32, got "
                                         "torch.float16"):
        model.set_matmul_dtype(torch.float16)
    assert model.matmul_dtype == torch.float32 and not doc.insert(3, [5]).full_recompute
    own = model_fingerprint(model)
    model.set_matmul_dtype(torch.bfloat16)
    assert model_fingerprint(model) != own  # a state saved under float32 products does not load under bf16 ones
    with pytest.warns(UserWarning, match="matmul dtype changed"):
        stats = doc.insert(3, [7])
    assert stats.full_recompute
    assert_matches_dense(doc, atol=0)
    model.set_matmul_dtype(torch.float32)  # back to the model's own products
    assert model_fingerprint(model) == own
    with pytest.warns(UserWarning, match="matmul dtype changed"):
        assert model.matmul_dtype == torch.float32 and doc.delete(3, 4).full_recompute
    assert_matches_dense(doc, atol=0)


def test_mac_accounting_hand_computed():
    # d=8, H=2, Hkv=1, hd=4, d_ff=16, K=4, per-head codes (G=2, gd=4), one layer.
    cfg = VQTConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, codebook_size=4)
    pos = torch.arange(3, dtype=torch.float64)
    # 3 rows, causal pairs 1+2+3 = 6:
    # qkv 3*8*(2+2*1)*4 = 384; attention 6 pairs * 2 * 2 heads * 4 = 96; codebook search 3*2 groups*4 codes*4 = 96;
    # lookup 3 rows * 2 groups * 8 = 48; MLP 3 * 3*8*16 = 1152. Total 1776.
    assert dense_macs(cfg, pos) == 1776
    # Prefix reuse from index 2: one row that sees 3 keys: 128 + 3*16 + 32 + 16 + 384 = 608.
    assert prefix_reuse_macs(cfg, pos, 2) == 608
    win = VQTConfig(**{**cfg.to_dict(), "window": 2.0, "n_layers": 2})
    # Window 2 on 4 positions: query 0 sees 1 key, queries 1..3 see 2 each: 7 pairs; two layers.
    p4 = torch.arange(4, dtype=torch.float64)
    assert dense_macs(win, p4) == 2 * (4 * 128 + 7 * 16 + 4 * 32 + 4 * 16 + 4 * 384)
    twin = VQTConfig(**{**cfg.to_dict(), "quantize": False})
    # Dense twin: no search, W_o is 8x8 = 64 per row instead of the 16-MAC lookup.
    assert dense_macs(twin, pos) == 1776 - 96 - 48 + 3 * 64
    m = MacCounter(cfg)
    m.quantize_skip(5)  # each check: three distances of gd = 4 (moved, old and new distance to the codeword)
    assert m.total == 5 * 3 * 4 and m.by_kind["quantize"] == 60
    sink = VQTConfig(**{**cfg.to_dict(), "sink": "token"})
    # A sink is one more pair per row (score and value): 3 rows * 16.
    assert dense_macs(sink, pos) == 1776 + 3 * 16
    # Cone, hand-counted: window 2, positions 0..3, token 1 changed (two layers, no quantization:
    # output W_o 64 per row). Layer 0: rows 1 (input changed: qkv) and 2 (sees key 1) recomputed;
    # layer 1: rows 1, 2 have new inputs (qkv), rows 1..3 recomputed. Pairs: rows 1, 2, 3 see 2 keys.
    # Per row: qkv 128, W_o 64, MLP 384; per pair 16.
    cone = (1 * 128 + 2 * (64 + 384) + 4 * 16) + (2 * 128 + 3 * (64 + 384) + 6 * 16)
    assert baseline_macs(win, p4, 1, torch.tensor([1]), torch.tensor([])).cone == cone
    # A removed key at position 2.5 also reaches query 3 (2.5 <= 3 < 4.5): row 3 joins at layer 0, so at
    # layer 1 its input changed too (one more qkv).
    assert baseline_macs(win, p4, 1, torch.tensor([1]), torch.tensor([2.5])).cone == cone + (64 + 384 + 2 * 16) + 128


def test_engine_macs_use_the_same_accounting():
    model = tiny_model()
    doc = Document(model, list(range(20)))
    stats = doc.replace(0, 20, list(range(20, 40)))  # whole-document replacement: everything recomputed
    cfg = model.config
    pos = doc.positions
    # Full recompute of every row plus the certified-skip checks on none (all rows are new).
    assert stats.macs == dense_macs(cfg, pos)
    assert stats.dense_macs == dense_macs(cfg, pos)


def snapshot(doc: Document) -> dict:
    return {**doc.state_dict(), "order": doc.cache.order.tolist(), "free": list(doc.cache.free)}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("bad, exc, match", [
    ((5, 3, [1]), ValueError, r"invalid token range \[5, 3\)"),
    ((0, 99, [1]), ValueError, r"invalid token range \[0, 99\)"),
    ((-1, 2, [1]), ValueError, "invalid token range"),
    ((0, 1, [61]), ValueError, "token id 61 is outside the vocabulary"),
    ((0, 1, [-3]), ValueError, "token id -3"),
    ((0, 1, "abc"), TypeError, "not str"),
    ((0, 1, [1.5]), TypeError, r"new_token_ids\[0\] must be an integer, got 1.5"),
    ((0, 1, torch.tensor([[1, 2], [3, 4]])), ValueError,
     r"must be one-dimensional \(one document\), got shape \(2, 2\)"),
    ((0, 1, [[1, 2]]), TypeError, r"must be an integer, got \[1, 2\]"),
    ((0, 1, [2**64]), ValueError, "token id 18446744073709551616 in new_token_ids is outside every vocabulary"),
    ((0, 1, [True]), TypeError, "must be an integer, got True"),
    ((torch.tensor(0.0), 1, [1]), TypeError, "start must be an integer .token offset."),
    ((0.0, 1, [1]), TypeError, "start must be an int"),
    ((0, 1, torch.tensor([1.0])), TypeError, "must be integers"),
    ((0, 1, torch.tensor([1], device="meta")), ValueError, "are on meta"),
    ((0, 0, [1] * 200), ValueError, "exceeds the model's max_len=96"),
])
def test_bad_edits_raise_and_leave_state_unchanged(bad, exc, match):
    doc = Document(tiny_model(), list(range(10)))
    before = snapshot(doc)
    with pytest.raises(exc, match=match):
        doc.replace(*bad)
    assert_same_state(before, snapshot(doc))
    assert_matches_dense(doc)


def test_numpy_and_torch_integers_are_integers():
    np = pytest.importorskip("numpy")
    a, b = Document(tiny_model(), list(range(10))), Document(tiny_model(), np.arange(10))
    a.replace(2, 4, [7, 8])
    b.replace(np.int64(2), torch.tensor(4), [np.int32(7), torch.tensor(8)])
    assert_same_state(snapshot(a), snapshot(b))
    assert torch.equal(a.logits([np.int64(0), torch.tensor(-1)]), a.logits([0, len(a) - 1]))


@pytest.mark.parametrize("call, exc, match", [
    (lambda d: d.apply_edits(None), TypeError, "edits must be a list of .start, end, new_token_ids., got None"),
    (lambda d: d.apply_edits(5), TypeError, "edits must be a list"),
    (lambda d: d.logits([len(d) + 5]), ValueError, "token index 15 is outside a document of 10 tokens"),
    (lambda d: d.logits([-11]), ValueError, "token index -11 is outside"),
    (lambda d: d.logits(3), TypeError, "indices must be a sequence of token indices, got 3"),
    (lambda d: d.logits([1.0]), TypeError, "a token index must be an integer, got 1.0"),
])
def test_bad_calls_name_the_value(call, exc, match):
    doc = Document(tiny_model(), list(range(10)))
    before = snapshot(doc)
    with pytest.raises(exc, match=match):
        call(doc)
    assert_same_state(before, snapshot(doc))


@pytest.mark.parametrize("tokens, positions, exc, match", [
    (torch.tensor([[1, 2, 3], [4, 5, 6]]), None, ValueError, r"got shape \(2, 3\)"),
    ([1, 2, 3], [0.0, 1.0, float("inf")], ValueError, "positions must be finite, got inf at index 2"),
    ([1], [float("nan")], ValueError, "positions must be finite, got nan at index 0"),
    ([1, 2], [[0.0, 1.0]], ValueError, r"positions must be one-dimensional .one document., got shape \(1, 2\)"),
    ([1, 2], [1.0, 0.5], ValueError, "strictly increasing, got 1.0 then 0.5 at index 0"),
    ([2**64], None, ValueError, "token id 18446744073709551616"),
])
def test_bad_documents_and_dense_forwards_are_refused(tokens, positions, exc, match):
    model = tiny_model()
    with pytest.raises(exc, match=match):
        Document(model, tokens, positions=positions)
    with pytest.raises(exc, match=match):
        model.forward_dense(tokens, positions)


def test_overlapping_multi_span_rejected_atomically():
    doc = Document(tiny_model(), list(range(10)))
    before = snapshot(doc)
    with pytest.raises(ValueError, match="sorted and non-overlapping"):
        doc.apply_edits([(2, 5, [1]), (4, 6, [2])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        doc.apply_edits([(0, 1, [1]), (4, 6, [999])])  # second span bad: the first must not land
    assert_same_state(before, snapshot(doc))


def test_internal_failure_restores_state(monkeypatch):
    doc = Document(tiny_model(), list(range(12)))
    doc.replace(3, 4, [7, 7])
    before = snapshot(doc)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in the middle of an update")

    monkeypatch.setattr(doc.backend, "requantize", boom)
    with pytest.raises(RuntimeError, match="injected"):
        doc.replace(5, 6, [1, 2])
    monkeypatch.undo()
    after = snapshot(doc)
    assert after["tokens"].tolist() == before["tokens"].tolist()
    assert torch.equal(after["positions"], before["positions"])
    assert_matches_dense(doc)


def test_document_rejects_bad_construction():
    model = tiny_model()
    with pytest.raises(ValueError, match="training mode"):
        Document(model.train(), [1, 2])
    model.eval()
    with pytest.raises(ValueError, match="unknown position_mode"):
        Document(model, [1], position_mode="shifted")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        Document(model, [1], backend="gpu")
    with pytest.raises(TypeError, match="VQTModel"):
        Document("not a model", [1])
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        Document(model, [1] * 97)


def test_changed_model_falls_back_to_full_recompute():
    model = tiny_model()
    doc = Document(model, list(range(15)))
    with torch.no_grad():
        model.blocks[1].quantizer.codebook.mul_(1.01)
    with pytest.warns(UserWarning, match="full recompute"):
        stats = doc.replace(3, 3, [4])
    assert stats.full_recompute and "changed" in stats.reason
    assert_matches_dense(doc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not doc.replace(0, 1, [2]).full_recompute


def test_lazy_logits_and_classification():
    model = tiny_model(n_classes=3)
    doc = Document(model, list(range(12)))
    doc.replace(4, 6, [1])
    out = model.forward_dense(doc.token_ids, doc.positions)
    torch.testing.assert_close(doc.logits([0, 5]), model.logits(out.hidden[[0, 5]]), atol=1e-9, rtol=0)
    assert doc.logits().shape == (len(doc), model.config.vocab_size)
    torch.testing.assert_close(doc.classify(), model.classify(out.hidden.mean(0)), atol=1e-9, rtol=0)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny_model(window=8.0)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VQTModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training and loaded.dtype == torch.float64
    toks = list(range(25))
    assert torch.equal(loaded.forward_dense(toks).codes, model.forward_dense(toks).codes)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQTModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        VQTModel.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        VQTModel.from_pretrained(bad)
    other = tmp_path / "other"
    model.save_pretrained(other)
    cfg = model.config.to_dict()
    cfg["d_model"] = 64
    VQTConfig(**cfg).save(other / "config.json")
    with pytest.raises(ValueError, match="has shape"):
        VQTModel.from_pretrained(other)
    (other / "config.json").write_text('{"d_model": 8, "flux_capacitor": 1}')
    with pytest.raises(ValueError, match="unknown VQTConfig keys"):
        VQTModel.from_pretrained(other)


def test_checkpoint_loads_in_requested_dtype(tmp_path):
    model = tiny_model(dtype=torch.float32)
    model.half().save_pretrained(tmp_path)
    assert VQTModel.from_pretrained(tmp_path).dtype == torch.float16
    assert VQTModel.from_pretrained(tmp_path, dtype=torch.float64).dtype == torch.float64


def test_changed_rows_per_layer_are_the_rows_whose_next_input_changed():
    model = tiny_model(window=6.0)
    doc = Document(model, list(range(40)))
    outputs = lambda: [t.x.clone() for t in doc.cache.layers[1:]] + [doc.cache.hidden.clone()]  # noqa: E731
    before = outputs()
    st = doc.replace(10, 11, [5, 6])
    rows = st.changed_rows_per_layer()
    assert len(rows) == model.config.n_layers and rows[0]
    order = doc.cache.order.tolist()
    for layer, (old, new) in enumerate(zip(before, outputs())):
        want = [i for i, s in enumerate(order) if i in (10, 11) or not torch.equal(old[s], new[s])]
        assert rows[layer] == want, layer


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_recomputed_counts_the_layers_that_recomputed_each_token(backend):
    """EditStats.recomputed, built from the layers' own rows: a token counts at a layer when its input or one
    of its codes changed there (or it is new), and the counts add up to the rows the layers recomputed."""
    why = vqt.ops.unavailable_reason(backend)
    if why:
        pytest.skip(why)
    model = tiny_model(window=6.0)
    doc = Document(model, list(range(40)), backend=backend)
    state = lambda: [(t.x.clone(), t.codes.clone()) for t in doc.cache.layers]  # noqa: E731
    before = state()
    st = doc.replace(20, 20, [7, 8])
    after, order = state(), doc.cache.order.tolist()
    want = []
    for i, s in enumerate(order):
        new = i in (20, 21)
        want.append(sum(new or not (torch.equal(x0[s], x1[s]) and torch.equal(c0[s], c1[s]))
                        for (x0, c0), (x1, c1) in zip(before, after)))
    assert st.recomputed.tolist() == want and sum(want) > 2
    assert int(st.recomputed.sum()) == sum(st.dirty_per_layer) + sum(st.flips_per_layer)
