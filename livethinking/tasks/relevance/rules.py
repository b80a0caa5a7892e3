"""The relevance task's domain rules: the query grammar, the tier rule and the mechanical
reasoning, shared by the data maker, the teacher and the tests' readers.

A query names one category (:data:`CATEGORIES` of the livestream catalogue) and 1-2
attribute values (:data:`ATTRIBUTES`; every value belongs to one attribute only, so a value
names its attribute): colour, material and size go before the category ("red stainless
steel kettle"), the others after it, warranty, battery and shipping with their key as a
suffix ("kettle 1.5 liters", "headphones 20 hours battery", "lamp 2 years warranty").

The tier of a query against a product document (:func:`relevance_label`):

- 1-Irrelevant: the document's category is not the query's (or is missing);
- 2-Mismatch: the category matches and some queried attribute's value in the document
  differs from the query's (a contradiction outranks an unconfirmed attribute);
- 3-Related: the category matches, nothing contradicts, but some queried attribute is not
  listed in the document (it cannot be confirmed);
- 4-Excellent: the category matches and every queried value equals the document's.

The reasoning (:func:`reasoning_steps`) is one lookup per step: restate the query, read the
category line, read each queried attribute's line, conclude ``"So {k}-{Tier}."``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from livethinking.tasks.livestream.demo_data import CATEGORIES
from livethinking.tasks.livestream.domain import ATTRIBUTES, parse_product_doc
from livethinking.tasks.relevance.responses import format_label

__all__ = ["PREFIX_ATTRIBUTES", "SUFFIX_KEYS", "Query", "format_query", "parse_query",
           "reasoning_steps", "reference_reasoning", "relevance_label"]

PREFIX_ATTRIBUTES: tuple[str, ...] = ("color", "material", "size")  # "red kettle"
SUFFIX_KEYS: dict[str, str] = {"warranty": "warranty", "battery": "battery",
                               "shipping": "shipping"}  # "kettle 2 days shipping"

_START = r"(?<!\w)(?<!\d\.)"  # a phrase starts a word, not after "1." ("5 x" in "1.5 x")
_VALUE_OWNER = {v: a for a, values in ATTRIBUTES.items() for v in values}
_VALUES = re.compile(_START + "(" + "|".join(
    re.escape(v) for v in sorted(_VALUE_OWNER, key=len, reverse=True)) + r")(?!\w)")
_CATEGORIES = re.compile(_START + "(" + "|".join(map(re.escape, CATEGORIES)) + r")(?!\w)")


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: its category (None when it names none) and its attribute values,
    in the order they occur."""

    category: str | None
    attributes: dict[str, str] = field(default_factory=dict)


def format_query(category: str, attributes: Mapping[str, str]) -> str:
    """The query string for ``category`` and ``{attribute: value}`` (module docstring)."""
    if not attributes or len(attributes) > 2:
        raise ValueError(f"a query names 1-2 attributes, got {dict(attributes)}")
    before = [v for a, v in attributes.items() if a in PREFIX_ATTRIBUTES]
    after = [f"{v} {SUFFIX_KEYS[a]}" if a in SUFFIX_KEYS else v
             for a, v in attributes.items() if a not in PREFIX_ATTRIBUTES]
    return " ".join([*before, category, *after])


def parse_query(query: str) -> Query:
    """The category (the first one named) and the attribute values (whole words, longest
    first; an attribute named twice keeps its first value) of ``query``."""
    text = " ".join(query.lower().split())
    m = _CATEGORIES.search(text)
    attributes: dict[str, str] = {}
    for v in _VALUES.findall(text):
        attributes.setdefault(_VALUE_OWNER[v], v)
    return Query(category=m.group(1) if m else None, attributes=attributes)


def relevance_label(query: Query, fields: Mapping[str, str]) -> int:
    """The tier of ``query`` against a parsed document (``parse_product_doc``'s fields)."""
    if query.category is None or fields.get("category") != query.category:
        return 1
    listed = [a for a in query.attributes if a in fields]
    if any(fields[a] != query.attributes[a] for a in listed):
        return 2
    return 3 if len(listed) < len(query.attributes) else 4


def _article(category: str) -> str:
    return category if category.endswith("s") else f"a {category}"  # "headphones", "a lamp"


def reasoning_steps(query: Query, fields: Mapping[str, str], *,
                    order: Sequence[str] | None = None) -> tuple[int, list[str]]:
    """``(tier, steps)``: the tier of :func:`relevance_label` and the sentences deriving it
    from ``fields``, checking the attributes in ``order`` (default: the query's)."""
    if order is not None and sorted(order) != sorted(query.attributes):
        raise ValueError(f"order must be a permutation of the queried attributes "
                         f"{list(query.attributes)}, got {list(order)}")
    label = relevance_label(query, fields)
    wanted = " and ".join(f"{a} {v}" for a, v in query.attributes.items())
    asked = _article(query.category) if query.category else "a product of no named category"
    steps = [f"The query asks for {asked}" + (f" with {wanted}." if wanted else ".")]
    category = fields.get("category")
    if query.category is not None and category == query.category:
        steps.append(f"The product's category is {category}: matches.")
        for a in (query.attributes if order is None else order):
            wanted_value, value = query.attributes[a], fields.get(a)
            if value is None:
                steps.append(f"Its {a} is not listed: cannot confirm.")
            elif value == wanted_value:
                steps.append(f"Its {a} is {value}: matches.")
            else:
                steps.append(f"Its {a} is {value}, not {wanted_value}: mismatch.")
    else:
        shown = category if category is not None else "not listed"
        target = query.category if query.category is not None else "a named category"
        steps.append(f"The product's category is {shown}, not {target}: different product.")
    steps.append(f"So {format_label(label)}.")
    return label, steps


def reference_reasoning(query: str, product_doc: str) -> tuple[int, str]:
    """``(tier, reasoning)`` of ``query`` against ``product_doc``: the rule's tier and its
    mechanical reasoning, one sentence a step."""
    label, steps = reasoning_steps(parse_query(query), parse_product_doc(product_doc))
    return label, " ".join(steps)
