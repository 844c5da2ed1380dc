"""Language-model training with VQ losses and edit-stability training; resumable.

One recipe trains both a VQT model and its dense twin (``quantize=False``, same
architecture, data order and schedule), so quality comparisons are like for like.

Phases, by step:
  [0, vq_start)             plain LM training with the quantizer bypassed;
  vq_start                  codebooks initialised by k-means on the model's own activations;
  [vq_start, steps)         LM + commitment loss, EMA codebooks, dead-code restarts;
  [consistency_start, steps) plus the edit-consistency loss (weight ramps up linearly): pairs
                            of a text and a randomly edited copy in stable positions; the
                            pre-quantization attention outputs of unedited positions after the
                            edit are pulled together, so that edits flip fewer codes.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from vqt.modeling.config import VQTConfig
from vqt.modeling.model import VQTModel


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    position_jitter: float = 0.25  # training spacing ~ U[1 - j, 1 + j]: prepares RoPE for stable positions
    # Per sequence, with this probability each: a run of 1-128 tokens squeezed into one position unit (as an
    # insertion leaves them) and a gap of 2-32 units (as a deletion leaves one): positions edits really produce.
    position_edits: float = 0.0
    vq_start: int = 200  # step at which the quantizer is switched on (k-means init)
    consistency_start: int = -1  # step at which the edit-consistency loss starts; -1 = never
    consistency_weight: float = 1.0  # final weight (ramped linearly from consistency_start)
    max_edit_tokens: int = 4  # random edits delete and insert up to this many tokens each
    eval_every: int = 100
    eval_tokens: int = 16384  # held-out tokens used for the periodic validation loss
    ckpt_every: int = 100
    threads: int = 0  # torch threads (0 = leave the default)
    init_from: str = ""  # start from this model directory's weights (fine-tuning); codebooks kept
    stop_after: int = 0  # end this run after this many steps (checkpointed; rerun to resume); 0 = run to the end
    extra: dict = field(default_factory=dict)


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def sample_batch(tokens: np.ndarray, t: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens and jittered, strictly increasing positions."""
    starts = torch.randint(0, len(tokens) - t.seq_len - 1, (t.batch_size,), generator=gen).tolist()
    batch = torch.from_numpy(np.stack([tokens[s:s + t.seq_len + 1].astype(np.int64) for s in starts]))
    spacing = 1.0 + t.position_jitter * (2 * torch.rand(t.batch_size, t.seq_len, generator=gen, dtype=torch.float64) - 1)
    if t.position_edits > 0:
        edit_spacing(spacing, t.position_edits, gen)
    positions = torch.cumsum(spacing, 1) - spacing[:, :1]
    return batch, positions


def edit_spacing(spacing: torch.Tensor, p: float, gen: torch.Generator) -> None:
    """Give some rows (B, T) of spacings what stable positions look like after edits, in place: with
    probability p a run of L in [1, 128] tokens (log-uniform) squeezed into one unit, with probability p
    a gap of G in [2, 32] units (log-uniform) before one token."""
    B, T = spacing.shape
    u = torch.rand(B, 6, generator=gen, dtype=torch.float64)
    for b in range(B):
        if u[b, 0] < p:
            L = min(int(128 ** u[b, 1]), T - 2)
            s = 1 + int(u[b, 2] * (T - L - 1))
            spacing[b, s:s + L + 1] = 1.0 / (L + 1)
        if u[b, 3] < p:
            spacing[b, 1 + int(u[b, 4] * (T - 1))] = 2.0 * 16.0 ** float(u[b, 5])


