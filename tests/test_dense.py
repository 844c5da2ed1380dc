"""The dense forward (the oracle and the baselines): chunked rows, prefix reuse, and other backends' kernels.

float64: codes identical and every table within 1e-9 of the reference dense forward, whatever the
chunk size, the backend whose attention kernel runs it, or the prefix a cache supplies.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from helpers import tiny_model
from vqt.modeling.model import DenseOutput
from vqt.ops import ReferenceBackend, get_backend
from vqt.ops import reference as ref

CONFIGS = {
    "full attention": {},
    "window": dict(window=7.0),
    "window + token sink": dict(window=9.0, sink="token"),
    "logit sink, mqa": dict(window=5.0, sink="logit", n_heads=4, n_kv_heads=1),
    "nope": dict(pos_encoding="none", window=6.0),
    "dense twin": dict(quantize=False, window=6.0),
    "one quantized layer": dict(quantize_layers=[1], window=6.0),
    "head codes": dict(granularity="head", window=6.0),
}
N = 300


def document(seed: int = 1, n: int = N) -> tuple[list[int], torch.Tensor]:
    """Random tokens at strictly increasing, unevenly spaced positions (as stable positions become)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.cumsum(torch.rand(n, generator=gen, dtype=torch.float64) + 0.3, 0)
    return [rng.randrange(61) for _ in range(n)], pos


def assert_same(out, oracle, atol: float = 1e-9) -> None:
    """Codes identical; hidden states and every layer table within atol."""
    if oracle.codes is None:
        assert out.codes is None
    else:
        assert torch.equal(out.codes, oracle.codes), f"{int((out.codes != oracle.codes).sum())} codes differ"
        torch.testing.assert_close(out.gaps, oracle.gaps, atol=atol, rtol=0)
    torch.testing.assert_close(out.hidden, oracle.hidden, atol=atol, rtol=0)
    torch.testing.assert_close(out.residual, oracle.residual, atol=atol, rtol=0)
    assert len(out.layers) == len(oracle.layers)
    for li, (a, b) in enumerate(zip(out.layers, oracle.layers)):
        assert [name for name, _ in a.items()] == [name for name, _ in b.items()]
        for name, t in a.items():
            other = getattr(b, name)
            assert t.shape == other.shape and t.dtype == other.dtype, (li, name)
            torch.testing.assert_close(t, other, atol=atol, rtol=0, msg=lambda m: f"layer {li} {name}: {m}")


def needs_compiler() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for the cpu backend")


@pytest.mark.parametrize("name", CONFIGS)
def test_cpu_kernels_equal_reference_dense(name):
    needs_compiler()
    model = tiny_model(max_len=512, **CONFIGS[name])
    tok, pos = document()
    assert model._dense_backend("cpu") is get_backend("cpu")  # the name reaches the fused kernels
    oracle = model.forward_dense(tok, pos)
    assert_same(model.forward_dense(tok, pos, backend="cpu"), oracle)
    assert_same(model.forward_dense(tok, pos, backend="cpu", chunk_rows=37), oracle)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 128])
def test_chunked_dense_equals_one_chunk(name, chunk_rows):
    model = tiny_model(max_len=512, **CONFIGS[name])
    tok, pos = document(seed=2)
    assert_same(model.forward_dense(tok, pos, chunk_rows=chunk_rows), model.forward_dense(tok, pos, chunk_rows=N))


