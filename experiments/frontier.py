"""The SmolLM2 frontier: quality against incremental savings for windows, sinks, codes and adaptation.

    python experiments/frontier.py --points w128-sink-layer-k256 w64-sink-layer-k256 --model runs/x/model
    python experiments/frontier.py --points w128-nosink-layer-k256 --edits 20 --eval-tokens 8192
    python experiments/frontier.py --points w256-sink-layer-k64-qtc w256-sink-layer-k64-qtc-top2 --save runs/frontier

A point is ``w<W>-<sink|nosink>-<granularity>-k<K>[-qtc[-r<R>][-t<T>|-tfull]][-top<N>]`` (converted
training-free on Anarchism text: k-means codebooks; ``-qtc`` quantize-then-correct, fitted in closed form to
the layer's own attention output, at rank R with ``-r<R>``, or with ``-t<T>`` to the original attention with
window T (``-tfull``: full attention) on the same inputs; ``-top<N>``: the top N layers carry no codes) or ``--model DIR`` (an adapted checkpoint); ``--save DIR`` writes each converted
point as a delta folder (DIR/<point>), e.g. for experiments/classify.py. For each: held-out perplexity next to the
original full-attention model's on the same windows; on real edits of the held-out API articles
(the first 1024 tokens of each document, stable positions, the ``cpu`` backend): the median and p10 MAC ratio vs the
original's dense forward (full attention), vs the windowed model's own dense forward, VQ's saving
over the cone of influence, VQT vs prefix reuse, the layer-1 code flip rate, the engine's time per
edit and the original's dense forward time over it (same process, torch threads as given; ``--dtype bf16``:
every model, the original included, multiplies in bfloat16); with
``--classify``, document classification accuracy next to the original's on the same splits
(``experiments/classify.py``'s recipe: pooled features of each document's first 128 tokens).
Prints a Markdown table; ``--json`` appends the rows to a file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqt.apps.loading import resolve_dtype  # noqa: E402
from vqt.engine.macs import baseline_macs  # noqa: E402
from vqt.engine.options import DocumentOptions  # noqa: E402
from vqt.histories.corpus import HELDOUT, heldout_texts, training_texts  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.histories.replay import quantiles, replay  # noqa: E402
from vqt.modeling.model import VQTModel  # noqa: E402
from vqt.pretrained.adapt import heldout_perplexity  # noqa: E402
from vqt.pretrained.convert import convert, save_delta, tokenizer_from_gguf  # noqa: E402
from vqt.training.classify import LONG_SETS, fold_accuracies, load_documents, pooled_features  # noqa: E402

POINT = re.compile(r"w(\d+)-(sink|nosink)-(layer|head|product)-k(\d+)(-qtc)?(?:-r(\d+))?(?:-t(\d+|full))?"
                   r"(?:-top(\d+))?$")


def full_attention_macs(original: VQTModel, n: int) -> int:
    """MACs of the original model's dense forward (full attention, no VQ) on n tokens."""
    return baseline_macs(original.config, torch.arange(n, dtype=torch.float64), 0).dense


