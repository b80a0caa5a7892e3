"""The synthetic livestream set: a product catalogue and viewer questions with references.

Each product has a name, a category and 5-7 attributes drawn from :data:`ATTRIBUTES`; its
document is :func:`format_product_doc`'s. About 20% of questions ask for an attribute the
document does not list; their reference is a polite refusal containing one of
:data:`REFUSAL_MARKERS`. Held-out prompts come from held-out products only. The
pre-training corpus (``pretrain.jsonl``, one ``{"text": ...}`` per training or listing-only
product: its document, then its ``key: value`` lines again and 1-2 ``key: not listed``
lines for keys it lacks, shuffled) holds no held-out product. An optional RL split
(``rl.jsonl``) asks about products of its own, in neither the SFT prompts, the corpus nor
the held-out split: prompts for GRPO on documents the SFT student has never seen, so the
correctness reward still has something to teach. Everything is deterministic
given the seed (``random.Random``; no torch).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from livethinking.data import LivestreamRecord, Turn, write_jsonl, write_text_atomic
from livethinking.tasks.livestream.domain import (ATTRIBUTES, REFUSAL_MARKERS, Product,
                                                  format_product_doc)

__all__ = ["ANSWER_TEMPLATES", "CATEGORIES", "FILLERS", "NAME_PREFIXES", "NOT_LISTED", "OPENERS",
           "QUESTION_TEMPLATES", "REFUSAL_TEMPLATES", "DemoPaths", "answer_sentence",
           "make_catalogue", "make_demo", "pretraining_text", "refusal_sentence"]

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
                      "Looking it up:",
                      "Earlier the viewer asked:", "So the answer is",
                      "So I should say that the document does not list it.")


@dataclass(kw_only=True, slots=True, frozen=True)
class DemoPaths:
    """Where :func:`make_demo` wrote the set, and how many records each split holds."""

    out_dir: Path
    catalogue: Path
    train: Path
    heldout: Path
    corpus: Path
    pretrain: Path
    rl: Path
    num_train: int
    num_heldout: int
    num_rl: int


def answer_sentence(attr: str, value: str) -> str:
    """The demo's short answer stating ``attr`` is ``value``."""
    return ANSWER_TEMPLATES[attr].format(value=value)


def refusal_sentence(rng: random.Random, attr: str, name: str) -> str:
    """One of the demo's polite refusals (each holds a :data:`REFUSAL_MARKERS` phrase)."""
    return rng.choice(REFUSAL_TEMPLATES).format(attr=attr, name=name)


def make_catalogue(rng: random.Random, num_products: int) -> list[Product]:
    """``num_products`` products, categories in turn, unique names, 5-7 attributes each
    with values drawn from :data:`ATTRIBUTES` (ids ``p000``, ``p001``, ...)."""
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


def _listing_products(rng: random.Random, count: int, asked: list[Product]) -> list[Product]:
    """``count`` products after ``asked`` in the catalogue (ids and names continue theirs)."""
    drawn = make_catalogue(rng, len(asked) + count)[len(asked):]
    taken = {p.name for p in asked}
    listing = []
    for i, product in enumerate(drawn, start=len(asked)):
        name, n = product.name, 1
        while name in taken:  # a drawn name may repeat an asked product's
            n += 1
            name = f"{product.name} #{n}"
        taken.add(name)
        listing.append(Product(id=f"p{i:03d}", name=name, category=product.category,
                               attributes=product.attributes))
    return listing


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
            reference = refusal_sentence(rng, attr, product.name)
        else:
            attr = rng.choice(listed)
            reference = answer_sentence(attr, product.attributes[attr])
        history: list[Turn] = []
        if rng.random() < 0.4:
            for earlier in rng.sample([a for a in listed if a != attr], rng.randint(1, 2)):
                history += [Turn(role="user", content=_question(rng, earlier, product.name)),
                            Turn(role="assistant",
                                 content=answer_sentence(earlier, product.attributes[earlier]))]
        records.append(LivestreamRecord(id=f"{product.id}-q{j}", product_doc=doc,
                                        question=_question(rng, attr, product.name),
                                        history=history, reference=reference))
    return records


NOT_LISTED = "not listed"  # a catalogue text's (and the teacher's) value for a missing key


