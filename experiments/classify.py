"""Document classification accuracy of a VQT model next to its dense twin (one recipe for both).

    python experiments/classify.py runs/w32-layer-k256/model runs/w32-twin/model

Features: mean-pooled final hidden states; head: L2-regularized logistic regression;
accuracy over 10 differently shuffled 5-fold splits, the same splits for every model, and the
paired difference between the first model and each other one. Data: the longest human-rated documents of the
vadersentiment 3.3.2 sdist (NYT editorials and Amazon reviews), downloaded from PyPI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqt.training.classify import LONG_SETS, fold_accuracies, load_documents, pooled_features  # noqa: E402
from vqt.apps.loading import load_model  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="the first is compared with each of the others on identical splits")
    p.add_argument("--sets", nargs="+", default=list(LONG_SETS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="differently shuffled k-fold splits")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of each document")
    a = p.parse_args()
    texts, labels = load_documents(a.sets)
    print(f"{len(texts)} documents from {', '.join(a.sets)}; {sum(labels)} positive "
          f"(majority baseline {max(sum(labels), len(labels) - sum(labels)) / len(labels):.3f})")
    accs = {}
    for spec in a.models:
        model, name, tok = load_model(spec, torch.float32)
        feats = pooled_features(model, tok, texts, a.max_tokens)
        accs[name] = np.asarray(fold_accuracies(feats, labels, a.folds, a.repeats))
        print(f"{name:<40} accuracy {accs[name].mean():.4f} (fold std {accs[name].std():.4f}, "
              f"{a.repeats} x {a.folds}-fold)")
    first, *others = accs
    for other in others:
        # Paired by split; the std error treats the repeats' means as independent (folds within a repeat are not).
        per_repeat = (accs[first] - accs[other]).reshape(a.repeats, a.folds).mean(1)
        sem = per_repeat.std(ddof=1) / np.sqrt(a.repeats) if a.repeats > 1 else float("nan")
        print(f"{first} - {other}: {100 * per_repeat.mean():+.2f} points (+- {100 * sem:.2f} standard error)")


if __name__ == "__main__":
    main()
