"""The relevance task's rule judges: label correctness and the response's form
(the helpfulness side), each ``judge(record, response) -> verdict`` with a score in [0, 1].

- :class:`RelevanceLabelJudge`: 1 when the parsed label (`parse_label`) equals
  ``record.label``, else 0; with ``partial_credit``, ``1 - |pred - gold| / 3`` (a neighbour
  tier earns 2/3, the opposite tier 0) and 0 when no label parses.
- :class:`RelevanceFormatJudge`: the mean of three checks: the label parses in its place;
  a non-empty reasoning sits in its place (`parse_response`); the reasoning has at most
  ``max_reasoning_words`` words (a missing reasoning counts 0 words, so it passes this one
  and fails the previous).

They follow ``livethinking.rewards.Judge``'s protocol (``judge`` and ``judge_many``) and
return ``livethinking.rewards.Verdict``-shaped results (:class:`RelevanceVerdict`: ``score``
and ``reason``, the score checked to lie in [0, 1]) without importing ``livethinking.rewards``:
tasks sit under rewards (``tests/test_layering.py`` allows rewards -> tasks, not back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from livethinking.tasks.relevance.responses import (check_output_format, format_label,
                                                    parse_response)

__all__ = ["RelevanceFormatJudge", "RelevanceLabelJudge", "RelevanceVerdict",
           "relevance_judges"]


@dataclass(frozen=True, slots=True)
class RelevanceVerdict:
    """A score in [0, 1] (1 = correct / well formed) and why: the fields of
    ``livethinking.rewards.Verdict``, which consumers read."""

    score: float
    reason: str

    def __post_init__(self):
        if not (isinstance(self.score, (int, float)) and math.isfinite(self.score)
                and 0.0 <= self.score <= 1.0):
            raise ValueError(f"score must be a number in [0, 1], got {self.score!r}")


class _RuleJudge:
    __slots__ = ()

    def judge(self, record, response: str) -> RelevanceVerdict:
        raise NotImplementedError

    def judge_many(self, records: Sequence, responses: Sequence[str]) -> list[RelevanceVerdict]:
        if len(records) != len(responses):
            raise ValueError(f"got {len(records)} records but {len(responses)} responses")
        return [self.judge(r, s) for r, s in zip(records, responses)]


class RelevanceLabelJudge(_RuleJudge):
    """Correctness: the parsed label against ``record.label`` (module docstring)."""

    __slots__ = ("output_format", "partial_credit")

    def __init__(self, output_format: str = "cot", partial_credit: bool = False):
        self.output_format = check_output_format(output_format)
        self.partial_credit = bool(partial_credit)

    def judge(self, record, response: str) -> RelevanceVerdict:
        gold = record.label
        pred = parse_response(response, self.output_format).label
        if pred is None:
            return RelevanceVerdict(score=0.0, reason=f"no {self.output_format} label found; "
                                                      f"gold {format_label(gold)}")
        if pred == gold:
            return RelevanceVerdict(score=1.0, reason=f"label {format_label(pred)} is correct")
        score = 1.0 - abs(pred - gold) / 3.0 if self.partial_credit else 0.0
        return RelevanceVerdict(score=score, reason=f"label {format_label(pred)}, "
                                                    f"gold {format_label(gold)}")


class RelevanceFormatJudge(_RuleJudge):
    """Helpfulness: the mean of the form checks (module docstring)."""

    __slots__ = ("output_format", "max_reasoning_words")

    def __init__(self, output_format: str = "cot", max_reasoning_words: int = 80):
        self.output_format = check_output_format(output_format)
        if isinstance(max_reasoning_words, bool) or not isinstance(max_reasoning_words, int) \
                or max_reasoning_words < 1:
            raise ValueError(f"max_reasoning_words must be an int >= 1, "
                             f"got {max_reasoning_words!r}")
        self.max_reasoning_words = max_reasoning_words

    def judge(self, record, response: str) -> RelevanceVerdict:
        parsed = parse_response(response, self.output_format)
        words = len(parsed.reasoning.split()) if parsed.reasoning else 0
        checks = {"label": parsed.label is not None, "reasoning": bool(parsed.reasoning),
                  "concise": words <= self.max_reasoning_words}
        failed = [name for name, ok in checks.items() if not ok]
        reason = (f"{words} reasoning words; "
                  + ("all checks pass" if not failed else "failed: " + ", ".join(failed)))
        return RelevanceVerdict(score=sum(checks.values()) / len(checks), reason=reason)


def relevance_judges(output_format: str = "cot", partial_credit: bool = False
                     ) -> tuple[RelevanceLabelJudge, RelevanceFormatJudge]:
    """``(correctness, helpfulness)`` judges for ``output_format``."""
    return (RelevanceLabelJudge(output_format, partial_credit),
            RelevanceFormatJudge(output_format))
