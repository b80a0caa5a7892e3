"""The relevance task's rule judges (``livethinking.tasks.relevance``): label correctness
and the response's form (the helpfulness side), each ``judge(record, response) ->
Verdict`` with a score in [0, 1]; they sit here beside the livestream rule judges.

- :class:`RelevanceLabelJudge`: 1 when the parsed label (`parse_label`) equals
  ``record.label``, else 0; with ``partial_credit``, ``1 - |pred - gold| / 3`` (a neighbour
  tier earns 2/3, the opposite tier 0) and 0 when no label parses.
- :class:`RelevanceFormatJudge`: the mean of three checks: the label parses in its place;
  a non-empty reasoning sits in its place (`parse_response`); the reasoning has at most
  ``max_reasoning_words`` words (a missing reasoning counts 0 words, so it passes this one
  and fails the previous).
"""

from __future__ import annotations

from livethinking.rewards.base import Judge, Verdict
from livethinking.tasks.relevance.responses import (check_output_format, format_label,
                                                    parse_response)

__all__ = ["RelevanceFormatJudge", "RelevanceLabelJudge", "relevance_judges"]


class RelevanceLabelJudge(Judge):
    """Correctness: the parsed label against ``record.label`` (module docstring)."""

    __slots__ = ("output_format", "partial_credit")

    def __init__(self, output_format: str = "cot", partial_credit: bool = False):
        self.output_format = check_output_format(output_format)
        self.partial_credit = bool(partial_credit)

    def judge(self, record, response: str) -> Verdict:
        gold = record.label
        pred = parse_response(response, self.output_format).label
        if pred is None:
            return Verdict(score=0.0, reason=f"no {self.output_format} label found; "
                                                      f"gold {format_label(gold)}")
        if pred == gold:
            return Verdict(score=1.0, reason=f"label {format_label(pred)} is correct")
        score = 1.0 - abs(pred - gold) / 3.0 if self.partial_credit else 0.0
        return Verdict(score=score, reason=f"label {format_label(pred)}, "
                                                    f"gold {format_label(gold)}")


class RelevanceFormatJudge(Judge):
    """Helpfulness: the mean of the form checks (module docstring)."""

    __slots__ = ("output_format", "max_reasoning_words")

    def __init__(self, output_format: str = "cot", max_reasoning_words: int = 80):
        self.output_format = check_output_format(output_format)
        if isinstance(max_reasoning_words, bool) or not isinstance(max_reasoning_words, int) \
                or max_reasoning_words < 1:
            raise ValueError(f"max_reasoning_words must be an int >= 1, "
                             f"got {max_reasoning_words!r}")
        self.max_reasoning_words = max_reasoning_words

    def judge(self, record, response: str) -> Verdict:
        parsed = parse_response(response, self.output_format)
        words = len(parsed.reasoning.split()) if parsed.reasoning else 0
        checks = {"label": parsed.label is not None, "reasoning": bool(parsed.reasoning),
                  "concise": words <= self.max_reasoning_words}
        failed = [name for name, ok in checks.items() if not ok]
        reason = (f"{words} reasoning words; "
                  + ("all checks pass" if not failed else "failed: " + ", ".join(failed)))
        return Verdict(score=sum(checks.values()) / len(checks), reason=reason)


def relevance_judges(output_format: str = "cot", partial_credit: bool = False
                     ) -> tuple[RelevanceLabelJudge, RelevanceFormatJudge]:
    """``(correctness, helpfulness)`` judges for ``output_format``."""
    return (RelevanceLabelJudge(output_format, partial_credit),
            RelevanceFormatJudge(output_format))