def dense_ms(model: VQTModel, ids: np.ndarray, repeats: int = 3) -> float:
    """Median milliseconds of a dense forward (the model's fastest exact path) over ``ids``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward_dense(ids.tolist())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Classification:
    """Accuracy of pooled features on the vadersentiment documents, on splits shared by every model."""

    def __init__(self, tok, max_tokens: int, repeats: int = 10, limit: Optional[int] = None) -> None:
        self.texts, self.labels = load_documents(LONG_SETS)
        if limit is not None and limit < len(self.texts):  # a seeded sample, the same for every model
            keep = sorted(random.Random(0).sample(range(len(self.texts)), limit))
            self.texts, self.labels = [self.texts[i] for i in keep], [self.labels[i] for i in keep]
        self.tok, self.max_tokens, self.repeats = tok, max_tokens, repeats

    def __call__(self, model: VQTModel) -> np.ndarray:
        feats = pooled_features(model, self.tok, self.texts, self.max_tokens)
        return np.asarray(fold_accuracies(feats, self.labels, 5, self.repeats))


def measure(name: str, model: VQTModel, original: VQTModel, tok, held: np.ndarray, a, original_ms: float,
            judge: Optional[Classification] = None, original_acc: Optional[np.ndarray] = None) -> dict:
    t0 = time.time()
    ppl = heldout_perplexity(model, held, a.seq_len, a.eval_tokens)
    revs = (r for path in HELDOUT for r in iter_history(path))
    recs = list(replay(model, revs, tok, prefix_tokens=1024, max_edits=a.edits, baselines=False,
                       options=DocumentOptions(backend=a.backend)))
    full = [full_attention_macs(original, r.n_tokens) / r.macs if r.macs else float("inf") for r in recs]
    row = {
        "point": name, "describe": model.describe(), "ppl": ppl, "edits": len(recs),
        "vs_full_dense": quantiles(full), "vs_window_dense": quantiles([r.ratio for r in recs]),
        "vq_over_cone": quantiles([r.cone_ratio for r in recs]),
        "vs_prefix": quantiles([r.prefix_macs / r.macs if r.macs else float("inf") for r in recs]),
        "flip_l1": statistics.fmean(r.layer1_flip_rate for r in recs) if recs else float("nan"),
        "ms_per_edit": quantiles([r.seconds * 1e3 for r in recs])["median"], "seconds": round(time.time() - t0),
        "original_dense_ms": original_ms, "products": str(model.matmul_dtype).removeprefix("torch."),
    }
    row["wall_vs_original_dense"] = original_ms / row["ms_per_edit"]
    if judge is not None:
        acc = judge(model)
        per_repeat = (acc - original_acc).reshape(judge.repeats, -1).mean(1)
        row["classify_acc"], row["classify_vs_original"] = float(acc.mean()), float(per_repeat.mean())
        row["classify_sem"] = float(per_repeat.std(ddof=1) / np.sqrt(judge.repeats))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="*", default=[], help="training-free points like w128-sink-layer-k256")
    p.add_argument("--model", nargs="*", default=[], help="adapted checkpoints (delta folders)")
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="bf16: every model, the original included, multiplies in bfloat16 (float32 activations)")
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, help="folder: write each converted point there as a delta checkpoint")
    p.add_argument("--classify", action="store_true", help="also classification accuracy vs the original")
    p.add_argument("--classify-tokens", type=int, default=128)
    p.add_argument("--classify-docs", type=int, default=None, help="classify a seeded sample of this many documents "
                   "(default: all of them, about 8,900: minutes per model on a CPU)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = tokenizer_from_gguf()
    held = np.asarray(tok.encode("\n\n".join(heldout_texts())), dtype=np.int64)
    calib = [t for text in training_texts(every=500, limit=8) for t in tok.encode(text)][: a.calib_tokens]
    rows = []
    _, original = convert(None, None, window=None, sink="none")
    products = resolve_dtype(a.dtype)[1]  # the original's fastest path and the adapted models' alike
    original.set_matmul_dtype(products)
    original_ppl = heldout_perplexity(original, held, a.seq_len, a.eval_tokens)
    original_ms = dense_ms(original, held[:1024])
    print(f"original SmolLM2-135M (full attention): held-out perplexity {original_ppl:.2f}, dense forward of 1024 "
          f"tokens {original_ms:.0f} ms", flush=True)
    judge = Classification(tok, a.classify_tokens, limit=a.classify_docs) if a.classify else None
    original_acc = judge(original) if judge else None
    if judge:
        print(f"original classification accuracy {original_acc.mean():.4f}", flush=True)
    scored = dict(judge=judge, original_acc=original_acc)
    for spec in a.points:
        m = POINT.match(spec)
        if not m:
            raise SystemExit(f"point {spec!r} is not like w128-sink-layer-k256 or w256-sink-layer-k64-qtc-top2")
        W, sink, gran, K = float(m[1]), "token" if m[2] == "sink" else "none", m[3], int(m[4])
        n_layers = original.config.n_layers
        rank = int(m[6]) if m[6] else None
        target = "own" if not m[7] else None if m[7] == "full" else float(m[7])
        layers = None if not m[8] else list(range(n_layers - int(m[8])))
        model, _ = convert(None, calib, window=W, sink=sink, granularity=gran, codebook_size=K,
                           quantizer="qtc" if m[5] else "vq", correction_rank=rank, target_window=target,
                           quantize_layers=layers, progress=True)
        if a.save:
            save_delta(model, Path(a.save) / spec)
        rows.append(measure(spec, model.set_matmul_dtype(products), original, tok, held, a, original_ms, **scored))
    for path in a.model:
        model = VQTModel.from_pretrained(path).set_matmul_dtype(products)
        rows.append(measure(path, model, original, tok, held, a, original_ms, **scored))
    print(f"\nheld-out perplexity of the original on the same windows: {original_ppl:.2f}")
    print("| point | ppl | vs original ppl | classification vs original | MAC vs full dense (med / p10) | vs windowed dense | VQ over cone | vs prefix | "
          "flips L1 | ms/edit | wall vs original dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f, w, c, pr = r["vs_full_dense"], r["vs_window_dense"], r["vq_over_cone"], r["vs_prefix"]
        cls = (f"{100 * r['classify_vs_original']:+.1f} +- {100 * r['classify_sem']:.1f}" if "classify_acc" in r
               else "-")
        print(f"| {r['point']} | {r['ppl']:.1f} | {r['ppl'] / original_ppl:.2f}x | {cls} | {f['median']:.1f}x / {f['p10']:.1f}x | {w['median']:.1f}x | "
              f"{c['median']:.2f}x | {pr['median']:.2f}x | {r['flip_l1']:.3f} | {r['ms_per_edit']:.0f} | "
              f"{r['wall_vs_original_dense']:.2f}x |")
    if a.json:
        with open(a.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "original_ppl": original_ppl}) + "\n")


if __name__ == "__main__":
    main()
