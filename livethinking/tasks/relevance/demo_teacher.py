"""The relevance demo's programmatic teacher: the rule's mechanical reasoning and label,
wrong at a set rate in the two ways TaoSR1 names, reproducible per (seed, record).

A response is correct with probability ``1 - error_rate``. A wrong one is, with even odds,

- a *discriminative hallucination*: sound reasoning that concludes the right tier
  (``"... So 2-Mismatch."``) followed by another tier's label;
- a *wrong step*: one lookup misread (the category taken for another, or one queried
  attribute read as matching, contradicting or unlisted when it is not), the rest of the
  reasoning and the label following from the misreading; only misreadings that change the
  tier are drawn, so the label is wrong too (CoT error accumulation).

Either way the label differs from the gold one, so a label judge rejects it. Correct
responses vary in the order the attributes are checked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from livethinking.tasks.livestream.demo_data import CATEGORIES
from livethinking.tasks.livestream.domain import ATTRIBUTES, parse_product_doc
from livethinking.tasks.relevance.records import RelevanceRecord
from livethinking.tasks.relevance.responses import TIERS, check_output_format, format_response
from livethinking.tasks.relevance.rules import (Query, parse_query, reasoning_steps,
                                                relevance_label)

__all__ = ["relevance_teacher"]


def _misreadings(query: Query, fields: dict[str, str]) -> list[dict[str, str]]:
    """Copies of ``fields`` with one lookup misread, each giving another tier."""
    gold = relevance_label(query, fields)
    out = []
    category = fields.get("category")
    if query.category is not None and category == query.category:
        out.append({**fields, "category": next(c for c in CATEGORIES if c != category)})
    elif query.category is not None:
        out.append({**fields, "category": query.category})
    for a, wanted in query.attributes.items():
        value = fields.get(a)
        readings = [wanted, next(v for v in ATTRIBUTES[a] if v != wanted), None]
        for reading in readings:
            if reading == value:
                continue
            misread = {k: v for k, v in fields.items() if k != a}
            if reading is not None:
                misread[a] = reading
            out.append(misread)
    return [m for m in out if relevance_label(query, m) != gold]


def _one(rng: random.Random, record: RelevanceRecord, error_rate: float,
         output_format: str) -> str:
    query, fields = parse_query(record.query), parse_product_doc(record.product_doc)
    order = list(query.attributes)
    rng.shuffle(order)
    wrong = rng.random() < error_rate
    if wrong and rng.random() >= 0.5 and (misread := _misreadings(query, fields)):
        label, steps = reasoning_steps(query, rng.choice(misread), order=order)
        return format_response(label, " ".join(steps), output_format)
    label, steps = reasoning_steps(query, fields, order=order)
    if wrong:  # the reasoning is sound, the label is not
        label = rng.choice([k for k in TIERS if k != label])
    return format_response(label, " ".join(steps), output_format)


def relevance_teacher(records: Iterable[RelevanceRecord], *, k: int, seed: int,
                      output_format: str = "cot",
                      error_rate: float = 0.25) -> dict[str, list[str]]:
    """``{record.id: k responses}`` in ``output_format`` (module docstring). A record's
    responses depend only on (seed, record.id), the format changing their layout only;
    ``k=2`` gives a prefix of ``k=4``'s. The teacher reads the record's query and document
    (not its label), as a real teacher would; its error rate is against the rule's tier."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    check_output_format(output_format)
    out: dict[str, list[str]] = {}
    for record in records:
        if record.id in out:
            raise ValueError(f"duplicate record id {record.id!r}")
        rng = random.Random(f"{seed}\x00{record.id}")
        out[record.id] = [_one(rng, record, error_rate, output_format) for _ in range(k)]
    return out
