"""``DocumentOptions``: every engine setting of a document in one frozen object.

Built once at the edge (the CLI, the language server, a replay, a saved state) and passed down
unchanged; nothing below it takes loose keyword settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from vqt.engine.positions import PositionPolicy
from vqt.modeling.config import VQTConfig


@dataclass(frozen=True)
class DocumentOptions:
    """Engine settings of a ``Document``."""

    backend: str = "reference"  # "reference" (the oracle), "cpu", "cuda" or "auto" (vqt.ops.get_backend)
    positions: PositionPolicy = field(default_factory=PositionPolicy)
    # Cancellation guard: refresh a row whose denominator keeps less than tau of its mass after removals.
    # None: 1e-4 for float64 models, 1e-2 for float32 ones.
    tau: Optional[float] = None
    # Memory guard: the longest document (tokens) accepted. None: no cap for windowed models (nothing in
    # their computation depends on document length), the model's ``max_len`` for full-attention ones.
    max_tokens: Optional[int] = None
    # Rounding-error budget of delta-updated attention rows (DESIGN.md section 8): a row whose bound on the
    # relative error gathered since its last full computation exceeds this is recomputed in full.
    # None: 2**-16 for float32 models, 2**-40 for float64 ones.
    drift_budget: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a name (str), got {self.backend!r}")
        if not isinstance(self.positions, PositionPolicy):
            raise TypeError(f"positions must be a PositionPolicy, got {self.positions!r}")
        if self.tau is not None and not 0 <= self.tau < 1:
            raise ValueError(f"tau must be in [0, 1), got {self.tau}")
        if self.drift_budget is not None and not self.drift_budget > 0:
            raise ValueError(f"drift_budget must be positive, got {self.drift_budget}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")

    def token_limit(self, config: VQTConfig) -> Optional[int]:
        """The longest document accepted for a model with ``config`` (None: no limit)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return None if config.window is not None else config.max_len

    def check_length(self, n: int, config: VQTConfig, what: str = "document") -> None:
        """Raise ValueError when a ``what`` of ``n`` tokens is longer than ``token_limit`` allows."""
        limit = self.token_limit(config)
        if limit is not None and n > limit:
            source = "max_tokens" if self.max_tokens is not None else "the model's max_len"
            raise ValueError(f"{what} of {n} tokens exceeds {source}={limit}")

    @classmethod
    def make(cls, options: Optional["DocumentOptions"] = None, *, backend: Optional[str] = None,
             position_mode: Optional[str] = None, positions: Optional[PositionPolicy] = None,
             tau: Optional[float] = None, max_tokens: Optional[int] = None) -> "DocumentOptions":
        """``options`` (default: the defaults) with the given settings replaced; ``position_mode`` is a
        shorthand for ``positions=PositionPolicy(mode=...)``."""
        opts = options if options is not None else cls()
        if positions is not None and position_mode is not None:
            raise ValueError("give positions or position_mode, not both")
        if position_mode is not None:
            positions = dataclasses.replace(opts.positions, mode=position_mode)
        changes = {k: v for k, v in (("backend", backend), ("positions", positions), ("tau", tau),
                                                        ("max_tokens", max_tokens)) if v is not None}
        return dataclasses.replace(opts, **changes) if changes else opts

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DocumentOptions":
        """Inverse of ``to_json``; also reads the settings of version-1 saved states."""
        if "position_mode" in d:  # version 1: position_mode, backend, tau, spacing
            return cls(backend=d["backend"], tau=d["tau"],
                       positions=PositionPolicy(mode=d["position_mode"], **d.get("spacing", {})))
        return cls(backend=d["backend"], tau=d["tau"], positions=PositionPolicy(**d["positions"]),
                   max_tokens=d.get("max_tokens"), drift_budget=d.get("drift_budget"))
