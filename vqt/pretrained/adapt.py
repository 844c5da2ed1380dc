"""Adapting a converted model by distillation (DESIGN.md section 7): the student (window + sink + VQ)
learns the original full-attention model's next-token distributions.

Loss = KL(teacher || student) per token + the VQ commitment loss + ``margin_weight`` x a hinge on the
codes' relative margin (d2 - d1) / (d1 + d2) at positions past an edit, in paired edited/unedited
windows (codes with room to spare stay put when an edit nudges their inputs) + optionally the
edit-consistency loss (how far those positions' attention outputs move). What is trained:
``norms`` (RMSNorm gains, sinks; codebooks follow by EMA), ``lora`` (that plus rank-r adapters on
every attention and MLP projection), or ``all`` (every weight).

Resumable: the trainable tensors, optimizer, step, random states and history are checkpointed to
``<out>/adapt_state.pt`` every ``checkpoint_every`` steps (and when ``time_limit`` runs out); rerunning
with the same ``out`` continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from vqt.modeling.model import VQTModel, apply_delta
from vqt.training.train import consistency_loss, edited_copies, evaluate_loss

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
STATE_FILE = "adapt_state.pt"


@dataclass
class AdaptConfig:
    """Hyper-parameters of one adaptation run (recorded in the shipped model's config)."""

    steps: int = 400
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 1e-3
    train: str = "lora"  # "norms", "lora" or "all"
    lora_rank: int = 8
    margin_weight: float = 0.1  # hinge on the relative code margin at positions past an edit
    margin: float = 0.05  # wanted (d2 - d1) / (d1 + d2)
    consistency_weight: float = 0.0
    max_edit: int = 4  # tokens deleted / inserted by the paired edits
    checkpoint_every: int = 25
    eval_every: int = 50
    eval_tokens: int = 8192
    time_limit: Optional[float] = None  # seconds of training in this call (then checkpoint and return)
    seed: int = 0
    history: list = field(default_factory=list)  # (step, kl, margin loss, held-out ppl or None)

    def __post_init__(self) -> None:
        if self.train not in ("norms", "lora", "all"):
            raise ValueError(f"unknown train choice {self.train!r} (use 'norms', 'lora' or 'all')")
        if self.steps < 0 or self.seq_len < 16 or self.batch_size < 1 or self.lora_rank < 1:
            raise ValueError("steps >= 0, seq_len >= 16, batch_size >= 1 and lora_rank >= 1 are required")


class LoRA(nn.Module):
    """W -> W + B A (B starts at zero, so training starts from the converted weights)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


def add_lora(model: VQTModel, rank: int, generator: torch.Generator) -> dict[str, LoRA]:
    """Rank-``rank`` adapters on every projection of every block; returns them by linear name."""
    out = {}
    for i, block in enumerate(model.blocks):
        for name in LORA_TARGETS:
            lin = getattr(block, name)
            lora = LoRA(lin.out_features, lin.in_features, rank, generator).to(lin.weight)
            parametrize.register_parametrization(lin, "weight", lora)
            out[f"blocks.{i}.{name}"] = lora
    return out


def remove_lora(model: VQTModel, loras: dict[str, LoRA]) -> dict[str, torch.Tensor]:
    """Take the adapters off (base weights back) and return their factors, named for a delta checkpoint."""
    factors = {}
    for name, lora in loras.items():
        factors[f"{name}.lora_A"] = lora.A.detach().clone()
        factors[f"{name}.lora_B"] = lora.B.detach().clone()
    for i, block in enumerate(model.blocks):
        for name in LORA_TARGETS:
            lin = getattr(block, name)
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return factors


def _trainable(model: VQTModel, choice: str) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = choice == "all" or name.endswith("norm.weight") or ".sink_" in name or (
            choice == "lora" and (name.endswith(".A") or name.endswith(".B")))
        if name.endswith("quantizer.codebook") and model.config.ema_decay > 0:
            on = False  # EMA codebooks follow their inputs; the optimizer leaves them alone
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def margin_loss(model: VQTModel, attn: list[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                margin: float) -> torch.Tensor:
    """Mean hinge relu(margin - (d2 - d1) / (d1 + d2)) of the quantized layers' codes at (rows, cols)."""
    total, count = attn[0].new_zeros(()), 0
    for block, a in zip(model.blocks, attn):
        if block.quantizer is None:
            continue
        v = block.quantizer.split(a[rows, cols])  # (m, G, gd)
        cb = block.quantizer.codebook.detach()
        d = torch.cdist(v.transpose(0, 1), cb)  # (G, m, K), differentiable in v
        two = d.topk(2, dim=-1, largest=False).values
        rel = (two[..., 1] - two[..., 0]) / (two[..., 1] + two[..., 0]).clamp(min=1e-8)
        total = total + F.relu(margin - rel).mean()
        count += 1
    return total / max(count, 1)


def heldout_perplexity(model: VQTModel, tokens: np.ndarray, seq_len: int, limit: Optional[int] = None) -> float:
    """exp(mean next-token loss) over consecutive windows of ``seq_len`` (canonical positions), one at a time
    (a real vocabulary's logits are large)."""
    return math.exp(evaluate_loss(model, tokens, seq_len, limit, batch_size=1))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def adapt(student: VQTModel, teacher: VQTModel, tokens: np.ndarray, cfg: AdaptConfig, out: str | Path,
          heldout: Optional[np.ndarray] = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Distil ``teacher`` into ``student`` on ``tokens`` (resuming from ``out`` if a checkpoint is there).

    Returns the low-rank factors (empty unless ``cfg.train == "lora"``), with the student's adapters
    removed; the student keeps every other trained tensor. Stops after ``cfg.steps`` steps in all, or
    earlier when ``cfg.time_limit`` runs out (then call again to continue).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = student.device
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    loras = add_lora(student, cfg.lora_rank, gen) if cfg.train == "lora" else {}
    params = _trainable(student, cfg.train)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    state_path = out / STATE_FILE
    if state_path.is_file():  # resume
        st = torch.load(state_path, weights_only=False)
        student.load_state_dict(st["model"], strict=False)
        for name, lora in loras.items():
            lora.load_state_dict(st["lora"][name])
        opt.load_state_dict(st["opt"])
        step, cfg.history = st["step"], st["history"]
        gen.set_state(st["gen"])
        rng.setstate(st["rng"])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def checkpoint() -> None:
        _atomic_save({"model": {k: v for k, v in student.state_dict().items() if "parametrizations" not in k},
                      "lora": {k: v.state_dict() for k, v in loras.items()}, "opt": opt.state_dict(), "step": step,
                      "history": cfg.history, "gen": gen.get_state(), "rng": rng.getstate()}, state_path)
        (out / "adapt_log.json").write_text(json.dumps({**asdict(cfg), "step": step}, indent=1))

    t0 = time.time()
    student.train()
    B, T = cfg.batch_size, cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=step, desc="adapt", disable=not progress)
    while step < cfg.steps:
        if cfg.time_limit is not None and time.time() - t0 > cfg.time_limit:
            break
        starts = torch.randint(0, len(tokens) - T, (B,), generator=gen).tolist()
        batch = torch.from_numpy(np.stack([tokens[s:s + T].astype(np.int64) for s in starts]))
        pos = torch.arange(T, dtype=torch.float64).expand(B, T)
        tok2, pos2, pairs = edited_copies(batch, pos, cfg.max_edit, rng)
        with torch.no_grad():
            target = torch.log_softmax(teacher(batch.to(device))["logits"].float(), -1)
        res = student(torch.cat([batch, tok2]).to(device), torch.cat([pos, pos2]).to(device))
        kl = F.kl_div(torch.log_softmax(res["logits"][:B].float(), -1), target, log_target=True,
                      reduction="batchmean") / T
        rows = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(pairs)])
        src = torch.cat([s for s, _ in pairs])
        dst = torch.cat([d for _, d in pairs])
        attn = res["attn"]
        m_loss = 0.5 * (margin_loss(student, attn, rows, src, cfg.margin) +
                        margin_loss(student, attn, rows + B, dst, cfg.margin))
        loss = kl + res["vq_loss"] + cfg.margin_weight * m_loss
        if cfg.consistency_weight > 0:
            loss = loss + cfg.consistency_weight * consistency_loss(attn, B, pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ppl = None
        if heldout is not None and cfg.eval_every and step % cfg.eval_every == 0:
            ppl = heldout_perplexity(student, heldout, T * 2, cfg.eval_tokens)
        cfg.history.append((step, kl.item(), m_loss.item(), ppl))
        bar.update(1)
        bar.set_postfix(kl=f"{kl.item():.3f}", margin=f"{m_loss.item():.3f}", **({"ppl": f"{ppl:.1f}"} if ppl else {}))
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    student.eval()
    factors = remove_lora(student, loras)
    for p in student.parameters():
        p.requires_grad_(False)
    return factors


def merged(student: VQTModel, factors: dict[str, torch.Tensor]) -> VQTModel:
    """The student with its low-rank factors added into the weights (in place), as loading its delta
    checkpoint would (``apply_delta``), for inference."""
    student.load_state_dict(apply_delta(student.state_dict(), factors))
    return student
