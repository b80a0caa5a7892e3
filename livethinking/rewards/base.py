"""A judge's verdict and the judge protocol.

A judge maps (record, response) to a score in [0, 1] with a reason; `judge_many`
judges a batch (a plain loop by default; the LLM judge sends requests concurrently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from livethinking.data.records import LivestreamRecord

__all__ = ["Judge", "Verdict", "check_batch"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A judge's score in [0, 1] (1 = correct / fully helpful) and why."""

    score: float
    reason: str

    def __post_init__(self):
        if not (isinstance(self.score, (int, float)) and math.isfinite(self.score)
                and 0.0 <= self.score <= 1.0):
            raise ValueError(f"Verdict.score must be a number in [0, 1], got {self.score!r}")


def check_batch(records: Sequence, responses: Sequence) -> None:
    """Raise ValueError unless there is one response per record."""
    if len(records) != len(responses):
        raise ValueError(f"got {len(records)} records but {len(responses)} responses")


@runtime_checkable
class Judge(Protocol):
    """Anything with ``judge(record, response) -> Verdict``. Subclass it to inherit the
    default `judge_many` (a loop)."""

    def judge(self, record: LivestreamRecord, response: str) -> Verdict: ...

    def judge_many(self, records: Sequence[LivestreamRecord],
                   responses: Sequence[str]) -> list[Verdict]:
        check_batch(records, responses)
        return [self.judge(r, s) for r, s in zip(records, responses)]
