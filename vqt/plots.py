"""PNG plots of replay results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .replay import EditRecord


def plot_replay(records: Sequence[EditRecord], folder: Path) -> list[Path]:
    """ratio_cdf.png (MAC ratio of VQT and of prefix reuse) and dirty_per_layer.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, vals in (("VQT", [r.ratio for r in records]), ("prefix reuse", [r.prefix_ratio for r in records])):
        v = np.sort(np.minimum(np.asarray(vals, dtype=float), 1e4))
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ops reduction (dense MACs / MACs)")
    ax.set_ylabel("fraction of edits")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(folder / "ratio_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    frac = np.asarray([[d / max(1, r.n_tokens) for d in r.dirty_per_layer] for r in records])
    layers = np.arange(1, frac.shape[1] + 1)
    ax.plot(layers, np.median(frac, 0), marker="o", label="median")
    ax.fill_between(layers, np.percentile(frac, 10, 0), np.percentile(frac, 90, 0), alpha=0.25, label="p10-p90")
    ax.set_xlabel("layer")
    ax.set_ylabel("dirty fraction of positions")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(folder / "dirty_per_layer.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
