"""The synthetic livestream set: a product catalogue, viewer questions, and a programmatic teacher.

Each product has a name, a category and 5-7 attributes drawn from :data:`ATTRIBUTES`; its
document is ``"# Product: NAME"`` then one ``key: value`` line each (:func:`format_product_doc`,
inverted by :func:`parse_product_doc`). About 20% of questions ask for an attribute the
document does not list; their reference is a polite refusal containing one of
:data:`REFUSAL_MARKERS`. Held-out prompts come from held-out products only. Everything is
deterministic given the seed (``random.Random``; no torch).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from livethinking.data.jsonl import write_jsonl, write_text_atomic
from livethinking.data.records import LivestreamRecord, Turn

__all__ = ["ATTRIBUTES", "QUESTION_KEYWORDS", "REFUSAL_MARKERS", "Product", "DemoPaths",
           "DemoTeacher", "asked_attribute", "format_product_doc", "make_demo",
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
_WEAK_KEYWORDS = frozenset({"how much"})

REFUSAL_MARKERS: tuple[str, ...] = ("doesn't say", "not listed", "doesn't mention",
                                    "don't have that information")

CATEGORIES: dict[str, tuple[str, ...]] = {  # category -> attributes its products draw from
    "kettle": ("color", "price", "material", "capacity", "power", "warranty", "weight",
               "shipping"),
    "headphones": ("color", "price", "battery", "weight", "warranty", "material", "shipping"),
    "backpack": ("color", "price", "material", "capacity", "weight", "size", "shipping",
                 "warranty"),
    "lamp": ("color", "price", "material", "power", "battery", "warranty", "shipping"),
    "blender": ("color", "price", "power", "capacity", "material", "warranty", "weight",
                "shipping"),
    "sneakers": ("color", "price", "material", "size", "weight", "shipping", "warranty"),
}
NAME_PREFIXES = ("Nimbus", "Aurora", "Pebble", "Summit", "Breeze", "Comet", "Harbor", "Maple",
                 "Orbit", "Cedar", "Lumen", "Tidal", "Ember", "Falcon", "Willow", "Zephyr")

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is it?", "Does it come in any other color?",
              "What colour is the {name}?"),
    "price": ("How much does it cost?", "What's the price of the {name}?", "How much is it?",
              "Is it expensive?"),
    "material": ("What material is it?", "What is the {name} made of?",
                 "Which material do they use for this one?"),
    "weight": ("How much does it weigh?", "Is the {name} heavy?", "What does it weigh?"),
    "warranty": ("Does it have a warranty?", "How long is the warranty?",
                 "Is there a guarantee on the {name}?"),
    "battery": ("How long does the battery last?", "What's the battery life?",
                "How long does it run on one charge?"),
    "capacity": ("What's the capacity?", "How much can it hold?",
                 "How many liters does the {name} take?"),
    "shipping": ("How fast is shipping?", "When will it arrive?",
                 "How long does delivery take for the {name}?"),
    "size": ("What size is it?", "How big is the {name}?", "What are the dimensions?"),
    "power": ("How powerful is it?", "What's the wattage of the {name}?",
              "How many watts does it use?"),
}
ANSWER_TEMPLATES: dict[str, str] = {
    "color": "It comes in {value}.", "price": "It costs {value}.",
    "material": "It is made of {value}.", "weight": "It weighs {value}.",
    "warranty": "The warranty is {value}.", "battery": "The battery lasts {value}.",
    "capacity": "It holds {value}.", "shipping": "Shipping takes {value}.",
    "size": "The size is {value}.", "power": "It is rated at {value}.",
}
REFUSAL_TEMPLATES = (
    "Sorry, the product document doesn't say anything about the {attr}.",
    "Good question! The {attr} is not listed for the {name}, so I can't tell you.",
    "I'm afraid the listing doesn't mention the {attr}; please check with the seller.",
    "Sorry, I don't have that information: the {attr} is not in the product details.",
)
OPENERS = ("", "", "Great question! ", "Sure! ", "Thanks for asking! ")
FILLERS = (
    "The viewer wants a quick answer, so the reply should be short.",
    "I should not guess any detail that is not written in the document.",
    "The product in question is the {name} (category: {category}).",
    "Other details such as the {other} were not asked about.",
    "A friendly tone works best during a livestream.",
    "I should double check that I am reading the right product.",
    "Many viewers ask about the {attr} before they buy.",
    "The document lists the details one per line, so I can scan it.",
    "If the detail is missing, the honest reply is to say so politely.",
    "The answer should name the {attr} directly without extra chatter.",
)

_REASONING_PHRASES = ("The viewer asks:", "Let me check the product document.",
                      "The document says", "I don't see a line about the",
                      "Earlier the viewer asked:", "So the answer is",
                      "So I should say that the document does not list it.")


@dataclass(kw_only=True, slots=True, frozen=True)
class Product:
    id: str
    name: str
    category: str
    attributes: dict[str, str]  # in ATTRIBUTES order

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "category": self.category,
                "attributes": dict(self.attributes)}


@dataclass(kw_only=True, slots=True, frozen=True)
class DemoPaths:
    """Where :func:`make_demo` wrote the set, and how many records each split holds."""

    out_dir: Path
    catalogue: Path
    train: Path
    heldout: Path
    corpus: Path
    num_train: int
    num_heldout: int


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


_KEYWORD_RES = {attr: [(kw, re.compile(r"\b" + re.escape(kw))) for kw in kws]
                for attr, kws in QUESTION_KEYWORDS.items()}


def asked_attribute(question: str) -> str | None:
    """The attribute a question asks about: the earliest keyword match (longest on a tie),
    weak keywords counting only when nothing else matches; None when no keyword occurs."""
    text = question.lower()
    strong, weak = [], []
    for attr, patterns in _KEYWORD_RES.items():
        for kw, pattern in patterns:
            m = pattern.search(text)
            if m:
                (weak if kw in _WEAK_KEYWORDS else strong).append((m.start(), -len(kw), attr))
    matches = strong or weak
    return min(matches)[2] if matches else None


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


def _answer(attr: str, value: str) -> str:
    return ANSWER_TEMPLATES[attr].format(value=value)


def _refusal(rng: random.Random, attr: str, name: str) -> str:
    return rng.choice(REFUSAL_TEMPLATES).format(attr=attr, name=name)


def _make_catalogue(rng: random.Random, num_products: int) -> list[Product]:
    categories = list(CATEGORIES)
    products, names = [], set()
    for i in range(num_products):
        category = categories[i % len(categories)]
        base = f"{rng.choice(NAME_PREFIXES)} {category.title()}"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base} {n}"
        names.add(name)
        pool = CATEGORIES[category]
        chosen = set(rng.sample(pool, rng.randint(5, min(7, len(pool)))))
        attributes = {a: rng.choice(ATTRIBUTES[a]) for a in ATTRIBUTES if a in chosen}
        products.append(Product(id=f"p{i:03d}", name=name, category=category,
                                attributes=attributes))
    return products


def _question(rng: random.Random, attr: str, name: str) -> str:
    return rng.choice(QUESTION_TEMPLATES[attr]).format(name=name)


def _records_for(rng: random.Random, product: Product, count: int) -> list[LivestreamRecord]:
    doc = format_product_doc(product)
    listed = list(product.attributes)
    missing = [a for a in ATTRIBUTES if a not in product.attributes]
    records = []
    for j in range(count):
        if missing and rng.random() < 0.2:
            attr = rng.choice(missing)
            reference = _refusal(rng, attr, product.name)
        else:
            attr = rng.choice(listed)
            reference = _answer(attr, product.attributes[attr])
        history: list[Turn] = []
        if rng.random() < 0.4:
            for earlier in rng.sample([a for a in listed if a != attr], rng.randint(1, 2)):
                history += [Turn(role="user", content=_question(rng, earlier, product.name)),
                            Turn(role="assistant",
                                 content=_answer(earlier, product.attributes[earlier]))]
        records.append(LivestreamRecord(id=f"{product.id}-q{j}", product_doc=doc,
                                        question=_question(rng, attr, product.name),
                                        history=history, reference=reference))
    return records


def _corpus(train: list[LivestreamRecord]) -> str:
    lines = []
    for r in train:
        lines += [r.product_doc, *(t.content for t in r.history), r.question, r.reference]
    # Shared vocabulary, so held-out values and the teacher's phrasing are covered.
    lines += [f"{a}: {v}" for a, values in ATTRIBUTES.items() for v in values]
    lines += [" ".join(NAME_PREFIXES), " ".join(CATEGORIES), " ".join(REFUSAL_MARKERS)]
    lines += [t for ts in QUESTION_TEMPLATES.values() for t in ts]
    lines += list(REFUSAL_TEMPLATES) + list(FILLERS) + list(_REASONING_PHRASES)
    return "\n".join(lines) + "\n"


def make_demo(out_dir: str | Path, *, num_products: int = 24, questions_per_product: int = 8,
              heldout_fraction: float = 0.2, seed: int = 0) -> DemoPaths:
    """Write ``catalogue.json``, ``train.jsonl``, ``heldout.jsonl`` and ``corpus.txt`` (text
    to train a tokenizer on) under ``out_dir``, each atomically."""
    if num_products < 1:
        raise ValueError(f"num_products must be >= 1, got {num_products}")
    if questions_per_product < 1:
        raise ValueError(f"questions_per_product must be >= 1, got {questions_per_product}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    num_heldout_products = round(num_products * heldout_fraction)
    if heldout_fraction > 0:
        num_heldout_products = max(1, num_heldout_products)
    if num_heldout_products >= num_products:
        raise ValueError(f"num_products={num_products} with heldout_fraction="
                         f"{heldout_fraction} leaves no training product")
    rng = random.Random(seed)
    products = _make_catalogue(rng, num_products)
    order = list(range(num_products))
    rng.shuffle(order)
    heldout_ids = {products[i].id for i in order[:num_heldout_products]}
    train, heldout = [], []
    for product in products:
        records = _records_for(rng, product, questions_per_product)
        (heldout if product.id in heldout_ids else train).extend(records)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(out_dir=out, catalogue=out / "catalogue.json", train=out / "train.jsonl",
                      heldout=out / "heldout.jsonl", corpus=out / "corpus.txt",
                      num_train=len(train), num_heldout=len(heldout))
    catalogue = {"seed": seed, "products": [
        {**p.to_json(), "split": "heldout" if p.id in heldout_ids else "train"}
        for p in products]}
    write_text_atomic(paths.catalogue, json.dumps(catalogue, indent=1) + "\n")
    write_jsonl(paths.train, train)
    write_jsonl(paths.heldout, heldout)
    write_text_atomic(paths.corpus, _corpus(train))
    return paths


@dataclass(kw_only=True, slots=True)
class DemoTeacher:
    """A programmatic teacher: ``respond(record, k)`` gives k ``"<think>R</think> A"``
    responses with verbose reasoning of varying length and a short answer; each is wrong
    with probability ``error_rate`` (another value, a made-up value for a refusal
    question, or a refusal of an answerable one). Responses for a record depend only on
    (seed, record.id): ``respond(r, 2)`` is a prefix of ``respond(r, 4)``."""

    seed: int
    error_rate: float = 0.25
    min_filler: int = 1
    max_filler: int = 6

    def __post_init__(self):
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if not 0 <= self.min_filler <= self.max_filler:
            raise ValueError(f"need 0 <= min_filler <= max_filler, got "
                             f"min_filler={self.min_filler}, max_filler={self.max_filler}")

    def respond(self, record: LivestreamRecord, k: int) -> list[str]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rng = random.Random(f"{self.seed}\x00{record.id}")
        return [self._one(rng, record) for _ in range(k)]

    def _one(self, rng: random.Random, record: LivestreamRecord) -> str:
        doc = parse_product_doc(record.product_doc)
        name = doc.get("name", "product")
        attr = asked_attribute(record.question)
        true_value = doc.get(attr) if attr else None
        wrong = rng.random() < self.error_rate
        attr_name = attr or "detail"
        if true_value is not None and not wrong:
            value = true_value
        elif true_value is not None and rng.random() < 2 / 3:  # another value
            value = rng.choice([v for v in ATTRIBUTES[attr] if v != true_value])
        elif true_value is None and wrong and attr is not None:  # a made-up value
            value = rng.choice(ATTRIBUTES[attr])
        else:  # a refusal: right when the document is silent, wrong otherwise
            value = None

        steps = [f"The viewer asks: \"{record.question}\""]
        user_turns = [t.content for t in record.history if t.role == "user"]
        if user_turns and rng.random() < 0.5:
            steps.append(f"Earlier the viewer asked: \"{user_turns[-1]}\"")
        steps.append("Let me check the product document.")
        if value is not None:
            steps.append(f"The document says \"{attr}: {value}\".")
        else:
            steps.append(f"I don't see a line about the {attr_name} in the document.")
        others = [a for a in doc if a not in ("name", "category", attr)] or ["price"]
        fillers = rng.sample(FILLERS, rng.randint(self.min_filler, self.max_filler))
        steps += [f.format(name=name, category=doc.get("category", "product"),
                           attr=attr_name, other=rng.choice(others)) for f in fillers]
        if value is not None:
            answer = rng.choice(OPENERS) + _answer(attr, value)
            steps.append(f"So the answer is {value}.")
        else:
            answer = _refusal(rng, attr_name, name)
            steps.append("So I should say that the document does not list it.")
        return f"<think>{' '.join(steps)}</think> {answer}"
