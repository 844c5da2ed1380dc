"""Nearest-codeword search with certified radii: the one code assignment rule of the project."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Nearest:
    """Result of a codebook search over vectors shaped (n, G, gd)."""

    codes: torch.Tensor  # (n, G) long: nearest codeword per group
    d1: torch.Tensor  # (n, G) Euclidean distance to the nearest codeword
    d2: torch.Tensor  # (n, G) distance to the second nearest
    radius: torch.Tensor  # (n, G) certified radius: (d2 - d1) / 2 minus a float safety margin (may be < 0)

    @property
    def gap(self) -> torch.Tensor:
        return self.d2 - self.d1


def nearest(a: torch.Tensor, codebook: torch.Tensor) -> Nearest:
    """Nearest and second-nearest codewords of each group vector.

    a: (n, G, gd); codebook: (G, K, gd). Candidates come from the expanded form
    |a|^2 - 2 a.e + |e|^2 (one matmul); the two winners' distances are then recomputed
    directly, so d1 and d2 carry no cancellation error. A near-tie in the expanded form
    can still pick the wrong runner-up, so the radius subtracts sqrt(32 eps (|a|^2 + max|e|^2)),
    a bound on how far that can move a distance. Every code assignment in the project,
    dense or incremental, goes through this function.
    """
    n, g, gd = a.shape
    k = codebook.shape[1]
    e2 = codebook.pow(2).sum(-1)  # (G, K)
    a2 = a.pow(2).sum(-1)  # (n, G)
    d2_all = a2.unsqueeze(-1) - 2 * torch.einsum("ngd,gkd->ngk", a, codebook) + e2  # (n, G, K)
    if k >= 2:
        top = d2_all.topk(2, dim=-1, largest=False).indices  # (n, G, 2)
    else:  # pragma: no cover - config forbids K < 2
        top = torch.zeros(n, g, 2, dtype=torch.long, device=a.device)
    gidx = torch.arange(g, device=a.device).expand(n, g)
    cand = codebook[gidx.unsqueeze(-1), top]  # (n, G, 2, gd)
    dist = (a.unsqueeze(2) - cand).pow(2).sum(-1).sqrt()  # (n, G, 2)
    # Canonical tie-break, the same in every backend and for any number of rows searched together: the
    # lower index among equal distances (identical codewords tie exactly here, whatever the expanded form said).
    swap = (dist[..., 1] < dist[..., 0]) | ((dist[..., 1] == dist[..., 0]) & (top[..., 1] < top[..., 0]))
    codes = torch.where(swap, top[..., 1], top[..., 0])
    d1 = torch.minimum(dist[..., 0], dist[..., 1])
    d2 = torch.maximum(dist[..., 0], dist[..., 1])
    eps = torch.finfo(a.dtype).eps
    margin = (32 * eps * (a2 + e2.max(-1).values)).sqrt()
    return Nearest(codes, d1, d2, (d2 - d1) / 2 - margin)
