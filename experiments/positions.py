"""What stable positions cost in quality, and what the spacing policy buys in MACs.

    python experiments/positions.py data/vqt-small --min-spacing 1/32 1/64 1/128

Replays real edits of the held-out histories (the first 1024 tokens of each document) in stable positions, once
per minimum spacing. Prints the MAC ratio vs dense (median, p10) and how many kept tokens
were renumbered, and, every ``--every`` edits, compares the LM loss of the edited document at
its stable positions with the loss at canonical positions 0..n-1 (what a model that always
renumbers sees): the mean difference in nats per token is the quality price of not shifting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vqt.apps.loading import load_model  # noqa: E402
from vqt.histories.corpus import HELDOUT  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.engine.options import DocumentOptions  # noqa: E402
from vqt.engine.positions import PositionPolicy  # noqa: E402
from vqt.histories.replay import quantiles, replay  # noqa: E402


def lm_loss(model, tokens: list[int], positions: torch.Tensor) -> float:
    tok = torch.tensor([tokens])
    out = model(tok[:, :-1], positions[None, :-1], targets=tok[:, 1:])
    return float(out["lm_loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--min-spacing", nargs="+", default=["1/32", "1/64", "1/128"])
    p.add_argument("--max-edits", type=int, default=150)
    p.add_argument("--every", type=int, default=5, help="measure the loss drift every N edits")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="replay the first N tokens of each document "
                   "(0: whole documents)")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    model, name, tok = load_model(a.model, torch.float32)
    print(f"model: {name}: {model.describe()}")
    rows = []
    for spec in a.min_spacing:
        options = DocumentOptions(backend="auto", positions=PositionPolicy(min_spacing=float(Fraction(spec))))
        drift: list[float] = []
        seen = [0]

        def observe(doc, rec):
            seen[0] += 1
            if seen[0] % a.every == 0:
                ids, pos = doc.doc.token_ids, doc.doc.positions
                canonical = torch.arange(len(ids), dtype=torch.float64)
                drift.append(lm_loss(model, ids, pos) - lm_loss(model, ids, canonical))

        revs = (r for path in HELDOUT for r in iter_history(str(path)))
        recs = []
        with tqdm(total=a.max_edits, desc=f"min_spacing {spec}", unit="edit") as bar:
            for rec in replay(model, revs, tok, prefix_tokens=a.prefix_tokens or None, max_edits=a.max_edits, baselines=False,
                              options=options, observe=observe):
                recs.append(rec)
                bar.update(1)
        q = quantiles([r.ratio for r in recs])
        rows.append((spec, len(recs), q["median"], q["p10"], sum(r.renumbered for r in recs),
                     statistics.fmean(drift) if drift else float("nan"), max(drift) if drift else float("nan"),
                     len(drift)))
    print(f"\n{'min_spacing':>11} {'edits':>5} {'MAC med':>8} {'p10':>6} {'renumbered':>10} "
          f"{'loss drift (nats/token) mean':>29} {'max':>7} {'n':>3}")
    for spec, n, med, p10, ren, mean, mx, k in rows:
        print(f"{spec:>11} {n:>5} {med:>7.1f}x {p10:>5.2f}x {ren:>10} {mean:>29.4f} {mx:>7.4f} {k:>3}")


if __name__ == "__main__":
    main()
