"""Stability metrics of a checkpoint on real edits: flip rates, dirty fractions, MAC ratios, perplexity."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from .model import VQTModel
from .replay import EditRecord, quantiles, replay
from .tokenizer import Tokenizer
from .train import evaluate_loss


def stability_report(model: VQTModel, revisions: Iterable[Mapping[str, Any]], tokenizer: Tokenizer,
                     window_tokens: int = 1024, max_edits: Optional[int] = None,
                     progress=None) -> tuple[dict[str, Any], list[EditRecord]]:
    """Replay real edits (MACs only, no timing) and summarize how far they spread."""
    records = []
    for rec in replay(model, revisions, tokenizer, window_tokens=window_tokens, max_edits=max_edits, baselines=False):
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
        "dirty_fraction_per_layer": np.median(frac, 0).tolist() if records else [],
    }
    return report, records


def perplexity(model: VQTModel, tokens: np.ndarray, seq_len: int = 1024) -> float:
    """exp(mean next-token loss) over consecutive windows of seq_len tokens (canonical positions)."""
    return math.exp(evaluate_loss(model, tokens, seq_len))
