"""Train a VQT model (or its dense twin) on the Anarchism history; resumable.

    python experiments/train.py --out runs/w32 --window 32 --steps 1200
    python experiments/train.py --out runs/w32-twin --window 32 --steps 1200 --dense-twin

Re-running the same command resumes from runs/NAME/checkpoint. The trained model is
written to runs/NAME/model, with the training command and final metrics in its config.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqt import VQTConfig  # noqa: E402
from vqt.histories.corpus import heldout_tokens, train_tokens  # noqa: E402
from vqt.text.tokenizer import Tokenizer  # noqa: E402
from vqt.training.train import TrainConfig, evaluate_loss, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--pos-encoding", choices=["rope", "none"], default="rope")
    p.add_argument("--granularity", choices=["layer", "head", "product"], default="layer")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--commitment", type=float, default=0.25)
    p.add_argument("--dense-twin", action="store_true", help="same architecture and recipe, quantizer off")
    p.add_argument("--jitter", type=float, default=0.25, help="position jitter during training")
    p.add_argument("--position-edits", type=float, default=0.0,
                   help="per sequence, probability of a squeezed run and of a gap, as edits leave positions")
    p.add_argument("--min-spacing", default=None, help="recorded in the model for its documents (default: 1/128 "
                   "with --position-edits, which trains on runs squeezed that tight, else 1/32)")
    p.add_argument("--vq-start", type=int, default=200)
    p.add_argument("--consistency-start", type=int, default=-1)
    p.add_argument("--consistency-weight", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--init", default="", help="fine-tune from this model directory (its architecture wins)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    tok = Tokenizer.default()
    if a.init:
        from vqt.modeling.model import VQTModel

        cfg = VQTModel.from_pretrained(a.init).config
        cfg.extra = {"init": a.init}
    else:
        cfg = VQTConfig(vocab_size=tok.vocab_size, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                        n_kv_heads=a.kv_heads, window=a.window, pos_encoding=a.pos_encoding, granularity=a.granularity,
                        codebook_size=a.codebook_size, commitment_weight=a.commitment, quantize=not a.dense_twin)
    t = TrainConfig(out_dir=a.out, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=a.seed,
                    position_jitter=a.jitter, position_edits=a.position_edits, vq_start=a.vq_start, consistency_start=a.consistency_start,
                    consistency_weight=a.consistency_weight, threads=a.threads, eval_every=a.eval_every, init_from=a.init,
                    ckpt_every=a.eval_every)
    cfg.min_spacing = float(Fraction(a.min_spacing or ("1/128" if a.position_edits > 0 else "1/32")))
    train_ids, val_ids = train_tokens(tok), heldout_tokens(tok)
    t0 = time.time()
    model = train(cfg, t, train_ids, val_ids, device=a.device)
    val = evaluate_loss(model, val_ids, 512)
    model.config.min_spacing = cfg.min_spacing  # (a run resumed from an older checkpoint gets it too)
    model.config.extra.update({
        "command": "python experiments/train.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "train_seconds_this_run": round(time.time() - t0),
        "heldout_loss_512": round(val, 4), "heldout_ppl_512": round(math.exp(val), 2),
    })
    model.save_pretrained(Path(a.out) / "model")
    print(f"{a.out}: held-out perplexity {math.exp(val):.2f} (512-token windows); model in {a.out}/model")


if __name__ == "__main__":
    main()
