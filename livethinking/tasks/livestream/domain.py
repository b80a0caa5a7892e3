"""The livestream domain's rules, in one place for the data maker, the teacher and the judges.

A product document is ``"# Product: NAME"``, ``"category: C"``, then one ``key: value``
line per attribute (:func:`format_product_doc`, inverted by :func:`parse_product_doc`);
attribute values come from :data:`ATTRIBUTES`. A question asks about the attribute whose
keyword (:data:`QUESTION_KEYWORDS`, matched at a word start) occurs earliest
(:func:`asked_attribute`); a refusal contains one of :data:`REFUSAL_MARKERS`; a response
is ``"<think>reasoning</think> answer"`` (:func:`split_response`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ATTRIBUTES", "QUESTION_KEYWORDS", "REFUSAL_MARKERS", "WEAK_KEYWORDS",
           "AttributeKeywords", "Product", "asked_attribute", "format_product_doc",
           "parse_product_doc", "split_response"]

# Attribute -> possible values (1-3 words). One value may sit inside another ("large" in
# "extra large"): a judge must match a value whole, preferring the longest.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "black", "white", "green", "grey", "pink"),
    "price": ("19 dollars", "29 dollars", "39 dollars", "49 dollars", "59 dollars",
              "79 dollars", "99 dollars"),
    "material": ("stainless steel", "plastic", "aluminum", "cotton", "leather", "nylon",
                 "glass", "bamboo"),
    "weight": ("300 grams", "500 grams", "800 grams", "1 kilogram", "1.5 kilograms",
               "2 kilograms"),
    "warranty": ("6 months", "1 year", "2 years", "3 years"),
    "battery": ("8 hours", "12 hours", "20 hours", "30 hours", "40 hours"),
    "capacity": ("1 liter", "1.5 liters", "2 liters", "20 liters", "30 liters"),
    "shipping": ("1 day", "2 days", "3 days", "5 days", "one week"),
    "size": ("small", "medium", "large", "extra large"),
    "power": ("40 watts", "350 watts", "800 watts", "1200 watts", "1500 watts"),
}

# Attribute -> words (matched at a word start) that identify it in a question. "how much"
# is weak: it means price only when no other attribute is named ("how much does it weigh?").
QUESTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "color": ("color", "colour"),
    "price": ("price", "cost", "expensive", "cheap", "how much"),
    "material": ("material", "made of", "made from"),
    "weight": ("weigh", "heavy"),
    "warranty": ("warranty", "guarantee"),
    "battery": ("battery", "charge"),
    "capacity": ("capacity", "hold", "liters"),
    "shipping": ("shipping", "ship", "deliver", "arrive"),
    "size": ("size", "how big", "dimensions"),
    "power": ("power", "watt"),
}
WEAK_KEYWORDS: tuple[str, ...] = ("how much",)  # count only when no other keyword matches

REFUSAL_MARKERS: tuple[str, ...] = ("doesn't say", "not listed", "doesn't mention",
                                    "don't have that information")


@dataclass(kw_only=True, slots=True, frozen=True)
class Product:
    """One catalogue entry; its document is ``format_product_doc(product)``."""

    id: str
    name: str
    category: str
    attributes: dict[str, str]  # in ATTRIBUTES order

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "category": self.category,
                "attributes": dict(self.attributes)}


def format_product_doc(product: Product) -> str:
    """``"# Product: NAME\\ncategory: C\\nkey: value\\n..."``."""
    lines = [f"# Product: {product.name}", f"category: {product.category}"]
    lines += [f"{key}: {value}" for key, value in product.attributes.items()]
    return "\n".join(lines)


def parse_product_doc(doc: str) -> dict[str, str]:
    """The inverse of :func:`format_product_doc`: ``{"name", "category", attr: value...}``.
    Lines that are not ``key: value`` are ignored; keys are lower-cased."""
    fields: dict[str, str] = {}
    for line in doc.splitlines():
        line = line.strip()
        if line.startswith("# Product:"):
            fields["name"] = line[len("# Product:"):].strip()
            continue
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip() and not key.startswith("#"):
            fields[key.strip().lower()] = value.strip()
    return fields


class AttributeKeywords:
    """Which attribute a question asks about, from keywords per attribute: the keyword
    (matched case-insensitively at a word start) occurring earliest wins, the longest on a
    tie; weak keywords count only when no other keyword matches ("how much does it
    weigh?" asks the weight, "how much is it?" the price). Defaults: the demo's."""

    __slots__ = ("_patterns", "_weak")

    def __init__(self, question_keywords: Mapping[str, Sequence[str]] | None = None,
                 weak_keywords: Sequence[str] = WEAK_KEYWORDS) -> None:
        keywords = QUESTION_KEYWORDS if question_keywords is None else question_keywords
        if isinstance(weak_keywords, str):
            raise TypeError("weak_keywords must be a sequence of phrases, not one string")
        self._patterns = [(attr, [(kw.lower(), re.compile(r"\b" + re.escape(kw.lower())))
                                  for kw in kws]) for attr, kws in keywords.items()]
        self._weak = frozenset(k.lower() for k in weak_keywords)

    def asked_attribute(self, question: str) -> str | None:
        """The attribute ``question`` asks about; None when no keyword occurs."""
        text = question.lower()
        strong, weak = [], []
        for attr, patterns in self._patterns:
            for kw, pattern in patterns:
                if (m := pattern.search(text)) is not None:
                    (weak if kw in self._weak else strong).append((m.start(), -len(kw), attr))
        matches = strong or weak
        return min(matches)[2] if matches else None


_DEMO_KEYWORDS = AttributeKeywords()  # compiled once; read-only


def asked_attribute(question: str) -> str | None:
    """The attribute a question asks about by the demo's keywords
    (:class:`AttributeKeywords` with its defaults); None when no keyword occurs."""
    return _DEMO_KEYWORDS.asked_attribute(question)


def split_response(text: str) -> tuple[str, str]:
    """``"<think>R</think> A"`` -> ``(R, A)``, both stripped. No think block -> ``("", text)``;
    an unclosed ``<think>`` -> ``(R, "")``; a bare ``</think>`` (the opening tag in the
    prompt) -> ``(before, after)``. Text before ``<think>`` joins the answer."""
    open_at, close_at = text.find("<think>"), text.find("</think>")
    if open_at < 0 or (0 <= close_at < open_at):
        if close_at < 0:
            return "", text.strip()
        return text[:close_at].strip(), text[close_at + len("</think>"):].strip()
    before, rest = text[:open_at], text[open_at + len("<think>"):]
    close_at = rest.find("</think>")
    if close_at < 0:
        return rest.strip(), before.strip()
    after = rest[close_at + len("</think>"):]
    return rest[:close_at].strip(), f"{before.strip()} {after.strip()}".strip()
