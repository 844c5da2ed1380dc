"""The built-in default: a short edit history written for this project, and a small model to replay it on."""

from __future__ import annotations

import random
from typing import Iterator

import torch

from vqt.modeling.config import VQTConfig
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer

FIRST_DRAFT = """\
The lighthouse on the northern cape was built in 1871 from granite quarried a few miles inland. \
For most of its life a keeper and his family lived in the cottage beside the tower, trimming the wick \
every evening and logging each passing ship in a ledger that is now kept at the county archive. \
The lamp was converted to electricity in 1934, and the last keeper left in 1968, when the light became automatic. \
Today the tower is open to visitors on summer weekends. From the gallery one can see the whole bay, \
the fishing harbour to the south and, on clear days, the hills on the far shore. \
A small museum in the cottage displays the original lens, the ledgers and photographs of the keepers."""

# Each step: (what the editor did, old snippet, new snippet), applied to the previous revision.
EDIT_SCRIPT: list[tuple[str, str, str]] = [
    ("fix a date", "built in 1871", "built in 1872"),
    ("insert a clause", "quarried a few miles inland.", "quarried a few miles inland and hauled to the cape by ox cart."),
    ("delete a sentence", " Today the tower is open to visitors on summer weekends.", ""),
    ("reword", "the whole bay", "the entire bay"),
    ("typo fix", "ledgers and photographs", "ledgers, and photographs"),
    ("append a sentence", "photographs of the keepers.",
     "photographs of the keepers. Volunteers from the village still repaint the tower every spring."),
    ("prepend a title", "The lighthouse on", "Northern Cape Light. The lighthouse on"),
    ("two edits at once", "electricity in 1934", "electricity in 1936"),
]


def demo_revisions() -> Iterator[tuple[str, str]]:
    """Yield (description, text) for the first draft and each scripted revision."""
    text = FIRST_DRAFT
    yield "first draft", text
    for what, old, new in EDIT_SCRIPT:
        if old not in text:
            raise AssertionError(f"demo script step {what!r}: {old!r} not in text")
        text = text.replace(old, new, 1)
        if what == "two edits at once":
            text = text.replace("the last keeper left", "the last keeper retired")
        yield what, text


def demo_history() -> list[dict]:
    """The scripted revisions as revision records (the columns of vqt.data loaders)."""
    return [{"doc_id": "demo", "title": "Northern Cape Light", "rev_id": i, "parent_id": i - 1,
             "timestamp": f"2026-01-{i + 1:02d}T00:00:00Z", "text": text, "comment": what, "sha1": ""}
            for i, (what, text) in enumerate(demo_revisions())]


def demo_model(tokenizer: Tokenizer, dtype: torch.dtype = torch.float64, seed: int = 0) -> VQTModel:
    """A small random VQT model whose codebooks are k-means fits to its own activations on the demo text.

    It is untrained, so its codes flip more than a trained model's would; it demonstrates
    exactness and the accounting, not the savings of a trained model.
    """
    torch.manual_seed(seed)
    cfg = VQTConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                    granularity="layer", codebook_size=64, window=64.0, max_len=1024)
    model = VQTModel(cfg).to(dtype).eval()
    rng = random.Random(seed)
    calib = [tok for _, text in demo_revisions() for tok in tokenizer.encode(text)]
    rng.shuffle(calib)
    model.calibrate_codebooks(tokenizer.encode(FIRST_DRAFT) + calib[:256], iters=10, seed=seed)
    return model
