"""Wall-clock benchmark on real edits: dense forward vs prefix reuse vs VQT (every available backend).

    python experiments/bench.py                       # shipped model, windows 512/1024/2048
    python experiments/bench.py --model runs/X/model --windows 1024 --max-edits 50

All baselines run in this process on the same edits. Prints medians and per-edit ratio
distributions (median, p10, p90), MAC ratios, p95 latency of single-token edits, and the
document-state memory per token next to a plain KV cache's. Timings are noisy on shared
machines: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vqt.apps.loading import load_model  # noqa: E402
from vqt.histories.corpus import HELDOUT  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.engine.document import Document  # noqa: E402
from vqt.engine.options import DocumentOptions  # noqa: E402
from vqt.ops import BACKENDS, get_backend  # noqa: E402
from vqt.histories.replay import quantiles, replay  # noqa: E402
from vqt.text.document import TextDocument  # noqa: E402


def available_backends(device: str) -> list[str]:
    out = []
    for name in BACKENDS:
        try:
            get_backend(name, device)
            out.append(name)
        except (RuntimeError, ValueError) as e:
            print(f"backend {name}: unavailable ({e})")
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def single_token_ms(model, ids: list[int], backend: str, count: int, seed: int = 0) -> list[float]:
    """Milliseconds of ``count`` single-token substitutions (random place, random token) on one document."""
    rng = random.Random(seed)
    doc = Document(model, ids, backend=backend)
    out = []
    for _ in range(count):
        i = rng.randrange(len(doc))
        out.append(doc.replace(i, i + 1, [rng.randrange(model.config.vocab_size)]).seconds * 1e3)
    return out


def fmt(q: dict) -> str:
    return f"median {q['median']:8.3g}  p10 {q['p10']:8.3g}  p90 {q['p90']:8.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--data", nargs="*", default=None, help="histories (default: the held-out API-JSON articles)")
    p.add_argument("--windows", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--max-edits", type=int, default=80)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model, the documents and the baselines)")
    p.add_argument("--single-token", type=int, default=100,
                   help="also time this many single-token substitutions at random places of a real window")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    model, name, tok = load_model(a.model, torch.float32)
    model = model.to(a.device)
    print(f"model: {name}: {model.describe()}; device {a.device}; torch threads {torch.get_num_threads()}")
    backends = available_backends(a.device)
    paths = a.data or [str(x) for x in HELDOUT]
    for window in a.windows:
        if window > model.config.max_len:
            print(f"\nwindow {window}: skipped (model max_len {model.config.max_len})")
            continue
        runs = {}
        for be in backends:
            revs = (r for path in paths for r in iter_history(path))
            runs[be] = list(replay(model, revs, tok, window_tokens=window, max_edits=a.max_edits,
                                   baselines=(be == backends[0]),
                                   options=DocumentOptions(backend=be)))
        base = runs[backends[0]]
        # The cone of influence on its fastest exact path: the same weights without quantization, on the
        # same engine and backend (every row whose attention changes is recomputed, by delta updates).
        fastest = backends[-1]
        cone = list(replay(model.without_quantization(), (r for path in paths for r in iter_history(path)), tok,
                           window_tokens=window, max_edits=a.max_edits, baselines=False,
                           options=DocumentOptions(backend=fastest)))
        print(f"\n=== window {window} tokens: {len(base)} real edits (median doc {quantiles([r.n_tokens for r in base])['median']:.0f} tokens)")
        print(f"MAC ratio vs dense        {fmt(quantiles([r.ratio for r in base]))}")
        print(f"MAC ratio prefix reuse    {fmt(quantiles([r.prefix_ratio for r in base]))}")
        print(f"MAC ratio cone vs dense   {fmt(quantiles([r.dense_macs / r.cone_macs for r in base]))}")
        print(f"VQ MAC saving over cone   {fmt(quantiles([r.cone_ratio for r in base]))}")
        print(f"cone ({fastest}, no VQ) ms   {fmt(quantiles([r.seconds * 1e3 for r in cone]))}")
        print(f"dense forward ms          {fmt(quantiles([r.dense_seconds * 1e3 for r in base]))}")
        print(f"prefix reuse ms           {fmt(quantiles([r.prefix_seconds * 1e3 for r in base]))}")
        for be, recs in runs.items():
            ms = [r.seconds * 1e3 for r in recs]
            single = [r.seconds * 1e3 for r in recs if r.inserted_tokens <= 1 and r.deleted_tokens <= 1]
            print(f"VQT {be:<10} ms         {fmt(quantiles(ms))}" +
                  (f"  p95 single-token {sorted(single)[int(0.95 * (len(single) - 1))]:.1f} ms (n={len(single)})" if single else ""))
            print(f"  speedup vs dense        {fmt(quantiles([d.dense_seconds / r.seconds for d, r in zip(base, recs)]))}")
            print(f"  speedup vs prefix reuse {fmt(quantiles([d.prefix_seconds / r.seconds for d, r in zip(base, recs)]))}")
            print(f"  speedup vs cone         {fmt(quantiles([c.seconds / r.seconds for c, r in zip(cone, recs)]))}")
            if be != "reference":
                print(f"  speedup vs reference    {fmt(quantiles([d.seconds / r.seconds for d, r in zip(runs['reference'], recs)]))}")
        if a.single_token:
            ids: list[int] = []
            for rev in (r for path in paths for r in iter_history(path)):  # the first revision that fills the window
                ids = max(ids, tok.encode(rev["text"])[:window], key=len)
                if len(ids) >= window:
                    break
            print(f"single-token substitutions at random places of a real {len(ids)}-token window "
                  f"({a.single_token} each, same places and tokens for every backend):")
            for be in backends:
                ms = single_token_ms(model, ids, be, a.single_token)
                print(f"  VQT {be:<10} ms      p50 {statistics.median(ms):6.2f}  p95 {percentile(ms, 0.95):6.2f}")
    doc = TextDocument(model, tok, "memory probe " * 50).doc
    print(f"\ndocument state {doc.state_bytes_per_token()} B/token vs plain KV cache {doc.kv_cache_bytes_per_token()} B/token "
          f"({doc.state_bytes_per_token() / doc.kv_cache_bytes_per_token():.1f}x)")


if __name__ == "__main__":
    main()