@pytest.mark.parametrize("name", ["full attention", "window + token sink", "dense twin"])
@pytest.mark.parametrize("backend", [None, "cpu"])
def test_prefix_reuse_equals_dense_of_the_edited_document(name, backend):
    """Rows [0, start) from the old document's dense output, the rest computed: the edited document's dense output."""
    if backend == "cpu":
        needs_compiler()
    model = tiny_model(max_len=512, **CONFIGS[name])
    tok, pos = document(seed=3)
    old = model.forward_dense(tok, pos)
    for start in (0, 1, 150, N - 1):
        new_tok = tok[:start] + [7, 8, 9] + tok[start + 2:]  # two tokens replaced by three
        new_pos = torch.cat([pos[:start], pos[start] + torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                             pos[start + 2:] + 0.5])
        oracle = model.forward_dense(new_tok, new_pos)
        assert_same(model.forward_dense(new_tok, new_pos, cache=old, start=start, backend=backend, chunk_rows=64),
                    oracle)
        lean = model.forward_dense(new_tok, new_pos, cache=old, start=start, keep_prefix=False, backend=backend)
        assert lean.start == start and lean.hidden.shape[0] == len(new_tok) - start
        assert_same(lean, rows_from(oracle, start))
    # nothing changed after the prefix: every row comes from the cache
    assert_same(model.forward_dense(tok, pos, cache=old, start=N, backend=backend), old)
    assert model.forward_dense(tok, pos, cache=old, start=N, keep_prefix=False).hidden.shape == (0, 32)


def rows_from(out, start: int):
    """The rows [start, n) of a dense output, as prefix reuse with keep_prefix=False returns them."""
    cut = lambda t: t[start:]  # noqa: E731
    return DenseOutput(None if out.codes is None else out.codes[:, start:], None if out.gaps is None else
                       out.gaps[:, start:], cut(out.hidden), cut(out.residual), [t.map(cut) for t in out.layers], start)


class BandRecorder(ReferenceBackend):
    """The reference operators, recording how many query rows and keys each attention call got."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def attention_rows(self, q, pos_q, k, v, pos_k, *args):
        self.calls.append((q.shape[0], k.shape[0]))
        return ref.attention_rows(q, pos_q, k, v, pos_k, *args)


# integer positions: a query sees itself and the 4 keys before it
@pytest.mark.parametrize("window, band", [(5.0, 64 + 4), (None, N)])
def test_each_chunk_attends_to_its_key_band_only(window, band):
    """The transient work per call is bounded by the chunk (and, with a window, its band of keys), not by n."""
    model = tiny_model(max_len=512, window=window)
    tok, _ = document(seed=4)
    recorder = BandRecorder()
    out = model.forward_dense(tok, backend=recorder, chunk_rows=64)
    assert_same(out, model.forward_dense(tok))
    assert len(recorder.calls) == model.config.n_layers * -(-N // 64)
    assert max(rows for rows, _ in recorder.calls) == 64
    assert max(keys for _, keys in recorder.calls) == band
    # prefix reuse without the prefix: only the new rows, and keys from the first one they see
    recorder.calls.clear()
    lean = model.forward_dense(tok, cache=out, start=200, keep_prefix=False, backend=recorder, chunk_rows=64)
    assert [rows for rows, _ in recorder.calls] == [64, 36] * model.config.n_layers
    assert max(keys for _, keys in recorder.calls) == (band if window else N)
    k = lean.layers[0].k
    kept = k.untyped_storage().nbytes() // (k[0].numel() * k.element_size())
    assert kept == (N - 196 if window else N)  # keys copied from the cache: only those row 200 can see


def test_bad_arguments_say_what_is_wrong():
    model = tiny_model(max_len=512)
    tok, _ = document(n=20)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        model.forward_dense(tok, backend="fast")
    with pytest.raises(TypeError, match="backend must be a backend name or a vqt.ops.Backend, not int"):
        model.forward_dense(tok, backend=3)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
            model.forward_dense(tok, chunk_rows=bad)
    other = tiny_model(max_len=512, n_layers=2).forward_dense(tok)
    with pytest.raises(ValueError, match="the prefix cache has 2 layers, this model 3"):
        model.forward_dense(tok, cache=other, start=5)
    lean = model.forward_dense(tok, cache=model.forward_dense(tok), start=5, keep_prefix=False)
    with pytest.raises(ValueError, match="the prefix cache holds rows from 5 on"):
        model.forward_dense(tok, cache=lean, start=6)