def pretraining_text(rng: random.Random, product: Product) -> str:
    """``product``'s document, a blank line, then its ``key: value`` lines again with 1-2
    keys the document lacks as ``key: not listed``, in a shuffled order: a catalogue text in
    which every value is a lookup in the document above, present or absent (what a
    pre-trained student can already do; the tiny demo student learns it here)."""
    missing = [a for a in ATTRIBUTES if a not in product.attributes]
    lines = [f"{key}: {value}" for key, value in product.attributes.items()]
    lines += [f"{key}: {NOT_LISTED}"
              for key in rng.sample(missing, min(len(missing), rng.randint(1, 2)))]
    rng.shuffle(lines)
    return "\n".join([format_product_doc(product), "", *lines])


def _corpus(train: list[LivestreamRecord]) -> str:
    lines = []
    for r in train:
        lines += [r.product_doc, *(t.content for t in r.history), r.question, r.reference]
    # Shared vocabulary, so held-out values and the teacher's phrasing are covered.
    lines += [f"{a}: {v}" for a, values in ATTRIBUTES.items() for v in (*values, NOT_LISTED)]
    lines += [" ".join(NAME_PREFIXES), " ".join(CATEGORIES), " ".join(REFUSAL_MARKERS)]
    lines += [t for ts in QUESTION_TEMPLATES.values() for t in ts]
    lines += list(REFUSAL_TEMPLATES) + list(FILLERS) + list(_REASONING_PHRASES)
    return "\n".join(lines) + "\n"


def make_demo(out_dir: str | Path, *, num_products: int = 24, questions_per_product: int = 8,
              heldout_fraction: float = 0.2, listing_products: int = 0,
              rl_products: int = 0, seed: int = 0) -> DemoPaths:
    """Write ``catalogue.json``, ``train.jsonl``, ``heldout.jsonl``, ``corpus.txt`` (text
    to train a tokenizer on) and ``pretrain.jsonl`` (:func:`pretraining_text` of every
    training product) under ``out_dir``, each atomically. ``listing_products`` more
    products join the catalogue with no question asked about them (split ``"listing"``):
    their texts are in ``pretrain.jsonl``, never in a held-out split; they are drawn from
    their own random stream, so the asked products and prompts do not depend on it.
    ``rl_products`` more products (split ``"rl"``, their own stream too) get
    ``questions_per_product`` prompts each in ``rl.jsonl`` (empty when 0) and appear nowhere
    else: GRPO's prompts on unseen documents."""
    if num_products < 1:
        raise ValueError(f"num_products must be >= 1, got {num_products}")
    if listing_products < 0:
        raise ValueError(f"listing_products must be >= 0, got {listing_products}")
    if rl_products < 0:
        raise ValueError(f"rl_products must be >= 0, got {rl_products}")
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
    products = make_catalogue(rng, num_products)
    order = list(range(num_products))
    rng.shuffle(order)
    heldout_ids = {products[i].id for i in order[:num_heldout_products]}
    train, heldout = [], []
    for product in products:
        records = _records_for(rng, product, questions_per_product)
        (heldout if product.id in heldout_ids else train).extend(records)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing = _listing_products(random.Random(f"{seed}\x00listing"), listing_products,
                                products)
    rl_rng = random.Random(f"{seed}\x00rl")
    rl_asked = _listing_products(rl_rng, rl_products, [*products, *listing])
    rl = [r for product in rl_asked for r in _records_for(rl_rng, product, questions_per_product)]
    paths = DemoPaths(out_dir=out, catalogue=out / "catalogue.json", train=out / "train.jsonl",
                      heldout=out / "heldout.jsonl", corpus=out / "corpus.txt",
                      pretrain=out / "pretrain.jsonl", rl=out / "rl.jsonl",
                      num_train=len(train), num_heldout=len(heldout), num_rl=len(rl))
    catalogue = {"seed": seed, "products": [
        {**p.to_json(), "split": "heldout" if p.id in heldout_ids else "train"}
        for p in products] + [{**p.to_json(), "split": "listing"} for p in listing]
        + [{**p.to_json(), "split": "rl"} for p in rl_asked]}
    write_text_atomic(paths.catalogue, json.dumps(catalogue, indent=1) + "\n")
    write_jsonl(paths.train, train)
    write_jsonl(paths.heldout, heldout)
    write_jsonl(paths.rl, rl)
    write_text_atomic(paths.corpus, _corpus(train))
    pretrain_rng = random.Random(f"{seed}\x00pretrain")  # the splits above stay as they were
    write_text_atomic(paths.pretrain, "".join(
        json.dumps({"text": pretraining_text(pretrain_rng, p)}) + "\n"
        for p in [*products, *listing] if p.id not in heldout_ids))
    return paths
