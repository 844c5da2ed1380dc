"""Adapting a converted model by distillation (DESIGN.md section 7): the student (window + sink + VQ)
learns the original full-attention model, in two stages of one resumable run.

Stage 1, the first ``layerwise_steps`` steps: layer-wise output matching. Every block of the student is
fed the original model's input to that block and trained to reproduce the original block's output
(squared error relative to the block's own update): cheap, local targets, each block on its own, the
order LoLCATs uses to linearize attention.

Stage 2: end to end. Loss = KL(teacher || student) per token + the VQ commitment loss + ``margin_weight`` x a hinge on the
codes' relative margin (d2 - d1) / (d1 + d2) at positions past an edit, in paired edited/unedited
windows (codes with room to spare stay put when an edit nudges their inputs) + optionally the
edit-consistency loss (how far those positions' attention outputs move). What is trained:
``norms`` (RMSNorm gains, sinks, a quantize-then-correct layer's output codebook and correction; search
codebooks follow by EMA), ``lora`` (that plus rank-r adapters on every attention and MLP projection), or
``all`` (every weight). With ``topk`` > 0 the teacher's next-token distributions are computed once per
training window and kept as their top-k log-probabilities (the KL runs over those k tokens and the rest's
total), so later passes over a window skip the teacher; ``bf16`` runs the forward passes under bfloat16
autocast.

Resumable: the trainable tensors, optimizer, step, random states, history and the teacher cache are
checkpointed to ``<out>/adapt_state.pt`` every ``checkpoint_every`` steps or ``checkpoint_minutes``,
whichever comes first (and when ``time_limit`` runs out); rerunning with the same ``out`` continues
where it stopped. A run longer than a session is the plan: keep ``out`` outside the work tree
(``default_runs_dir``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
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
STAGE1_FILE = "adapt_state_stage1.pt"  # the checkpoint at the end of stage 1 (stage 2 can be rerun from a copy)


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
    checkpoint_minutes: float = 5.0  # also checkpoint when this long has passed since the last one
    layerwise_steps: int = 0  # the first steps match each block's output to the original block's (stage 1)
    kl_lr: Optional[float] = None  # stage 2's learning rate (None: lr); stage 2 starts with a fresh optimizer
    fix_codes: bool = False  # stage 2 keeps every code a fixed function of its attention output (see fix_codes)
    topk: int = 0  # >0: cache the teacher's top-k log-probs per training window (stage 2), 0: run it every step
    bf16: bool = False  # bfloat16 autocast for the forward passes (CPU or GPU)
    seed: int = 0
    history: list = field(default_factory=list)  # (step, kl, margin loss, held-out ppl or None)

    def __post_init__(self) -> None:
        if self.train not in ("norms", "lora", "all"):
            raise ValueError(f"unknown train choice {self.train!r} (use 'norms', 'lora' or 'all')")
        if self.steps < 0 or self.seq_len < 16 or self.batch_size < 1 or self.lora_rank < 1:
            raise ValueError("steps >= 0, seq_len >= 16, batch_size >= 1 and lora_rank >= 1 are required")
        if self.layerwise_steps < 0 or self.topk < 0 or self.checkpoint_minutes <= 0:
            raise ValueError(f"layerwise_steps >= 0, topk >= 0 and checkpoint_minutes > 0 are required, got "
                             f"{self.layerwise_steps}, {self.topk}, {self.checkpoint_minutes}")


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


CODE_PATH = ("attn_norm.", "wq.", "wk.", "wv.", "sink_")  # what a quantized block's codes are computed from


def fix_codes(model: VQTModel, fixed: bool = True) -> None:
    """Make every quantizer's codes a fixed function of its attention output (``fixed``): no straight-through
    gradient into the attention, no commitment loss, no codebook updates. Then only what reads the codes
    (output tables, corrections, W_o, the MLPs) learns. A straight-through gradient is wrong for a
    quantize-then-correct output, which does not follow a at all between code changes."""
    for block in model.blocks:
        if block.quantizer is not None:
            block.quantizer.fixed_codes = fixed


def _trainable(model: VQTModel, choice: str, codes_fixed: bool = False) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = choice == "all" or name.endswith(("norm.weight", "quantizer.out_codebook", "quantizer.correction_weight",
                                               "quantizer.correction_left", "quantizer.correction_right")) or (
            ".sink_" in name) or (
            choice == "lora" and (name.endswith(".A") or name.endswith(".B")))
        if name.endswith("quantizer.codebook") and model.config.ema_decay > 0:
            on = False  # EMA codebooks follow their inputs; the optimizer leaves them alone
        if codes_fixed and name.startswith("blocks."):
            i, rest = name.split(".", 2)[1:]
            if model.blocks[int(i)].quantizer is not None and rest.startswith(CODE_PATH):
                on = False
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


def default_runs_dir() -> Path:
    """Where long runs keep their checkpoints: ``$VQT_RUNS``, else ~/.cache/vqt/runs. Outside the work tree,
    which a new session lays anew, so a run can be resumed by a later session on the same machine."""
    return Path(os.environ.get("VQT_RUNS", Path.home() / ".cache" / "vqt" / "runs"))


def block_io(model: VQTModel, tokens: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input and the last one's output, (L + 1) tensors (B, T, d), of a batched forward."""
    x = model.embed(tokens)
    out = [x]
    for block in model.blocks:
        x = block(x, positions)[0]
        out.append(x)
    return out