def edited_copies(tokens: torch.Tensor, positions: torch.Tensor, max_edit: int, rng: random.Random
                  ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A randomly edited copy of each row, in stable positions, plus aligned unedited positions after the edit.

    Returns (tokens', positions', pairs) where pairs[b] = (index in the original, index in the copy).
    Rows keep their length T: the copy is truncated or padded at the end (padding is never aligned).
    """
    B, T = tokens.shape
    out_tok, out_pos, pairs = tokens.clone(), positions.clone(), []
    for b in range(B):
        p = rng.randrange(T // 8, T // 2)
        dl, il = rng.randint(0, max_edit), rng.randint(0, max_edit)
        if dl == il == 0:
            il = 1
        ins = tokens[b, torch.randint(0, T, (il,))]
        lo, hi = positions[b, p - 1], positions[b, p + dl]
        ins_pos = lo + (hi - lo) * torch.arange(1, il + 1, dtype=torch.float64) / (il + 1)
        tok = torch.cat([tokens[b, :p], ins, tokens[b, p + dl:]])
        pos = torch.cat([positions[b, :p], ins_pos, positions[b, p + dl:]])
        if tok.numel() < T:  # pad with spacing-1 positions after the end; causal, so nothing earlier sees them
            extra = T - tok.numel()
            tok = torch.cat([tok, tok.new_zeros(extra)])
            pos = torch.cat([pos, pos[-1] + torch.arange(1, extra + 1, dtype=torch.float64)])
        out_tok[b], out_pos[b] = tok[:T], pos[:T]
        src = torch.arange(p + dl, T)
        dst = src - dl + il
        keep = dst < T
        pairs.append((src[keep], dst[keep]))
    return out_tok, out_pos, pairs


def consistency_loss(attn: list[torch.Tensor], B: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean squared movement of aligned attention outputs, relative to their mean squared norm."""
    b_idx = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(pairs)])
    src = torch.cat([s for s, _ in pairs])
    dst = torch.cat([d for _, d in pairs])
    total = attn[0].new_zeros(())
    for a in attn:
        x, y = a[:B][b_idx, src], a[B:][b_idx, dst]
        total = total + (x - y).pow(2).sum(-1).mean() / x.detach().pow(2).sum(-1).mean().clamp(min=1e-8)
    return total / len(attn)


def set_vq(model: VQTModel, enabled: bool) -> None:
    for block in model.blocks:
        if block.quantizer is not None:
            block.quantizer.enabled = enabled


