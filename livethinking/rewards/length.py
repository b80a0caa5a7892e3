"""The length-band reward of LiveThinking's GRPO stage.

With L_ref the mean response length (tokens) of the RFT model, the band is
[λ_lo·L_ref, λ_hi·L_ref]; for a response of length L,

    d     = max(λ_lo·L_ref − L, 0, L − λ_hi·L_ref)      (0 inside the band)
    r_len = max(0, 1 − d / ε)

so responses shorter than the RFT model's (by the band's factor) get full reward and
the reward falls linearly to 0 within ε tokens outside the band.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LengthBand", "mean_length"]


@dataclass(kw_only=True, slots=True, frozen=True)
class LengthBand:
    """Band [lambda_lo·l_ref, lambda_hi·l_ref] with linear fall-off over epsilon tokens."""

    l_ref: float
    lambda_lo: float = 0.3
    lambda_hi: float = 0.6
    epsilon: float

    def __post_init__(self):
        for name in ("l_ref", "lambda_lo", "lambda_hi", "epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"LengthBand.{name} must be a finite number, got {value!r}")
        if self.l_ref <= 0:
            raise ValueError(f"LengthBand.l_ref must be > 0, got {self.l_ref}")
        if self.lambda_lo <= 0:
            raise ValueError(f"LengthBand.lambda_lo must be > 0, got {self.lambda_lo}")
        if self.lambda_hi < self.lambda_lo:
            raise ValueError(f"LengthBand.lambda_hi ({self.lambda_hi}) must be >= "
                             f"lambda_lo ({self.lambda_lo})")
        if self.epsilon <= 0:
            raise ValueError(f"LengthBand.epsilon must be > 0, got {self.epsilon}")

    @property
    def low(self) -> float:
        return self.lambda_lo * self.l_ref

    @property
    def high(self) -> float:
        return self.lambda_hi * self.l_ref

    def distance(self, length: float) -> float:
        """d = how far ``length`` lies outside the band (0 inside)."""
        return max(self.low - length, 0.0, length - self.high)

    def reward(self, length: float) -> float:
        """r_len = max(0, 1 − d/ε)."""
        if not (isinstance(length, (int, float)) and math.isfinite(length) and length >= 0):
            raise ValueError(f"length must be a finite number >= 0, got {length!r}")
        return max(0.0, 1.0 - self.distance(length) / self.epsilon)


def mean_length(lengths: Iterable[float]) -> float:
    """L_ref = the mean of ``lengths`` (the RFT model's response lengths in tokens)."""
    values = [float(x) for x in lengths]
    if not values:
        raise ValueError("mean_length needs at least one length")
    if any(not math.isfinite(x) or x < 0 for x in values):
        raise ValueError("lengths must be finite and >= 0")
    return sum(values) / len(values)
