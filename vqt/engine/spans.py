"""Validation of (start, end, payload) edit spans, shared by token and text documents."""

from __future__ import annotations

from typing import Any, Iterable

from vqt._checks import as_int


def check_spans(edits: Iterable[Any], n: int, unit: str, shape: str) -> list[tuple[int, int, Any]]:
    """Validate (start, end, payload) edits against a sequence of ``n`` ``unit``s: int offsets,
    0 <= start <= end <= n, sorted and non-overlapping. Offsets may be Python, numpy or torch
    integers. Raises TypeError/ValueError naming the bad value."""
    if isinstance(edits, (str, bytes)) or not hasattr(edits, "__iter__"):
        raise TypeError(f"edits must be a list of {shape}, got {edits!r:.80}")
    out: list[tuple[int, int, Any]] = []
    prev_end = 0
    for e in edits:
        if not isinstance(e, (tuple, list)) or len(e) != 3:
            raise TypeError(f"an edit is {shape}, got {e!r}")
        start, end = (as_int(v, f"edit {name}", f"an integer ({unit} offset)") for name, v in (("start", e[0]), ("end", e[1])))
        payload = e[2]
        if not 0 <= start <= end <= n:
            raise ValueError(f"invalid {unit} range [{start}, {end}) for a sequence of {n} {unit}s")
        if start < prev_end:
            raise ValueError(f"edits must be sorted and non-overlapping: [{start}, {end}) starts before {prev_end}")
        prev_end = end
        out.append((start, end, payload))
    return out
