"""The GRPO reward of the livestream task and the RFT acceptance rule.

    total = w_c·C + w_h·H + w_l·r_len          (length_needs_correct: w_l·C·r_len)

with C and H the correctness and helpfulness judges' scores and r_len the length-band
reward of the response's token count (`LengthBand`; r_len = 0 and w_l unused without a
band). Gating the length term on correctness (``length_needs_correct``) stops a policy
from buying length reward with short wrong answers. RFT keeps a teacher sample when C >= 1 and H >= 0.75 (`is_accepted`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from livethinking.data.records import LivestreamRecord
from livethinking.rewards.base import Judge, Verdict, check_batch
from livethinking.rewards.length import LengthBand

__all__ = ["LivestreamReward", "RewardBreakdown", "RewardWeights", "is_accepted"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RewardWeights:
    """w_c, w_h, w_l: finite and >= 0."""

    correctness: float = 1.0
    helpfulness: float = 0.5
    length: float = 0.5

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"RewardWeights.{f.name} must be a finite number >= 0, "
                                 f"got {value!r}")


@dataclass(slots=True)
class RewardBreakdown:
    """One response's total reward, its parts (unweighted) and the judges' reasons."""

    total: float
    correctness: float
    helpfulness: float
    length: float
    reasons: dict[str, str] = field(default_factory=dict)


class LivestreamReward:
    """total = w_c·C + w_h·H + w_l·r_len over a batch of responses."""

    __slots__ = ("correctness", "helpfulness", "band", "weights", "length_needs_correct")

    def __init__(self, correctness: Judge, helpfulness: Judge, band: LengthBand | None = None,
                 weights: RewardWeights | None = None, *, length_needs_correct: bool = False):
        self.length_needs_correct = length_needs_correct
        self.correctness = correctness
        self.helpfulness = helpfulness
        self.band = band
        self.weights = RewardWeights() if weights is None else weights

    def score_many(self, records: Sequence[LivestreamRecord], responses: Sequence[str],
                   lengths: Sequence[float]) -> list[RewardBreakdown]:
        """One breakdown per response; ``lengths`` are the responses' token counts."""
        check_batch(records, responses)
        if len(lengths) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(lengths)} lengths")
        cs = self.correctness.judge_many(records, responses)
        hs = self.helpfulness.judge_many(records, responses)
        w = self.weights
        out = []
        for c, h, n in zip(cs, hs, lengths):
            reasons = {"correctness": c.reason, "helpfulness": h.reason}
            total = w.correctness * c.score + w.helpfulness * h.score
            r_len = 0.0
            if self.band is not None:
                r_len = self.band.reward(n)
                total += w.length * r_len * (c.score if self.length_needs_correct else 1.0)
                reasons["length"] = (f"{n} tokens, band [{self.band.low:g}, "
                                     f"{self.band.high:g}]")
            out.append(RewardBreakdown(total=total, correctness=c.score,
                                       helpfulness=h.score, length=r_len, reasons=reasons))
        return out


def is_accepted(correctness: Verdict, helpfulness: Verdict, *,
                correctness_threshold: float = 1.0, helpfulness_threshold: float = 0.75) -> bool:
    """RFT rejection sampling: keep a sample judged correct AND helpful."""
    return (correctness.score >= correctness_threshold
            and helpfulness.score >= helpfulness_threshold)