def layerwise_loss(student: VQTModel, inputs: list[torch.Tensor], positions: torch.Tensor,
                   autocast=contextlib.nullcontext()) -> tuple[float, torch.Tensor]:
    """Stage 1: each student block fed the teacher's input to it, against the teacher block's output, in
    squared error relative to the teacher block's own update (so every layer weighs alike), plus the VQ
    loss. Back-propagated block by block (the blocks share nothing), so only one block's graph is alive;
    under ``torch.no_grad`` it only measures.
    The forward passes run under ``autocast``. Returns (the mean relative error, the VQ loss summed, detached)."""
    total, vq = 0.0, inputs[0].new_zeros(())
    L = len(student.blocks)
    for block, x, y in zip(student.blocks, inputs[:-1], inputs[1:]):
        with autocast:
            out, vq_loss, _ = block(x, positions)
        rel = (out.float() - y.float()).pow(2).mean() / (y.float() - x.float()).pow(2).mean().clamp(min=1e-12)
        loss = (rel + vq_loss) / L
        if loss.requires_grad:  # (nothing to train, or grad disabled: an evaluation)
            loss.backward()
        total += rel.item() / L
        vq = vq + vq_loss.detach()
    return total, vq


def topk_kl(student_logits: torch.Tensor, teacher_idx: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over k + 1 outcomes: the teacher's top-k tokens (``teacher_idx``, their
    log-probs ``teacher_logp``, (..., k)) and everything else together. Mean over positions."""
    logp = torch.log_softmax(student_logits.float(), -1)
    s_k = logp.gather(-1, teacher_idx)
    t_k = teacher_logp.float()
    t_rest = torch.log1p(-t_k.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_k.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (t_k.exp() * (t_k - s_k)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


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

    def stage_params(step: int) -> list[nn.Parameter]:
        fixed = cfg.fix_codes and step >= cfg.layerwise_steps
        fix_codes(student, fixed)
        return _trainable(student, cfg.train, codes_fixed=fixed)

    stage_lr = lambda step: cfg.lr if step < cfg.layerwise_steps or cfg.kl_lr is None else cfg.kl_lr  # noqa: E731
    step = 0
    teacher_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # window -> teacher top-k (ids, log-probs)
    state_path = out / STATE_FILE
    if state_path.is_file():  # resume
        st = torch.load(state_path, weights_only=False)
        student.load_state_dict(st["model"], strict=False)
        for name, lora in loras.items():
            lora.load_state_dict(st["lora"][name])
        step, cfg.history = st["step"], st["history"]
        gen.set_state(st["gen"])
        rng.setstate(st["rng"])
        teacher_cache = st.get("teacher_topk", {})
    params = stage_params(step)
    opt = torch.optim.Adam(params, lr=stage_lr(step))
    if state_path.is_file() and not (step == cfg.layerwise_steps and step):  # (stage 2 starts a fresh one)
        opt.load_state_dict(st["opt"])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def checkpoint() -> None:
        _atomic_save({"model": {k: v for k, v in student.state_dict().items() if "parametrizations" not in k},
                      "lora": {k: v.state_dict() for k, v in loras.items()}, "opt": opt.state_dict(), "step": step,
                      "history": cfg.history, "gen": gen.get_state(), "rng": rng.getstate(),
                      "teacher_topk": teacher_cache}, state_path)
        throughput = trained_tokens / train_seconds if train_seconds else None
        (out / "adapt_log.json").write_text(json.dumps({**asdict(cfg), "step": step,
                                                        "tokens_per_second_this_call": throughput}, indent=1))

    t0 = last_save = time.time()
    student.train()
    B, T = cfg.batch_size, cfg.seq_len
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    n_windows = (len(tokens) - 1) // T  # the cached stage samples whole windows, so each is taught once
    bar = tqdm(total=cfg.steps, initial=step, desc="adapt", disable=not progress, dynamic_ncols=True)
    trained_tokens, train_seconds = 0, 0.0
    while step < cfg.steps:
        if cfg.time_limit is not None and time.time() - t0 > cfg.time_limit:
            break
        t_step = time.time()
        pos = torch.arange(T, dtype=torch.float64).expand(B, T)
        layerwise = step < cfg.layerwise_steps
        if step == cfg.layerwise_steps and step:
            # Stage 2 starts with a fresh optimizer: the KL's gradients are orders of magnitude larger than
            # the layer-wise ones, and Adam's second moments from stage 1 would turn them into steps of
            # several times the learning rate for a hundred steps (one such switch took held-out
            # perplexity from 177 to 3,400 within 50 steps). The stage-1 checkpoint is kept beside the run.
            checkpoint()
            shutil.copyfile(state_path, out / STAGE1_FILE)
            params = stage_params(step)
            opt = torch.optim.Adam(params, lr=stage_lr(step))
        if cfg.topk and not layerwise:
            picks = torch.randint(0, n_windows, (B,), generator=gen).tolist()
            starts = [w * T for w in picks]
        else:
            starts = torch.randint(0, len(tokens) - T, (B,), generator=gen).tolist()
        batch = torch.from_numpy(np.stack([tokens[s:s + T].astype(np.int64) for s in starts]))
        opt.zero_grad(set_to_none=True)
        if layerwise:
            with torch.no_grad(), autocast:
                inputs = block_io(teacher, batch.to(device), pos.to(device))
            kl, vq = layerwise_loss(student, [x.to(student.dtype) for x in inputs], pos.to(device), autocast)
            m_loss = vq.new_zeros(())
        else:
            # Edited copies feed the code terms (margin, consistency); fixed codes need neither, so their
            # stage runs on the batch alone (half the forward).
            paired = not cfg.fix_codes
            inputs, positions = batch, pos
            if paired:
                tok2, pos2, pairs = edited_copies(batch, pos, cfg.max_edit, rng)
                inputs, positions = torch.cat([batch, tok2]), torch.cat([pos, pos2])
            with autocast:
                res = student(inputs.to(device), positions.to(device))
                if cfg.topk:
                    idx, logp = [torch.stack(t) for t in zip(*(
                        _teacher_topk(teacher_cache, teacher, tokens, w, T, cfg.topk, device) for w in picks))]
                    kl = topk_kl(res["logits"][:B], idx.to(device), logp.to(device))
                else:
                    with torch.no_grad():
                        target = torch.log_softmax(teacher(batch.to(device))["logits"].float(), -1)
                    kl = F.kl_div(torch.log_softmax(res["logits"][:B].float(), -1), target, log_target=True,
                                  reduction="batchmean") / T
                loss, m_loss = kl + res["vq_loss"], kl.new_zeros(())
                if paired:
                    rows = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(pairs)])
                    src = torch.cat([s for s, _ in pairs])
                    dst = torch.cat([d for _, d in pairs])
                    attn = res["attn"]
                    m_loss = 0.5 * (margin_loss(student, attn, rows, src, cfg.margin) +
                                    margin_loss(student, attn, rows + B, dst, cfg.margin))
                    loss = loss + cfg.margin_weight * m_loss
                    if cfg.consistency_weight > 0:
                        loss = loss + cfg.consistency_weight * consistency_loss(attn, B, pairs)
            loss.backward()
            kl = kl.item()
        opt.step()
        step += 1
        trained_tokens += B * T
        train_seconds += time.time() - t_step
        ppl = None
        if heldout is not None and cfg.eval_every and step % cfg.eval_every == 0:
            ppl = heldout_perplexity(student, heldout, T * 2, cfg.eval_tokens)
        m_loss = float(m_loss.detach())
        cfg.history.append((step, kl, m_loss, ppl))
        bar.update(1)
        bar.set_postfix(**{"layer err" if layerwise else "kl": f"{kl:.3f}"}, margin=f"{m_loss:.3f}",
                        tok_s=f"{trained_tokens / max(train_seconds, 1e-9):.0f}",
                        **({"ppl": f"{ppl:.1f}"} if ppl else {}))
        if step % cfg.checkpoint_every == 0 or time.time() - last_save > 60 * cfg.checkpoint_minutes:
            checkpoint()
            last_save = time.time()
    bar.close()
    checkpoint()
    fix_codes(student, False)
    student.eval()
    factors = remove_lora(student, loras)
    for p in student.parameters():
        p.requires_grad_(False)
    return factors


@torch.no_grad()
def _teacher_topk(cache: dict, teacher: VQTModel, tokens: np.ndarray, window: int, T: int, k: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k next-token ids and log-probs (T, k) over training window ``window``, computed
    on first use and kept in ``cache`` (ids int32, log-probs fp16: 6 bytes per token and k)."""
    if window not in cache:
        ids = torch.from_numpy(tokens[window * T:(window + 1) * T].astype(np.int64)).unsqueeze(0).to(device)
        logp = torch.log_softmax(teacher(ids)["logits"][0].float(), -1)
        top = logp.topk(k, -1)
        cache[window] = (top.indices.to(torch.int32).cpu(), top.values.to(torch.float16).cpu())
    idx, lp = cache[window]
    return idx.long(), lp.float()


def merged(student: VQTModel, factors: dict[str, torch.Tensor]) -> VQTModel:
    """The student with its low-rank factors added into the weights (in place), as loading its delta
    checkpoint would (``apply_delta``), for inference."""
    student.load_state_dict(apply_delta(student.state_dict(), factors))
    return student
