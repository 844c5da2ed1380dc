"""Document classification on pooled final features: the accuracy side of the VQT trade-off.

Data: the human-rated sentiment sets shipped in the ``vadersentiment==3.3.2`` source
distribution on PyPI (Hutto & Gilbert, ICWSM 2014, in additional_resources/). Sentences
carry ids ``doc_sentence``; we join each document's sentences in order and label it
positive when the mean rating of its sentences is > 0. The NYT editorial and Amazon
review sets give the longest documents (about 1,100 and 770 characters at the median).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from vqt.histories.corpus import CACHE
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer

VADER_SDIST = "vadersentiment==3.3.2"
LONG_SETS = ("nytEditorialSnippets", "amazonReviewSnippets")


def vader_sdist(cache: Path = CACHE / "vader") -> Path:
    """Path of the vadersentiment sdist, downloaded from PyPI into the cache on first use."""
    found = sorted(cache.glob("vaderSentiment-*.tar.gz")) + sorted(cache.glob("vadersentiment-*.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          VADER_SDIST, "-d", str(cache)], capture_output=True, text=True)
    found = sorted(cache.glob("*.tar.gz"))
    if res.returncode != 0 or not found:
        raise RuntimeError(f"could not download the {VADER_SDIST} sdist from PyPI: {res.stderr.strip()[-300:]}")
    return found[0]


def load_documents(sets: Sequence[str] = LONG_SETS, sdist: Optional[Path] = None) -> tuple[list[str], list[int]]:
    """(texts, labels) of whole documents from the ground-truth files of ``sets``."""
    sdist = sdist or vader_sdist()
    texts, labels = [], []
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
            for name in sets:
                member = next((m for m in inner.getmembers() if m.name.endswith(f"{name}_GroundTruth.txt")), None)
                if member is None:
                    raise ValueError(f"{sdist} has no {name}_GroundTruth.txt")
                docs: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
                for line in inner.extractfile(member).read().decode("utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) < 3:
                        continue
                    doc, _, sent = parts[0].partition("_")
                    docs[f"{name}/{doc}"].append((int(sent or 0), float(parts[1]), parts[2].strip()))
                for sents in docs.values():
                    sents.sort()
                    texts.append(" ".join(s for _, _, s in sents))
                    labels.append(int(np.mean([r for _, r, _ in sents]) > 0))
    return texts, labels


@torch.no_grad()
def pooled_features(model: VQTModel, tokenizer: Tokenizer, texts: Sequence[str],
                    max_tokens: Optional[int] = None) -> torch.Tensor:
    """Mean of the final hidden states of each text (the Document.pooled feature) over its first
    ``max_tokens`` tokens (default: the model's max_len), (N, d)."""
    feats = []
    for text in texts:
        ids = tokenizer.encode(text)[: min(max_tokens or model.config.max_len, model.config.max_len)] or [0]
        feats.append(model.forward_dense(ids).hidden.mean(0).float())
    return torch.stack(feats)


def fold_accuracies(x: torch.Tensor, y: Sequence[int], folds: int = 5, repeats: int = 1, seed: int = 0,
                    weight_decay: float = 1e-3, steps: int = 300) -> list[float]:
    """Held-out accuracy of a logistic-regression head on every fold of ``repeats`` shuffled
    ``folds``-fold splits (the splits depend only on ``seed``, so two feature sets given the same
    seed are compared on identical splits)."""
    yt = torch.as_tensor(y, dtype=torch.long)
    accs = []
    for r in range(repeats):
        perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed + r))
        for f in range(folds):
            test = perm[f::folds]
            train = torch.cat([perm[i::folds] for i in range(folds) if i != f])
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
            xs = (x - mu) / sd
            torch.manual_seed(seed)  # the head's initialization (LBFGS converges to nearly the same optimum anyway)
            head = torch.nn.Linear(x.shape[1], 2)
            opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(head(xs[train]), yt[train]) \
                    + weight_decay * head.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                accs.append(float((head(xs[test]).argmax(1) == yt[test]).float().mean()))
    return accs
