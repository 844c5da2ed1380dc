"""PNG plots of replay results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vqt._extras import require
from vqt.histories.replay import EditRecord


def plot_replay(records: Sequence[EditRecord], folder: Path) -> list[Path]:
    """ratio_cdf.png (MAC ratio of VQT and of prefix reuse) and dirty_per_layer.png."""
    import numpy as np

    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, vals in (("VQT", [r.ratio for r in records]), ("prefix reuse", [r.prefix_ratio for r in records])):
        v = np.sort(np.minimum(np.asarray(vals, dtype=float), 1e4))
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label)
    ax.set_xscale("log")
    paths.append(_finish(fig, ax, "ops reduction (dense MACs / MACs)", "fraction of edits", folder / "ratio_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    frac = np.asarray([[d / max(1, r.n_tokens) for d in r.dirty_per_layer] for r in records])
    layers = np.arange(1, frac.shape[1] + 1)
    ax.plot(layers, np.median(frac, 0), marker="o", label="median")
    ax.fill_between(layers, np.percentile(frac, 10, 0), np.percentile(frac, 90, 0), alpha=0.25, label="p10-p90")
    paths.append(_finish(fig, ax, "layer", "dirty fraction of positions", folder / "dirty_per_layer.png"))
    return paths


def _finish(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
