"""Document classification accuracy of a VQT model next to its dense twin (one recipe for both).

    python experiments/classify.py runs/w32-layer-k256/model runs/w32-twin/model

Features: mean-pooled final hidden states; head: L2-regularized logistic regression,
5-fold cross-validated accuracy. Data: the longest human-rated documents of the
vadersentiment 3.3.2 sdist (NYT editorials and Amazon reviews), downloaded from PyPI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqt.classify import LONG_SETS, cross_val_accuracy, load_documents, pooled_features  # noqa: E402
from vqt.cli import load_model  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--sets", nargs="+", default=list(LONG_SETS))
    p.add_argument("--folds", type=int, default=5)
    a = p.parse_args()
    texts, labels = load_documents(a.sets)
    print(f"{len(texts)} documents from {', '.join(a.sets)}; {sum(labels)} positive "
          f"(majority baseline {max(sum(labels), len(labels) - sum(labels)) / len(labels):.3f})")
    for spec in a.models:
        model, name, tok = load_model(spec, torch.float32)
        acc, sd = cross_val_accuracy(pooled_features(model, tok, texts), labels, folds=a.folds)
        print(f"{name:<40} accuracy {acc:.4f} +- {sd:.4f} ({a.folds}-fold)")


if __name__ == "__main__":
    main()
