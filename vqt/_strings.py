"""Common prefix and suffix lengths of two strings, by binary search over slice comparisons (which run in C):
the first step of every diff of texts in the project (atomic edits, local re-tokenization)."""

from __future__ import annotations


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of a and b."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix_len(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix of a and b, at most ``limit``."""
    lo, hi = 0, min(limit, len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo
