"""The synthetic relevance set: search queries against the livestream demo's kind of
product documents, graded by the tier rule of :mod:`~.rules`.

Products are the livestream catalogue's (``make_catalogue``: 5-7 attributes a product,
the categories in turn) and split by product into train, dev and held-out: a dev or held-out product never
appears in train. Each product gets ``queries_per_product`` queries whose target tier
cycles 1, 2, 3, 4 over the whole set, so every split is balanced to within a product's
share (exactly 25 % each when ``queries_per_product`` is a multiple of 4). A query names
1 or 2 attributes (even odds) and is built to hit its tier:

- 4: the product's category and 1-2 of its listed values;
- 3: the product's category, at least one attribute it does not list (of its category's
  pool when there is one left, else any), the other (if any) a listed value;
- 2: the product's category, at least one listed attribute with another value, the other
  (if any) listed, contradicted or unlisted at random;
- 1: another category with 1-2 attributes of that category's pool, each value the
  product's own half the time when it lists it (a near miss only the category rules out).

The label is then recomputed by :func:`relevance_label` (the rule, not the recipe) and the
record's ``reference_reasoning`` is :func:`reasoning_steps`'s. Everything is deterministic
given the seed (``random.Random``; no torch).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from livethinking.data import write_text_atomic
from livethinking.tasks.livestream.demo_data import CATEGORIES, NAME_PREFIXES, make_catalogue
from livethinking.tasks.livestream.domain import ATTRIBUTES, Product, format_product_doc
from livethinking.tasks.relevance.prompt import DEFAULT_RELEVANCE_PROMPT, format_instructions
from livethinking.tasks.relevance.records import RelevanceRecord, write_relevance_records
from livethinking.tasks.relevance.responses import OUTPUT_FORMATS, TIERS, format_response
from livethinking.tasks.relevance.rules import (SUFFIX_KEYS, Query, format_query,
                                                parse_query, reasoning_steps)

__all__ = ["RelevancePaths", "make_relevance_demo"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RelevancePaths:
    """Where :func:`make_relevance_demo` wrote the set, and how many records each split holds."""

    out_dir: Path
    catalogue: Path
    train: Path
    dev: Path
    heldout: Path
    corpus: Path
    label_train: Path | None  # label-first SFT's extra queries (label_products > 0)
    num_products: int
    num_train: int
    num_dev: int
    num_heldout: int
    num_label_train: int = 0


def _other(rng: random.Random, attr: str, value: str) -> str:
    return rng.choice([v for v in ATTRIBUTES[attr] if v != value])


def _query_for(rng: random.Random, product: Product, tier: int) -> Query:
    listed = list(product.attributes)
    count = rng.randint(1, 2)
    if tier == 1:
        category = rng.choice([c for c in CATEGORIES if c != product.category])
        attrs = rng.sample(CATEGORIES[category], count)
        return Query(category=category, attributes={
            a: product.attributes[a] if a in product.attributes and rng.random() < 0.5
            else rng.choice(ATTRIBUTES[a]) for a in attrs})
    if tier == 4:
        chosen = rng.sample(listed, count)
        values = {a: product.attributes[a] for a in chosen}
    elif tier == 3:
        pool = [a for a in CATEGORIES[product.category] if a not in product.attributes]
        missing = rng.choice(pool or [a for a in ATTRIBUTES if a not in product.attributes])
        values = {missing: rng.choice(ATTRIBUTES[missing])}
        if count == 2:
            kept = rng.choice(listed)
            values[kept] = product.attributes[kept]
    else:  # tier 2
        wrong = rng.choice(listed)
        values = {wrong: _other(rng, wrong, product.attributes[wrong])}
        if count == 2:
            second = rng.choice([a for a in CATEGORIES[product.category] if a != wrong])
            value = product.attributes.get(second)
            values[second] = (rng.choice(ATTRIBUTES[second]) if value is None
                              else value if rng.random() < 0.5 else _other(rng, second, value))
    return Query(category=product.category, attributes=values)


def _records_for(rng: random.Random, product: Product, count: int,
                 first_tier: int) -> list[RelevanceRecord]:
    doc, fields = format_product_doc(product), {"category": product.category,
                                                **product.attributes}
    records, seen = [], set()
    for j in range(count):
        tier = (first_tier + j) % len(TIERS) + 1
        for _ in range(20):  # a fresh query for this product when one is drawn twice
            query = _query_for(rng, product, tier)
            text = format_query(query.category, query.attributes)
            if text not in seen:
                break
        seen.add(text)
        # the reasoning reads the query as a reader of the text would (its word order)
        label, steps = reasoning_steps(parse_query(text), fields)
        records.append(RelevanceRecord(id=f"{product.id}-q{j}", query=text, product_doc=doc,
                                       label=label, reference_reasoning=" ".join(steps)))
    return records


def _corpus(train: list[RelevanceRecord]) -> str:
    lines = []
    for r in train:
        lines += [r.product_doc, r.query, *(format_response(r.label, r.reference_reasoning, f)
                                           for f in OUTPUT_FORMATS)]
    # Shared vocabulary, so dev and held-out values and the prompt's text are covered.
    lines += [f"{a}: {v}" for a, values in ATTRIBUTES.items() for v in values]
    lines += [" ".join(NAME_PREFIXES), " ".join(CATEGORIES), " ".join(SUFFIX_KEYS),
              DEFAULT_RELEVANCE_PROMPT, *(format_instructions(f) for f in OUTPUT_FORMATS)]
    return "\n".join(lines) + "\n"


def make_relevance_demo(out_dir: str | Path, *, num_products: int = 48,
                        queries_per_product: int = 8, heldout_fraction: float = 0.2,
                        dev_fraction: float = 0.1, seed: int = 0,
                        label_products: int = 0) -> RelevancePaths:
    """Write ``catalogue.json`` (every product with its split), ``train.jsonl``,
    ``dev.jsonl``, ``heldout.jsonl`` (:class:`RelevanceRecord` lines) and ``corpus.txt``
    (text to train a tokenizer on: training documents, queries and both response formats,
    plus the whole value vocabulary and the prompt's text; no dev or held-out document)
    under ``out_dir``, each atomically. A positive fraction gives its split at least one
    product; at least one product must be left for train. ``label_products`` > 0 also
    writes ``label_train.jsonl``: that many more products (ids ``l0``, ``l1``, ...; in no
    other split) × ``queries_per_product`` queries, the many cheap examples label-first
    SFT needs (``relevance_label.py``); drawn after everything else, so the other files do
    not change with it."""
    if label_products < 0:
        raise ValueError(f"label_products must be >= 0, got {label_products}")
    if num_products < 1:
        raise ValueError(f"num_products must be >= 1, got {num_products}")
    if queries_per_product < 1:
        raise ValueError(f"queries_per_product must be >= 1, got {queries_per_product}")
    for name, fraction in (("heldout_fraction", heldout_fraction),
                           ("dev_fraction", dev_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    num_heldout = max(1, round(num_products * heldout_fraction)) if heldout_fraction > 0 else 0
    num_dev = max(1, round(num_products * dev_fraction)) if dev_fraction > 0 else 0
    if num_heldout + num_dev >= num_products:
        raise ValueError(f"num_products={num_products} with heldout_fraction={heldout_fraction} "
                         f"and dev_fraction={dev_fraction} leaves no training product")
    rng = random.Random(seed)
    products = make_catalogue(rng, num_products)
    order = [p.id for p in products]
    rng.shuffle(order)
    split_of = {pid: "heldout" for pid in order[:num_heldout]}
    split_of.update({pid: "dev" for pid in order[num_heldout:num_heldout + num_dev]})
    splits: dict[str, list[RelevanceRecord]] = {"train": [], "dev": [], "heldout": []}
    for i, product in enumerate(products):
        records = _records_for(rng, product, queries_per_product, i * queries_per_product)
        splits[split_of.get(product.id, "train")].extend(records)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = RelevancePaths(out_dir=out, catalogue=out / "catalogue.json",
                           train=out / "train.jsonl", dev=out / "dev.jsonl",
                           heldout=out / "heldout.jsonl", corpus=out / "corpus.txt",
                           label_train=out / "label_train.jsonl" if label_products else None,
                           num_products=num_products, num_train=len(splits["train"]),
                           num_dev=len(splits["dev"]), num_heldout=len(splits["heldout"]),
                           num_label_train=label_products * queries_per_product)
    catalogue = {"seed": seed, "products": [
        {**p.to_json(), "split": split_of.get(p.id, "train")} for p in products]}
    write_text_atomic(paths.catalogue, json.dumps(catalogue, indent=1) + "\n")
    for name in ("train", "dev", "heldout"):
        write_relevance_records(getattr(paths, name), splits[name])
    write_text_atomic(paths.corpus, _corpus(splits["train"]))
    if label_products:
        extra: list[RelevanceRecord] = []
        for i, product in enumerate(make_catalogue(rng, label_products)):
            product = replace(product, id=f"l{i}")
            extra += _records_for(rng, product, queries_per_product, i * queries_per_product)
        write_relevance_records(paths.label_train, extra)
    return paths
