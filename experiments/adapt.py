"""Adapt SmolLM2-135M to VQT by distillation: convert (window + sink + codes fitted in closed form), then
train the student to follow the original full-attention model (vqt/pretrained/adapt.py: layer-wise output
matching first, then end-to-end KL), then write the model as fp16 deltas over the GGUF.

    python experiments/adapt.py --name qtc-w128-k64 --quantizer qtc --target-window 1024 --codebook-size 64 \
        --layerwise-steps 300 --steps 3000 --topk 64 --time-limit 150
    python experiments/adapt.py --name qtc-w128-k64 ... --resume     # a later session continues the run
    python experiments/adapt.py --dry-run --out /tmp/adapt-dry       # toy size: a 2-layer slice, a few steps

Runs live in ``$VQT_RUNS/<name>`` (default ~/.cache/vqt/runs, outside the work tree, which a new session
lays anew) unless ``--out`` names a folder. A new run also writes the converted student, before any
training, to OUT/model-converted. A folder that holds a checkpoint is only continued with
``--resume``; the conversion is deterministic, so a resumed run rebuilds the same student first.

Training text: the Anarchism history and the Rust RFC texts in ../shared/data (or --text FILE ...);
the held-out API-JSON articles are only evaluated. The model lands in OUT/model (load it with
``VQTModel.from_pretrained`` or ``--model OUT/model``); progress (tokens per second included) in
OUT/adapt_log.json, the final numbers in OUT/result.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqt.apps.cli import layer_list, positive_float, target_window  # noqa: E402
from vqt.histories.corpus import heldout_texts, rfc_texts, training_texts  # noqa: E402
from vqt.modeling.model import VQTModel  # noqa: E402
from vqt.apps.demo import demo_revisions  # noqa: E402
from vqt.pretrained.adapt import STATE_FILE, AdaptConfig, adapt, default_runs_dir, heldout_perplexity, merged  # noqa: E402,E501
from vqt.pretrained.convert import convert, save_delta, tokenizer_from_gguf  # noqa: E402


def training_tokens(tok, texts: list[str], limit: int) -> np.ndarray:
    """Token ids of the training text (EOS between documents), at most ``limit``."""
    if not texts:
        texts = [t for pair in zip(training_texts(every=100), rfc_texts()) for t in pair]
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text) + [0]
        if len(ids) >= limit:
            break
    return np.asarray(ids[:limit], dtype=np.int64)


def truncate_layers(model: VQTModel, n: int) -> VQTModel:
    """The first n blocks only (a toy-size model for --dry-run), same weights."""
    model.blocks = model.blocks[:n]
    model.config.n_layers = n
    if model.config.quantize_layers is not None:
        model.config.quantize_layers = [i for i in model.config.quantize_layers if i < n]
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--name", help=f"run name: the run lives in {default_runs_dir()}/NAME ($VQT_RUNS)")
    where.add_argument("--out", help="the run's folder, if not under $VQT_RUNS")
    p.add_argument("--resume", action="store_true", help="continue the checkpointed run in the folder")
    p.add_argument("--window", type=positive_float, default=128.0)
    p.add_argument("--sink", choices=["token", "logit", "none"], default="token")
    p.add_argument("--quantize-layers", type=layer_list, default=None)
    p.add_argument("--granularity", choices=["layer", "head", "product"], default="layer")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--quantizer", choices=["vq", "qtc"], default="vq")
    p.add_argument("--correction-rank", type=int, default=None, help="qtc: the correction's rank (default: full)")
    p.add_argument("--target-window", type=target_window, default="own",
                   help="qtc calibration target: own, full or a window (see vqt convert --help)")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--train-tokens", type=int, default=2_000_000)
    p.add_argument("--text", nargs="*", default=[], help="training text files (default: Anarchism + Rust RFCs)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train", choices=["norms", "lora", "all"], default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--margin-weight", type=float, default=0.1)
    p.add_argument("--layerwise-steps", type=int, default=0, help="first steps: layer-wise output matching")
    p.add_argument("--kl-lr", type=float, default=None, help="learning rate of the KL stage (default: --lr)")
    p.add_argument("--fix-codes", action="store_true",
                   help="KL stage: codes fixed (no straight-through gradient into the attention, codebooks frozen)")
    p.add_argument("--topk", type=int, default=0, help="cache the teacher's top-k log-probs per window (0: no cache)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--time-limit", type=float, default=None, help="minutes of training in this call")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU: 2 layers, 3 steps, short windows")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.dry_run:
        a.device, a.calib_tokens, a.train_tokens, a.steps, a.seq_len, a.eval_tokens = "cpu", 512, 4096, 3, 32, 256
        a.codebook_size = min(a.codebook_size, 16)
    out = Path(a.out) if a.out else default_runs_dir() / a.name
    if (out / STATE_FILE).is_file() and not a.resume:
        raise SystemExit(f"{out} holds a checkpointed run: add --resume to continue it, or choose another --name")
    if a.resume and not (out / STATE_FILE).is_file():
        raise SystemExit(f"--resume: {out} holds no checkpoint ({STATE_FILE}) to continue")
    out.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {out}", flush=True)
    t0 = time.time()
    tok = tokenizer_from_gguf()
    texts = [Path(f).read_text() for f in a.text]
    if a.dry_run:  # the built-in demo history: the plumbing runs without ../shared/data
        texts = [t for _, t in demo_revisions()]
    train = training_tokens(tok, texts, a.train_tokens)
    held = np.asarray(tok.encode("\n\n".join(texts[-2:] if a.dry_run else heldout_texts())), dtype=np.int64)
    student, teacher = convert(None, None, window=a.window, sink=a.sink, quantize_layers=a.quantize_layers,
                               granularity=a.granularity, codebook_size=a.codebook_size, quantizer=a.quantizer,
                               correction_rank=a.correction_rank, device=a.device)
    if a.dry_run:
        student, teacher = truncate_layers(student, 2), truncate_layers(teacher, 2)
    student.calibrate_codebooks(torch.from_numpy(train[: a.calib_tokens]).to(a.device), iters=10,
                                target_window=a.target_window, progress=True)
    print(f"{student.describe()}; converted in {time.time() - t0:.0f}s; {len(train)} training tokens", flush=True)
    cfg = AdaptConfig(steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, train=a.train,
                      lora_rank=a.lora_rank, margin_weight=a.margin_weight, eval_tokens=a.eval_tokens,
                      time_limit=None if a.time_limit is None else a.time_limit * 60,
                      layerwise_steps=a.layerwise_steps, kl_lr=a.kl_lr, fix_codes=a.fix_codes, topk=a.topk,
                      bf16=a.bf16, checkpoint_minutes=a.checkpoint_minutes)
    before = heldout_perplexity(student, held, 2 * a.seq_len, a.eval_tokens)
    if not a.dry_run and not a.resume:  # the student before any training, for frontier rows
        save_delta(student, out / "model-converted")
    factors = adapt(student, teacher, train, cfg, out, heldout=held)
    step = len(cfg.history)
    after = heldout_perplexity(merged(copy.deepcopy(student), factors), held, 2 * a.seq_len, a.eval_tokens)
    original = heldout_perplexity(teacher, held, 2 * a.seq_len, a.eval_tokens)
    print(f"held-out perplexity ({a.eval_tokens} tokens, {2 * a.seq_len}-token windows): original {original:.2f}, "
          f"converted {before:.2f}, adapted ({step} steps) {after:.2f}", flush=True)
    # The student's weights are still the base ones: the low-rank factors are written beside them.
    student.config.extra.update({"command": "python experiments/adapt.py " + " ".join(sys.argv[1:]),
                                 "adapt": {k: v for k, v in cfg.__dict__.items() if k != "history"},
                                 "steps_done": step, "heldout_ppl": {"original": original, "converted": before,
                                                                    "adapted": after},
                                 "seconds_this_call": round(time.time() - t0)})
    if not a.dry_run:
        size = save_delta(student, out / "model", factors)
        print(f"wrote {out / 'model'}: {size / 1e6:.1f} MB of fp16 deltas over the GGUF")
    (out / "result.json").write_text(json.dumps(student.config.extra, indent=1, default=str))


if __name__ == "__main__":
    main()
