"""Vector quantization of attention outputs: what is quantized and how (DESIGN.md section 1).

A quantizer owns three things, and the model and every backend read only these:

- the *search codebook* E (G, K, gd): a code is c = argmin_k |a - E[k]| per group of the attention
  output a (the certified skip and the flips are about this search);
- the *output codebook* (G, K, gd): what a code stands for after the search, folded with W_o into the
  lookup table (``VectorQuantizer``: E itself);
- an optional *correction* C (H hd, d): a linear map of the layer's own normed input h = RMSNorm(x) added
  to the output (``CorrectedQuantizer``, quantize-then-correct). It depends only on the position's own
  input, so a position whose input and codes did not change still keeps its output bitwise.

So the attention contribution to the residual is W_o (E_out[c] + C h), computed as a table lookup
plus (W_o C) h. A new way of quantizing is a new class here, not a branch in every backend.
"""

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
        self.fixed_codes = False  # True: codes are a fixed function of a (no gradient reaches a, no updates)
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

    def output_codebook(self) -> torch.Tensor:
        """(G, K, gd) what each code stands for in the layer's output (here: the searched codeword)."""
        return self.codebook

    def correction_factors(self) -> Optional[tuple[torch.Tensor, ...]]:
        """The factors whose product is the linear correction C (H hd, d) of the normed layer input added to
        the output (one full matrix, or two low-rank ones), or None."""
        return None

    def output(self, codes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The quantized attention output (n, G, gd) of codes (n, G) at normed inputs h (n, d)."""
        return self.decode(codes)

    def forward(self, a: torch.Tensor, h: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize a (N, G, gd) (h (N, d): the normed layer inputs, for a correction). Returns
        (straight-through output, codes (N, G), VQ loss)."""
        res = nearest(a.detach(), self.codebook.detach())
        if self.fixed_codes:
            return self.output(res.codes, h), res.codes, a.new_zeros((), dtype=torch.float32)
        q = self.decode(res.codes)
        loss = self.commitment_weight * (a - q.detach()).pow(2).mean()
        if self.codebook.requires_grad:
            loss = loss + (a.detach() - q).pow(2).mean()
        if self.training and not self.frozen and self.ema_decay > 0:
            self._ema_update(a.detach(), res.codes)
        return self._straight_through(a, q, res.codes, h), res.codes, loss

    def _straight_through(self, a: torch.Tensor, q: torch.Tensor, codes: torch.Tensor,
                          h: Optional[torch.Tensor]) -> torch.Tensor:
        """The output's value with the identity as a's gradient."""
        return a + (q - a).detach()

    @torch.no_grad()
    def calibrate(self, a: torch.Tensor, h: torch.Tensor, iters: int = 20,
                  generator: Optional[torch.Generator] = None, target: Optional[torch.Tensor] = None) -> None:
        """Fit this quantizer in closed form to sample attention outputs a (N, G, gd) and normed layer
        inputs h (N, d): k-means codebooks (``init_kmeans``). ``target`` (N, G, gd): what the output should
        reproduce, if not a (plain VQ's output is its codeword: it ignores it)."""
        self.init_kmeans(a, iters=iters, generator=generator)

    @torch.no_grad()
    def _ema_update(self, a: torch.Tensor, codes: torch.Tensor) -> None:
        a = a.to(self.codebook.dtype)  # (under bf16 autocast the attention outputs come in bfloat16)
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


class CorrectedQuantizer(VectorQuantizer):
    """Quantize-then-correct (QTC): the search is plain VQ (c = argmin_k |a - E[k]|), but the output is
    E_out[c] + C h, with a separate output codebook E_out and a linear correction C of the normed layer
    input h, full rank or, with ``cfg.correction_rank`` = r, C = L R (L (H hd, r), R (r, d)), which is
    what a shipped delta must hold. Both are fitted in closed form (``calibrate``); the search codebook
    stays the k-means one, so codes flip exactly as often as plain VQ's."""

    def __init__(self, cfg: VQTConfig) -> None:
        super().__init__(cfg)
        D, r = self.n_groups * self.group_dim, cfg.correction_rank
        self.rank = r
        self.out_codebook = nn.Parameter(self.codebook.detach().clone())  # (G, K, gd)
        if r is None:
            self.correction_weight = nn.Parameter(torch.zeros(D, cfg.d_model))  # (H hd, d)
        else:
            self.correction_left = nn.Parameter(torch.zeros(D, r))
            self.correction_right = nn.Parameter(torch.zeros(r, cfg.d_model))

    def output_codebook(self) -> torch.Tensor:
        return self.out_codebook

    def correction_factors(self) -> tuple[torch.Tensor, ...]:
        return (self.correction_weight,) if self.rank is None else (self.correction_left, self.correction_right)

    def output(self, codes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = self.out_codebook[torch.arange(self.n_groups, device=codes.device), codes]
        for f in reversed(self.correction_factors()):  # h C^T = (h R^T) L^T
            h = h @ f.T
        return out + self.split(h)

    def _straight_through(self, a: torch.Tensor, q: torch.Tensor, codes: torch.Tensor,
                          h: Optional[torch.Tensor]) -> torch.Tensor:
        if h is None:
            raise ValueError("a quantize-then-correct quantizer needs the normed layer inputs h")
        return self.output(codes, h) + (a - a.detach())

    @torch.no_grad()
    def calibrate(self, a: torch.Tensor, h: torch.Tensor, iters: int = 20,
                  generator: Optional[torch.Generator] = None, target: Optional[torch.Tensor] = None,
                  rounds: int = 3, ridge: float = 1e-2) -> None:
        """k-means search codebooks on a, then ``rounds`` alternations of a ridge regression of what the
        codes leave of ``target`` (default a) on [h, 1] (lambda = ``ridge`` x the mean diagonal of the Gram
        matrix, bias not penalized; reduced to the rank, if any) and per-cluster means of what the
        regression leaves. The bias is folded into the output codebook."""
        self.init_kmeans(a, iters=iters, generator=generator)
        codes = nearest(a.to(self.codebook.dtype), self.codebook).codes  # (N, G)
        goal = a if target is None else target
        out, *factors = fit_qtc(goal.double(), h.double(), codes, self.codebook.detach().double(), rounds, ridge,
                                self.rank)
        self.out_codebook.data.copy_(out)
        for param, value in zip(self.correction_factors(), factors):
            param.data.copy_(value)


def fit_qtc(a: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, rounds: int = 3,
            ridge: float = 1e-2, rank: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """Closed-form quantize-then-correct fit: a (N, G, gd) attention outputs, h (N, d) normed inputs, codes
    (N, G) their codes in ``codebook`` (G, K, gd). Minimizes |a - E_out[c] - C h - b|^2 + lambda |C|^2 by
    alternation. Returns (output codebook (G, K, gd) with the bias folded in, C (G gd, d)), or with ``rank``
    (output codebook, L (G gd, r), R (r, d)), C = L R: each regression reduced to the rank as reduced-rank
    regression does, by projecting C onto the top principal directions of its fitted values."""
    N, G, gd = a.shape
    K = codebook.shape[1]
    flat = a.reshape(N, G * gd)
    hb = torch.cat([h, h.new_ones(N, 1)], 1)  # (N, d + 1)
    gram = hb.T @ hb
    reg = ridge * gram.diagonal()[:-1].mean()
    gram.diagonal()[:-1].add_(reg)
    groups = torch.arange(G, device=a.device)
    index = codes + groups * K  # (N, G) a row of the (G K)-row codebook
    counts = torch.bincount(index.flatten(), minlength=G * K).unsqueeze(1)  # (G K, 1)
    used = (counts > 0).reshape(G, K, 1)
    out, basis = codebook.clone(), None
    for _ in range(rounds):
        coef = torch.linalg.solve(gram, hb.T @ (flat - out[groups, codes].reshape(N, G * gd)))  # (d + 1, G gd)
        if rank is not None:  # keep the rank directions of the fitted values h C^T that carry the most
            fitted = h @ coef[:-1]
            basis = torch.linalg.eigh(fitted.T @ fitted).eigenvectors[:, -rank:]  # (G gd, r)
            coef = torch.cat([coef[:-1] @ basis @ basis.T, coef[-1:]])
        rest = (flat - hb @ coef).reshape(N * G, gd)
        means = torch.zeros(G * K, gd, dtype=a.dtype, device=a.device).index_add_(0, index.flatten(), rest)
        means = (means / counts.clamp(min=1)).reshape(G, K, gd)
        # a code no sample chose: its searched codeword, less the average correction (bias included)
        unused = codebook - (h.mean(0) @ coef[:-1] + coef[-1]).reshape(G, 1, gd)
        out = torch.where(used, means, unused)
    out = out + coef[-1].reshape(G, 1, gd)
    if basis is None:
        return out, coef[:-1].T.contiguous()
    return out, basis.contiguous(), (coef[:-1] @ basis).T.contiguous()


QUANTIZERS = {"vq": VectorQuantizer, "qtc": CorrectedQuantizer}


def make_quantizer(cfg: VQTConfig) -> VectorQuantizer:
    """The quantizer ``cfg.quantizer`` names."""
    return QUANTIZERS[cfg.quantizer](cfg)
