"""Vector quantization of attention outputs: codebooks, nearest-code search with margins, training losses."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vqt.modeling.config import VQTConfig
from vqt.ops.search import nearest


def separate_duplicates(codebook: torch.Tensor) -> torch.Tensor:
    """A copy of codebook (K, gd) in which codewords equal to an earlier one are moved apart by a small,
    distinct offset: identical codewords would make the nearest one a tie that the search order decides."""
    out = codebook.clone()
    scale = float(out.abs().max()) or 1.0
    for _ in range(4):  # an offset could land on another codeword: check again
        uniq, inverse = torch.unique(out, dim=0, return_inverse=True)
        if uniq.shape[0] == out.shape[0]:
            break
        seen: set[int] = set()
        for k, u in enumerate(inverse.tolist()):
            if u in seen:  # a later copy: nudge one coordinate by an offset no other copy gets
                out[k, k % out.shape[1]] += scale * 1e-3 * (1 + k / out.shape[0])
            seen.add(u)
    return out


class VectorQuantizer(nn.Module):
    """One layer's codebooks (G of them, K codewords of width gd each).

    Training: straight-through estimator, commitment loss, EMA codebook updates and
    dead-code restarts. Eval (or ``frozen``): the codebook never changes, which is what
    makes cached codes valid.
    """

    def __init__(self, cfg: VQTConfig) -> None:
        super().__init__()
        self.n_groups, self.group_dim, self.size = cfg.n_groups, cfg.group_dim, cfg.codebook_size
        self.commitment_weight = cfg.commitment_weight
        self.ema_decay = cfg.ema_decay
        self.dead_code_threshold = cfg.dead_code_threshold
        self.frozen = False  # True: never update the codebook, even in training mode
        self.enabled = True  # False: pass activations through unquantized (the dense warm-up phase)
        use_ema = cfg.ema_decay > 0
        self.codebook = nn.Parameter(torch.randn(self.n_groups, self.size, self.group_dim) * 0.1,
                                     requires_grad=not use_ema)
        if use_ema:
            self.register_buffer("ema_count", torch.ones(self.n_groups, self.size))
            self.register_buffer("ema_sum", self.codebook.detach().clone())

    def split(self, a: torch.Tensor) -> torch.Tensor:
        """(..., n_heads * head_dim) -> (..., G, gd)."""
        return a.reshape(*a.shape[:-1], self.n_groups, self.group_dim)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (n, G) -> quantized vectors (n, G, gd)."""
        return self.codebook[torch.arange(self.n_groups, device=codes.device), codes]

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize a (N, G, gd). Returns (straight-through output, codes (N, G), VQ loss)."""
        res = nearest(a.detach(), self.codebook.detach())
        q = self.decode(res.codes)
        loss = self.commitment_weight * (a - q.detach()).pow(2).mean()
        if self.codebook.requires_grad:
            loss = loss + (a.detach() - q).pow(2).mean()
        if self.training and not self.frozen and self.ema_decay > 0:
            self._ema_update(a.detach(), res.codes)
        return a + (q - a).detach(), res.codes, loss

    @torch.no_grad()
    def _ema_update(self, a: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = torch.nn.functional.one_hot(codes, self.size).to(a.dtype)  # (N, G, K)
        count = onehot.sum(0)  # (G, K)
        total = torch.einsum("ngk,ngd->gkd", onehot, a)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(count, alpha=1 - d)
        self.ema_sum.mul_(d).add_(total, alpha=1 - d)
        n = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace smoothing
        self.codebook.data.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        dead = self.ema_count < self.dead_code_threshold * n / self.size
        if dead.any():
            flat = a.reshape(-1, self.n_groups, self.group_dim)
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=a.device)
            gidx = dead.nonzero()[:, 0]
            self.codebook.data[dead] = flat[pick, gidx]
            self.ema_sum[dead] = flat[pick, gidx]
            self.ema_count[dead] = 1.0

    @torch.no_grad()
    def init_kmeans(self, a: torch.Tensor, iters: int = 20, generator: Optional[torch.Generator] = None,
                    seed_sample: int = 8192) -> None:
        """Set every codebook by k-means on sample vectors a (N, G, gd).

        Seeding is k-means++ on a random subsample of ``seed_sample`` vectors, keeping each vector's
        distance to its nearest seed up to date (one distance column per new seed: O(N K gd), not the
        O(N K^2 gd) of recomputing every distance). Codewords end up distinct (``separate_duplicates``),
        so no two can tie in a search."""
        n = a.shape[0]
        for g in range(self.n_groups):
            x = a[:, g].to(self.codebook.dtype)
            sample = x[torch.randperm(n, generator=generator)[:max(seed_sample, self.size)]]
            cent = torch.empty(self.size, x.shape[1], dtype=x.dtype, device=x.device)
            cent[0] = sample[torch.randint(0, sample.shape[0], (1,), generator=generator)]
            dmin = (sample - cent[0]).pow(2).sum(-1)
            for k in range(1, self.size):  # k-means++ seeding
                total = float(dmin.sum())
                if total > 0:
                    idx = int(torch.multinomial(dmin / total, 1, generator=generator))
                else:  # fewer distinct points than codewords: any point (duplicates are separated below)
                    idx = int(torch.randint(0, sample.shape[0], (1,), generator=generator))
                cent[k] = sample[idx]
                dmin = torch.minimum(dmin, (sample - cent[k]).pow(2).sum(-1))
            for _ in range(iters):
                assign = torch.cdist(x, cent).argmin(1)
                sums = torch.zeros_like(cent).index_add_(0, assign, x)
                counts = torch.bincount(assign, minlength=self.size).unsqueeze(1)
                cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
            self.codebook.data[g] = separate_duplicates(cent)
            if self.ema_decay > 0:
                self.ema_sum[g] = cent
                self.ema_count[g] = 1.0
