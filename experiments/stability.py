"""How well do a checkpoint's codes stay put under real Wikipedia edits?

    python experiments/stability.py runs/w32-layer-k256/model --twin runs/w32-twin/model --plot runs/plots

Replays consecutive revisions of the held-out MediaWiki API articles in ../shared/data
(the first 1024 tokens of each document, edits as atomic diff hunks) and prints the per-code flip rate at
layer 1, the dirty fraction (median/p90), the MAC ratio vs dense (median/p10/p90), and
held-out perplexity next to the dense twin's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterable, Mapping, Optional
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vqt.modeling.config import VQTConfig  # noqa: E402
from vqt.histories.corpus import HELDOUT, heldout_tokens, train_tokens  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.modeling.model import VQTModel  # noqa: E402
from vqt.histories.replay import EditRecord, quantiles, replay  # noqa: E402
from vqt.training.train import evaluate_loss  # noqa: E402
from vqt.text.tokenizer import Tokenizer  # noqa: E402


def stability_report(model: VQTModel, revisions: Iterable[Mapping[str, Any]], tokenizer: Tokenizer,
                     prefix_tokens: Optional[int] = 1024, max_edits: Optional[int] = None,
                     progress=None) -> tuple[dict[str, Any], list[EditRecord]]:
    """Replay real edits (MACs only, no timing) and summarize how far they spread."""
    records = []
    for rec in replay(model, revisions, tokenizer, prefix_tokens=prefix_tokens, max_edits=max_edits, baselines=False):
        records.append(rec)
        if progress is not None:
            progress.update(1)
    L = model.config.n_layers
    frac = np.asarray([[d / max(1, r.n_tokens) for d in r.dirty_per_layer] for r in records]).reshape(-1, L)
    report = {
        "edits": len(records),
        "layer1_flip_rate": float(np.mean([r.layer1_flip_rate for r in records])) if records else float("nan"),
        "dirty_fraction": quantiles([r.dirty_fraction for r in records]),
        "mac_ratio": quantiles([r.ratio for r in records]),
        "prefix_mac_ratio": quantiles([r.prefix_ratio for r in records]),
        "cone_mac_ratio": quantiles([r.dense_macs / r.cone_macs for r in records]),
        "vq_over_cone": quantiles([r.cone_ratio for r in records]),
        "dirty_fraction_per_layer": np.median(frac, 0).tolist() if records else [],
    }
    return report, records


def load_spec(spec: str, tok: Tokenizer) -> VQTModel:
    """A checkpoint directory, or DIR@GRANULARITY:K: that checkpoint's weights with codebooks of this
    granularity and size fitted by k-means on training text (training-free VQ, e.g. on a dense twin)."""
    if "@" not in spec:
        return VQTModel.from_pretrained(spec, dtype=torch.float32)
    path, _, vq = spec.partition("@")
    gran, _, k = vq.partition(":")
    base = VQTModel.from_pretrained(path, dtype=torch.float32)
    cfg = VQTConfig.from_dict({**base.config.to_dict(), "quantize": True, "granularity": gran, "codebook_size": int(k)})
    model = VQTModel(cfg)
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all("quantizer" in m for m in missing), missing
    model.eval().calibrate_codebooks(torch.from_numpy(train_tokens(tok)[:8192].astype("int64")), iters=15)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="model directories")
    p.add_argument("--twin", default=None, help="dense twin checkpoint for the perplexity comparison")
    p.add_argument("--data", nargs="*", default=None, help="histories (default: the held-out API-JSON articles)")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="replay the first N tokens of each document "
                   "(0: whole documents)")
    p.add_argument("--max-edits", type=int, default=200, help="per checkpoint, over all histories")
    p.add_argument("--json", default=None, help="append one JSON line per checkpoint here")
    p.add_argument("--plot", default=None, help="folder for dirty_per_layer.png")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    tok = Tokenizer.default()
    paths = a.data or [str(x) for x in HELDOUT]
    held = heldout_tokens(tok)
    twin_ppl = math.exp(evaluate_loss(VQTModel.from_pretrained(a.twin, dtype=torch.float32), held, 1024)) if a.twin else None
    rows = []
    for ck in a.checkpoints:
        model = load_spec(ck, tok)
        revs = (rev for path in paths for rev in iter_history(path))
        with tqdm(total=a.max_edits, desc=Path(ck).parent.name or ck, unit="edit") as bar:
            rep, _ = stability_report(model, revs, tok, a.prefix_tokens or None, a.max_edits, progress=bar)
        rep["checkpoint"], rep["model"] = ck, model.describe()
        rep["perplexity"] = math.exp(evaluate_loss(model, held, 1024))
        rep["twin_perplexity"] = twin_ppl
        rows.append(rep)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(rep) + "\n")
    print(f"\n{'checkpoint':<34} {'edits':>5} {'flip@L1':>8} {'dirty med':>9} {'dirty p90':>9} "
          f"{'MAC med':>8} {'p10':>6} {'p90':>7} {'prefix':>7} {'cone':>7} {'VQ/cone':>8} {'ppl':>7} {'twin':>7}")
    for r in rows:
        q, d = r["mac_ratio"], r["dirty_fraction"]
        twin = f"{r['twin_perplexity']:.2f}" if r["twin_perplexity"] else "-"
        print(f"{r['checkpoint'][-34:]:<34} {r['edits']:>5} {r['layer1_flip_rate']:>8.4f} {d['median']:>9.4f} "
              f"{d['p90']:>9.4f} {q['median']:>7.1f}x {q['p10']:>5.1f}x {q['p90']:>6.1f}x "
              f"{r['prefix_mac_ratio']['median']:>6.1f}x {r['cone_mac_ratio']['median']:>6.1f}x "
              f"{r['vq_over_cone']['median']:>7.2f}x {r['perplexity']:>7.2f} {twin:>7}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.plot(range(1, len(r["dirty_fraction_per_layer"]) + 1), r["dirty_fraction_per_layer"], marker="o",
                    label=Path(r["checkpoint"]).parent.name or r["checkpoint"])
        ax.set_xlabel("layer")
        ax.set_ylabel("median dirty fraction")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        Path(a.plot).mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(Path(a.plot) / "dirty_per_layer.png", dpi=120)
        print(f"plot: {Path(a.plot) / 'dirty_per_layer.png'}")


if __name__ == "__main__":
    main()
