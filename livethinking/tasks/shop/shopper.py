"""The simulated shopper's rules and the texts the shop's tools answer with.

The shopper holds a hidden profile (``ShopTask.preferences``) and reveals a preference only
when a question names its attribute (:func:`asked_attributes`: the attribute's name or a
synonym at a word start, ``colour`` and ``cost`` included). The texts are one line per
item, ``key: value`` pairs kept whole, so what an agent must carry from an observation into
its next call is a copy.
"""

from __future__ import annotations

import re

from livethinking.tasks.livestream.domain import ATTRIBUTES, Product

__all__ = ["ATTRIBUTE_SYNONYMS", "asked_attributes", "format_comparison", "format_results",
           "format_view", "parse_comparison", "parse_reply", "parse_results", "shopper_reply"]

ATTRIBUTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "color": ("color", "colour"), "price": ("price", "cost", "budget"),
    "material": ("material", "made of"), "weight": ("weight", "heavy"),
    "warranty": ("warranty", "guarantee"), "battery": ("battery",),
    "capacity": ("capacity",), "shipping": ("shipping", "delivery"), "size": ("size",),
    "power": ("power", "wattage", "watts"),
}


def asked_attributes(question: str) -> list[str]:
    """The attributes ``question`` asks about, in the order they first occur."""
    found = []
    lowered = question.lower()
    for attr in ATTRIBUTES:
        hits = [m.start() for s in ATTRIBUTE_SYNONYMS.get(attr, (attr,))
                for m in re.finditer(r"\b" + re.escape(s), lowered)]
        if hits:
            found.append((min(hits), attr))
    return [attr for _, attr in sorted(found)]


def shopper_reply(preferences: dict[str, str], question: str) -> str:
    """What the shopper answers: ``I want color: red, material: glass.`` for the asked
    attributes they care about, ``any size is fine`` for those they do not."""
    asked = asked_attributes(question)
    if not asked:
        return "Sorry, I do not understand. Ask me about an attribute such as color or material."
    wanted = [f"{a}: {preferences[a]}" for a in asked if a in preferences]
    free = [a for a in asked if a not in preferences]
    parts = []
    if wanted:
        parts.append("I want " + ", ".join(wanted) + ".")
    if free:
        parts.append("Any " + " or ".join(free) + " is fine.")
    return " ".join(parts)


def parse_reply(reply: str) -> dict[str, str]:
    """The ``key: value`` preferences a :func:`shopper_reply` states."""
    match = re.match(r"I want (.*?)\.(?: |$)", reply)
    if match is None:
        return {}
    body = match.group(1)
    pairs = [p.split(": ", 1) for p in body.split(", ") if ": " in p]
    return {k: v for k, v in pairs}


def format_results(products: list[Product]) -> str:
    """A search result: ``N results:`` (``1 result:``) then ``id name, price`` lines (``no results``)."""
    if not products:
        return "no results"
    lines = [f"{p.id} {p.name}, {p.attributes.get('price', 'price not listed')}"
             for p in products]
    count = "1 result" if len(products) == 1 else f"{len(products)} results"
    return f"{count}:\n" + "\n".join(lines)


def parse_results(text: str) -> list[str]:
    """The product ids of a :func:`format_results` text."""
    return [line.split(" ", 1)[0] for line in text.splitlines()[1:] if line.strip()]


def format_view(product: Product) -> str:
    """``id: ...``, ``name: ...``, ``category: ...`` then every ``key: value``."""
    lines = [f"id: {product.id}", f"name: {product.name}", f"category: {product.category}"]
    return "\n".join(lines + [f"{k}: {v}" for k, v in product.attributes.items()])


def format_comparison(products: list[Product]) -> str:
    """The attributes in which ``products`` differ, one line each:
    ``color: p001 red, p002 blue`` (``not listed`` where one lacks it)."""
    keys = [a for a in ATTRIBUTES if any(a in p.attributes for p in products)]
    lines = []
    for key in keys:
        values = [p.attributes.get(key, "not listed") for p in products]
        if len(set(values)) > 1:
            lines.append(f"{key}: " + ", ".join(f"{p.id} {v}" for p, v in zip(products, values)))
    return "\n".join(lines) if lines else "no differences"


def parse_comparison(text: str) -> list[str]:
    """The attributes a :func:`format_comparison` text lists."""
    return [line.split(":", 1)[0] for line in text.splitlines()
            if ":" in line and line.split(":", 1)[0] in ATTRIBUTES]
