"""Validation of (start, end, payload) edit spans, shared by token and text documents."""

from __future__ import annotations

from typing import Any, Iterable


def check_spans(edits: Iterable[Any], n: int, unit: str, shape: str) -> list[tuple[int, int, Any]]:
    """Validate (start, end, payload) edits against a sequence of ``n`` ``unit``s: int offsets,
    0 <= start <= end <= n, sorted and non-overlapping. Raises TypeError/ValueError naming the bad value."""
    out: list[tuple[int, int, Any]] = []
    prev_end = 0
    for e in edits:
        if not isinstance(e, (tuple, list)) or len(e) != 3:
            raise TypeError(f"an edit is {shape}, got {e!r}")
        start, end, payload = e
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"edit {name} must be an int ({unit} offset), got {v!r}")
        if not 0 <= start <= end <= n:
            raise ValueError(f"invalid {unit} range [{start}, {end}) for a sequence of {n} {unit}s")
        if start < prev_end:
            raise ValueError(f"edits must be sorted and non-overlapping: [{start}, {end}) starts before {prev_end}")
        prev_end = end
        out.append((start, end, payload))
    return out
