"""Token positions that do not shift under edits (DESIGN.md section 3).

``stable`` mode: kept tokens keep their positions, inserted tokens are spread evenly
between their neighbours, deletions leave gaps; where spacing gets tighter than
``min_spacing`` or wider than ``max_spacing`` a window of tokens around the spot is
renumbered evenly (those tokens are recomputed). ``canonical`` mode renumbers 0..n-1
after every edit: exact against the standard model, and as costly as prefix reuse.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import numpy as np

PositionMode = Literal["stable", "canonical"]
POSITION_MODES = ("stable", "canonical")


@dataclass(frozen=True)
class PositionPolicy:
    """How positions follow edits: the mode, and when and how stable positions are renumbered."""

    mode: PositionMode = "stable"
    # Tighter than this -> renumber a window. None: the model's own ``config.min_spacing`` (how squeezed
    # it saw positions in training); ``for_model`` fills it in.
    min_spacing: Optional[float] = None
    max_spacing: float = 32.0  # a gap wider than this (after deletions) -> renumber a window
    target_low: float = 0.5  # a renumbered window ends with a spacing inside [target_low, target_high]
    target_high: float = 4.0

    def __post_init__(self) -> None:
        if self.mode not in ("stable", "canonical"):
            raise ValueError(f"unknown position_mode {self.mode!r} (use 'stable' or 'canonical')")
        if self.min_spacing is not None and not 0 < self.min_spacing <= 1:
            raise ValueError(f"min_spacing must be in (0, 1], got {self.min_spacing}")

    def for_model(self, model_min_spacing: float) -> "PositionPolicy":
        """This policy with the model's minimum spacing where none was set."""
        return self if self.min_spacing is not None else replace(self, min_spacing=model_min_spacing)


def _respace(pos: np.ndarray, a: int, b: int, policy: PositionPolicy) -> tuple[int, int]:
    """Reassign pos[a..b] (inclusive), growing the window until its spacing is acceptable; returns
    the window (a, b) it reassigned."""
    n = len(pos)
    grow_left = True
    while True:
        left = float(pos[a - 1]) if a > 0 else None
        right = float(pos[b + 1]) if b + 1 < n else None
        if left is None or right is None:
            break  # an open end: spacing 1 towards it is always acceptable
        spacing = (right - left) / (b - a + 2)
        if policy.target_low <= spacing <= policy.target_high:
            break
        if grow_left:
            a -= 1
        else:
            b += 1
        grow_left = not grow_left
    count = b - a + 1
    i = np.arange(count, dtype=np.float64)
    if left is None and right is None:
        pos[a:b + 1] = i
    elif left is None:
        pos[a:b + 1] = right - (count - i)
    elif right is None:
        pos[a:b + 1] = left + (i + 1)
    else:
        pos[a:b + 1] = left + (right - left) * (i + 1) / (count + 1)
    return a, b


def plan_positions(kept: Sequence[Optional[float]], policy: PositionPolicy) -> list[float]:
    """Positions for the edited document.

    kept: one entry per token of the new document in order: the token's old position if it
    was kept, None if it is new. Returns the new positions (strictly increasing). A kept
    token whose returned position differs from its old one was renumbered.
    """
    arr = np.array([np.nan if p is None else p for p in kept], dtype=np.float64)
    return plan_position_array(arr, policy).tolist()


def plan_position_array(kept: np.ndarray, policy: PositionPolicy) -> np.ndarray:
    """``plan_positions`` on a float64 array with NaN for new tokens (returns a new array).
    ``policy.min_spacing`` must be set (``PositionPolicy.for_model``)."""
    if policy.mode == "canonical":
        return np.arange(len(kept), dtype=np.float64)
    if policy.min_spacing is None:
        raise ValueError("the position policy has no min_spacing: resolve it with PositionPolicy.for_model")
    pos = np.array(kept, dtype=np.float64)
    edges = np.diff(np.isnan(pos).astype(np.int8), prepend=0, append=0)
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1):
        _respace_run(pos, int(a), int(b))  # each run of new tokens, between its kept neighbours
    # repair spacing that got too tight (insertions) or too wide (deletions), left to right
    i = 0
    while i + 1 < len(pos):
        gaps = np.diff(pos[i:])
        bad = np.flatnonzero((gaps < policy.min_spacing) | (gaps > policy.max_spacing))
        if not bad.size:
            break
        i += int(bad[0])
        _respace(pos, i, i + 1, policy)
        i += 1
    return pos


_ANY_SPACING = PositionPolicy(target_low=0.0, target_high=float("inf"))


def _respace_run(pos: np.ndarray, a: int, b: int) -> None:
    """Evenly place new tokens a..b between their neighbours (spacing 1 towards an open end)."""
    _respace(pos, a, b, _ANY_SPACING)


def plan_edit_positions(pos: np.ndarray, runs: Sequence[tuple[int, int]], joins: Sequence[int],
                        policy: PositionPolicy) -> list[tuple[int, int]]:
    """``plan_position_array`` in place, touching only what one edit reaches (O(edit), not O(n)).

    pos: the edited document's positions: kept tokens' old ones, NaN for new tokens. runs: the
    maximal runs (a, b) (inclusive, ascending) of new tokens; joins: indices of kept tokens whose
    left neighbour was deleted. Gaps away from these are left unchecked: the result equals
    ``plan_position_array`` whenever every gap of the document before the edit was within
    [min_spacing, max_spacing] (which the planner itself maintains). Returns the index windows
    (inclusive) whose positions it assigned.
    """
    if policy.mode == "canonical":
        pos[:] = np.arange(len(pos), dtype=np.float64)
        return [(0, len(pos) - 1)] if len(pos) else []
    if policy.min_spacing is None:
        raise ValueError("the position policy has no min_spacing: resolve it with PositionPolicy.for_model")
    n, windows, candidates = len(pos), [], []
    for a, b in runs:
        _respace_run(pos, a, b)
        windows.append((a, b))
        candidates.extend(range(max(a - 1, 0), min(b, n - 2) + 1))
    candidates.extend(j - 1 for j in joins if 0 < j < n)
    # The repair loop of plan_position_array, visiting only gaps that can have gone bad: from left to
    # right, each bad gap respaces a window, and the gaps to its right inside that window are rechecked.
    heapq.heapify(candidates)
    start = 0
    while candidates:
        g = heapq.heappop(candidates)
        if g < start:
            continue
        gap = pos[g + 1] - pos[g]
        if policy.min_spacing <= gap <= policy.max_spacing:
            continue
        a, b = _respace(pos, g, g + 1, policy)
        windows.append((a, b))
        for h in range(g + 1, min(b, n - 2) + 1):
            heapq.heappush(candidates, h)
        start = g + 1
    return windows
