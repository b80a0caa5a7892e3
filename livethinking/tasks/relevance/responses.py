"""The relevance task's labels and response formats.

Four tiers (:data:`TIERS`): ``4-Excellent``, ``3-Related``, ``2-Mismatch``,
``1-Irrelevant``; a label is written ``"{k}-{Tier}"``. Two response formats
(:data:`OUTPUT_FORMATS`):

- ``"cot"`` (think, then answer): ``"<think>{reasoning}</think>\\n{k}-{Tier}"``; the label
  is everything after the first ``</think>`` (stripped) and must be exactly one label.
- ``"post_cot"`` (answer, then think; the deployed form):
  ``"{k}-{Tier}\\n<think>{reasoning}</think>"``; the response's very first characters are
  the label, so the label's digit is the first generated token (for a byte-level BPE whose
  pre-tokenizer splits digits from letters and punctuation, as GPT-2's and Qwen's do) and
  its distribution is read at one position (:mod:`~.tiering`). The label is the first
  line, exactly, with no leading whitespace.

A label whose digit and tier name disagree (``"3-Excellent"``) is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LABEL_TEXTS", "OUTPUT_FORMATS", "TIERS", "ParsedResponse", "check_output_format",
           "format_label", "format_response", "parse_label", "parse_response"]

TIERS: dict[int, str] = {4: "Excellent", 3: "Related", 2: "Mismatch", 1: "Irrelevant"}
LABEL_TEXTS: dict[int, str] = {k: str(k) for k in TIERS}  # the text of each label's token
OUTPUT_FORMATS: tuple[str, ...] = ("cot", "post_cot")

_LABEL = re.compile(r"([1-4])-(" + "|".join(TIERS.values()) + r")")
_POST_COT_REST = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    """A response's label (None when missing or malformed) and reasoning (the think block's
    text, stripped; None when the block is missing or out of place)."""

    label: int | None
    reasoning: str | None


def check_output_format(output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return output_format


def _check_label(label: object) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or label not in TIERS:
        raise ValueError(f"label must be an int in 1..4, got {label!r}")
    return label


def format_label(label: int) -> str:
    """``4 -> "4-Excellent"``."""
    return f"{_check_label(label)}-{TIERS[label]}"


def format_response(label: int, reasoning: str, output_format: str) -> str:
    """The response for ``label`` with ``reasoning`` in ``output_format`` (module docstring).
    ``reasoning`` is stripped; it may not hold a think tag."""
    check_output_format(output_format)
    if not isinstance(reasoning, str):
        raise TypeError(f"reasoning must be a string, got {type(reasoning).__name__}")
    if "<think>" in reasoning or "</think>" in reasoning:
        raise ValueError("reasoning must not contain <think> or </think>")
    think = f"<think>{reasoning.strip()}</think>"
    label_text = format_label(label)
    return f"{think}\n{label_text}" if output_format == "cot" else f"{label_text}\n{think}"


def _label_of(text: str) -> int | None:
    m = _LABEL.fullmatch(text)
    if m is None or TIERS[int(m.group(1))] != m.group(2):
        return None
    return int(m.group(1))


def parse_response(response: str, output_format: str) -> ParsedResponse:
    """The label and reasoning of ``response`` read as ``output_format``.

    cot: the reasoning is the text before the first ``</think>`` (an opening ``<think>``,
    possibly after whitespace, removed; without it the opening tag is taken to sit in the
    prompt); the label is the rest, stripped, when it is exactly one label.
    post_cot: the label is the first line when it is exactly one label (nothing before it,
    not even whitespace); the reasoning is the rest when it is exactly one
    ``<think>...</think>`` block (whitespace around it allowed).
    """
    check_output_format(output_format)
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    if output_format == "cot":
        before, sep, after = response.partition("</think>")
        if not sep:
            return ParsedResponse(label=None, reasoning=None)
        before = before.lstrip()
        if before.startswith("<think>"):
            before = before[len("<think>"):]
        reasoning = None if "<think>" in before else before.strip()
        return ParsedResponse(label=_label_of(after.strip()), reasoning=reasoning)
    first, _, rest = response.partition("\n")
    label = _label_of(first.rstrip())
    m = _POST_COT_REST.fullmatch(rest)
    reasoning = m.group(1).strip() if (label is not None and m is not None
                                       and "<think>" not in m.group(1)) else None
    return ParsedResponse(label=label, reasoning=reasoning)


def parse_label(response: str, output_format: str) -> int | None:
    """The tier ``response`` states in ``output_format``; None when the label is missing,
    malformed, or not in its place (post_cot: not first; cot: not alone after ``</think>``)."""
    return parse_response(response, output_format).label