@torch.no_grad()
def evaluate_loss(model: VQTModel, tokens: np.ndarray, seq_len: int, limit: Optional[int] = None,
                  batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over consecutive windows (canonical positions), ``batch_size`` at a time."""
    was = model.training
    model.eval()
    arr = tokens[:limit] if limit else tokens
    n = (len(arr) - 1) // seq_len
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        rows = [arr[j * seq_len:(j + 1) * seq_len + 1].astype(np.int64) for j in range(i, min(n, i + batch_size))]
        batch = torch.from_numpy(np.stack(rows)).to(model.device)
        out = model(batch[:, :-1], targets=batch[:, 1:])
        total += float(out["lm_loss"]) * len(rows)
        count += len(rows)
    model.train(was)
    return total / max(count, 1)


def _save(model: VQTModel, opt: torch.optim.Optimizer, step: int, gen: torch.Generator, rng: random.Random,
          out: Path) -> None:
    tmp = out / "checkpoint.tmp"
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "step": step, "gen": gen.get_state(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "vq_enabled": any(getattr(b.quantizer, "enabled", False) for b in model.blocks)}, tmp / "trainer.pt")
    final = out / "checkpoint"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)


def train(model_cfg: VQTConfig, t: TrainConfig, train_tokens: np.ndarray, val_tokens: np.ndarray,
          device: str = "cpu", progress: bool = True) -> VQTModel:
    """Train (or resume from ``t.out_dir/checkpoint``) and return the model in eval mode.

    Resuming is exact: a run stopped and resumed ends with the same weights as an uninterrupted one.

    Writes ``log.csv`` (one row per step), ``eval.jsonl`` (validation loss) and a resumable
    ``checkpoint/`` every ``ckpt_every`` steps; the final model goes to ``t.out_dir/model``.
    """
    if t.threads:
        torch.set_num_threads(t.threads)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(t), indent=2))
    torch.manual_seed(t.seed)
    model = VQTModel(model_cfg).to(device)
    if t.init_from:
        model.load_state_dict(VQTModel.from_pretrained(t.init_from, dtype=torch.float32).state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                            weight_decay=t.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(t.seed)
    rng = random.Random(t.seed)
    step = 0
    ckpt = out / "checkpoint"
    vq_on = bool(t.init_from) and model_cfg.quantize  # a fine-tuned model's codebooks are already fitted
    if ckpt.is_dir():
        model = VQTModel.from_pretrained(ckpt, map_location=device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                weight_decay=t.weight_decay, betas=(0.9, 0.95))
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        step, vq_on = state["step"], state["vq_enabled"]
        gen.set_state(state["gen"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming {out} at step {step}")
    model.train()
    set_vq(model, vq_on)
    log_new = not (out / "log.csv").exists() or step == 0
    log_f = open(out / "log.csv", "w" if log_new else "a", newline="")
    log = csv.writer(log_f)
    if log_new:
        log.writerow(["step", "lr", "lm_loss", "vq_loss", "consistency", "tokens_per_s"])
    bar = tqdm(total=t.steps, initial=step, disable=not progress, desc=out.name, dynamic_ncols=True)
    first_step = step
    try:
        while step < t.steps:
            if t.stop_after and step - first_step >= t.stop_after:
                _save(model, opt, step, gen, rng, out)
                break
            t0 = time.perf_counter()
            if model_cfg.quantize and not vq_on and step >= t.vq_start:
                _init_codebooks(model, train_tokens, t, gen)
                vq_on = True
            batch, positions = sample_batch(train_tokens, t, gen)
            batch, positions = batch.to(device), positions.to(device)
            inp, tgt = batch[:, :-1], batch[:, 1:]
            use_cons = 0 <= t.consistency_start <= step
            if use_cons:
                tok2, pos2, pairs = edited_copies(inp.cpu(), positions.cpu(), t.max_edit_tokens, rng)
                res = model(torch.cat([inp, tok2.to(device)]), torch.cat([positions, pos2.to(device)]))
                B = inp.shape[0]
                logits = res["logits"][:B]
                lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())
                cons = consistency_loss(res["attn"], B, pairs)
                ramp = min(1.0, (step - t.consistency_start + 1) / max(1, (t.steps - t.consistency_start) // 2))
                loss = lm + res["vq_loss"] + t.consistency_weight * ramp * cons
            else:
                res = model(inp, positions, targets=tgt)
                lm, cons = res["lm_loss"], torch.zeros(())
                loss = lm + res["vq_loss"]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            step += 1
            tps = inp.numel() * (2 if use_cons else 1) / (time.perf_counter() - t0)
            lm_v, vq_v, cons_v = (float(v.detach()) for v in (lm, res["vq_loss"], cons))
            log.writerow([step, f"{lr_at(step - 1, t):.3g}", f"{lm_v:.4f}", f"{vq_v:.4f}", f"{cons_v:.4f}", f"{tps:.0f}"])
            bar.update(1)
            bar.set_postfix(lm=f"{lm_v:.3f}", vq=f"{vq_v:.3f}", cons=f"{cons_v:.3f}")
            if step % t.eval_every == 0 or step == t.steps:
                val = evaluate_loss(model, val_tokens, t.seq_len, t.eval_tokens)
                with open(out / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "val_loss": val, "val_ppl": math.exp(val), "vq": vq_on}) + "\n")
                bar.write(f"step {step}: val loss {val:.3f} (ppl {math.exp(val):.1f})")
            if step % t.ckpt_every == 0 or step == t.steps:
                log_f.flush()
                _save(model, opt, step, gen, rng, out)
    finally:
        bar.close()
        log_f.close()
    model.eval()
    if step >= t.steps:
        model.save_pretrained(out / "model")
    return model


def _init_codebooks(model: VQTModel, tokens: np.ndarray, t: TrainConfig, gen: torch.Generator) -> None:
    """k-means codebooks on the model's own activations over a few thousand training tokens."""
    start = int(torch.randint(0, len(tokens) - 8192, (1,), generator=gen))
    sample = torch.from_numpy(tokens[start:start + 4096].astype(np.int64))
    was = model.training
    model.eval()
    model.calibrate_codebooks(sample, iters=15, seed=t.seed)
    model.train(was)
    set_vq(model, True)
