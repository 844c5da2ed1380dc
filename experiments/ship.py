"""Ship a trained checkpoint as the default model: fp16 weights in data/vqt-small with its recorded metrics.

    python experiments/ship.py runs/w32-layer-k256/model --twin runs/w32-twin/model

Records the held-out perplexity of the fp16-rounded model (evaluated in float32, 512-token
windows), its twin's, and the training command, in the shipped config's ``extra``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from fractions import Fraction
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from vqt.histories.corpus import heldout_tokens  # noqa: E402
from vqt.modeling.model import VQTModel  # noqa: E402
from vqt.text.tokenizer import DATA_DIR, Tokenizer  # noqa: E402
from vqt.training.train import evaluate_loss  # noqa: E402

SHIPPED_EVAL_LEN = 512


def shipped_perplexity(model: VQTModel) -> float:
    """The metric recorded at shipping time and re-checked by the tests."""
    return math.exp(evaluate_loss(model, heldout_tokens(Tokenizer.default()), SHIPPED_EVAL_LEN))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--twin", default=None)
    p.add_argument("--out", default=str(DATA_DIR / "vqt-small"))
    p.add_argument("--note", default="", help="free text stored with the model (e.g. the stability numbers)")
    p.add_argument("--min-spacing", default=None,
                   help="record this minimum stable-position spacing (e.g. 1/128 for a model trained with "
                        "--position-edits) instead of the checkpoint's")
    a = p.parse_args()
    model = VQTModel.from_pretrained(a.checkpoint).half()
    if a.min_spacing:
        model.config.min_spacing = float(Fraction(a.min_spacing))
    model.config.extra["heldout_ppl_fp16_512"] = round(shipped_perplexity(model.float()), 4)
    if a.twin:
        twin = VQTModel.from_pretrained(a.twin).half().float()
        model.config.extra["twin_heldout_ppl_fp16_512"] = round(shipped_perplexity(twin), 4)
        model.config.extra["twin"] = a.twin
    model.config.extra["source"] = a.checkpoint
    if a.note:
        model.config.extra["note"] = a.note
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    model.half().save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"shipped {a.checkpoint} -> {out} ({size:.1f} MB): {model.config.extra}")


if __name__ == "__main__":
    main()
