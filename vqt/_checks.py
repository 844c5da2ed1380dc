"""Argument checks shared by the public API (documents, dense forwards, edit spans).

Python, numpy and torch integers are all accepted where an integer is meant; anything else
(bools, floats, nested or 2-D token arrays, non-finite positions, ids that fit no vocabulary)
is refused with a TypeError/ValueError that names the value, before any state is touched.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch

_INT64 = (-(2**63), 2**63)


def as_int(value: Any, what: str, kind: str = "an integer") -> int:
    """``value`` as a Python int: an int, a numpy integer or a 0-d integer tensor (not a bool or a float).
    The TypeError says "<what> must be <kind>, got <value>"."""
    is_bool = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool) \
        or type(value).__name__ == "bool_"  # numpy.bool_, without importing numpy
    if not is_bool:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be {kind}, got {value!r} ({type(value).__name__})")


def _one_dimensional(value: Any, what: str) -> None:
    """Refuse arrays and tensors that are not 1-D (a batch would otherwise be flattened into one document)."""
    ndim = getattr(value, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"{what} must be one-dimensional (one document), got shape {tuple(value.shape)}")


def token_tensor(token_ids: Any, what: str, device: torch.device, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor on ``device``: a sequence of integers or a 1-D integer tensor/array.

    The vocabulary range is the model's to check (``VQTModel.check_inputs``); this only refuses
    what cannot be token ids at all, and, given ``vocab_size``, ids of a sequence (not a tensor)
    outside [0, vocab_size), with the message ``check_inputs`` gives."""
    if isinstance(token_ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of token ids, not {type(token_ids).__name__} "
                        f"(use TextDocument for text)")
    if isinstance(token_ids, torch.Tensor):
        _one_dimensional(token_ids, what)
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"{what} must be integers, got a {token_ids.dtype} tensor")
        if token_ids.device != device:
            raise ValueError(f"{what} are on {token_ids.device} but the model is on {device}")
        return token_ids.long()
    _one_dimensional(token_ids, what)
    try:
        values = list(token_ids)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of token ids, got {token_ids!r}") from None
    ids = [t if type(t) is int else as_int(t, f"{what}[{i}]") for i, t in enumerate(values)]
    if ids and not (_INT64[0] <= min(ids) and max(ids) < _INT64[1]):
        bad = next(t for t in ids if not _INT64[0] <= t < _INT64[1])
        raise ValueError(f"token id {bad} in {what} is outside every vocabulary (it does not fit in 64 bits)")
    if vocab_size is not None and ids and not (0 <= min(ids) and max(ids) < vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long, device=device)


def position_tensor(positions: Any, n: int, device: torch.device) -> torch.Tensor:
    """``n`` finite, strictly increasing real positions as a 1-D float64 tensor."""
    if isinstance(positions, (str, bytes)):
        raise TypeError(f"positions must be a sequence of numbers, not {type(positions).__name__}")
    try:
        pos = torch.as_tensor(positions, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"positions must be a sequence of numbers, got {positions!r:.80} ({e})") from None
    _one_dimensional(pos, "positions")
    if pos.numel() != n:
        raise ValueError(f"{n} tokens but {pos.numel()} positions")
    finite = torch.isfinite(pos)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(f"positions must be finite, got {float(pos[i])} at index {i}")
    if n > 1 and not bool((pos[1:] > pos[:-1]).all()):
        i = int((pos[1:] <= pos[:-1]).nonzero()[0])
        raise ValueError(f"positions must be strictly increasing, got {float(pos[i])} then {float(pos[i + 1])} "
                         f"at index {i}")
    return pos


def index_tensor(indices: Any, n: int, device: torch.device) -> torch.Tensor:
    """Token indices into a document of ``n`` tokens (negative ones count from the end) as int64."""
    if isinstance(indices, (str, bytes)):
        raise TypeError(f"indices must be a sequence of token indices, not {type(indices).__name__}")
    if isinstance(indices, torch.Tensor) and indices.ndim == 0 or not hasattr(indices, "__iter__"):
        raise TypeError(f"indices must be a sequence of token indices, got {indices!r}")
    idx = token_tensor(indices, "indices", device) if isinstance(indices, torch.Tensor) else \
        torch.tensor([as_int(i, "a token index") for i in indices], dtype=torch.long, device=device)
    bad = (idx < -n) | (idx >= n)
    if bool(bad.any()):
        raise ValueError(f"token index {int(idx[bad][0])} is outside a document of {n} tokens")
    return idx
