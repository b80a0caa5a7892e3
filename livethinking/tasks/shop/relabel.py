"""Relabelled shop families: the same kind of variants under fresh product ids and names.

A product id or a family name is a label: an agent must copy it from the request or from
what a tool returned, never recall it. A student trained only on the training shoppers'
episodes remembers which ids its families hold and buys a remembered id for a new shopper.
The copies here break that link: the family of a training shopper, its variants unchanged,
under ids drawn afresh from ``id_pool`` (the catalogue's own ids, so every id a held-out
episode shows has been seen as a label) and a name no catalogue family has (so the held-out
families' names stay unseen). :func:`random_families` makes families of the same shape the
catalogue has, under such labels, for the shop demo's pre-training texts.
"""

from __future__ import annotations

import random

from livethinking.tasks.livestream.demo_data import NAME_PREFIXES
from livethinking.tasks.livestream.domain import Product
from livethinking.tasks.shop.demo_data import (MODEL_WORDS, REQUEST_TEMPLATES, _shopper,
                                               make_shop_catalogue)
from livethinking.tasks.shop.records import ShopTask

__all__ = ["random_families", "relabel_shopper", "unused_family_names"]


def unused_family_names(products: list[Product]) -> dict[str, list[str]]:
    """Per category of ``products``: the ``prefix model Category`` names no product has."""
    taken = {p.name for p in products}
    names = {}
    for category in sorted({p.category for p in products}):
        names[category] = [name for prefix in NAME_PREFIXES for model in MODEL_WORDS
                           if (name := f"{prefix} {model} {category.title()}") not in taken]
    return names


def _relabel(rng: random.Random, variants: list[Product], id_pool: list[str],
             names: dict[str, list[str]]) -> tuple[list[Product], dict[str, str]]:
    category = variants[0].category
    if not names.get(category):
        raise ValueError(f"no unused family name is left for category {category!r}")
    if len(id_pool) < len(variants):
        raise ValueError(f"id_pool holds {len(id_pool)} ids, fewer than the family's "
                         f"{len(variants)} variants")
    name = rng.choice(names[category])
    ids = dict(zip((p.id for p in variants), rng.sample(id_pool, len(variants))))
    return [Product(id=ids[p.id], name=name, category=p.category,
                    attributes=dict(p.attributes)) for p in variants], ids


def relabel_shopper(rng: random.Random, task: ShopTask, variants: list[Product],
                    id_pool: list[str], names: dict[str, list[str]]
                    ) -> tuple[list[Product], ShopTask]:
    """``task``'s family ``variants`` under fresh ids from ``id_pool`` and a fresh name from
    ``names[category]``, and the same shopper (preferences, required attributes, the same
    target variant) asking for it with a request drawn afresh: (products, task)."""
    products, ids = _relabel(rng, variants, id_pool, names)
    name = products[0].name
    return products, ShopTask(
        id=task.id, request=rng.choice(REQUEST_TEMPLATES).format(family=name), family=name,
        category=task.category, preferences=dict(task.preferences),
        target_id=ids[task.target_id], required=task.required)


def random_families(rng: random.Random, count: int, id_pool: list[str],
                    names: dict[str, list[str]]) -> list[tuple[list[Product], ShopTask]]:
    """``count`` families shaped as the catalogue's (2 or 4 variants differing in one or two
    attributes), each under fresh labels, with one shopper wanting a random variant."""
    if not any(names.values()):
        raise ValueError("names holds no unused family name")
    made = []
    while len(made) < count:
        batch = min(count - len(made), 200)
        _, families = make_shop_catalogue(rng, batch)
        for _, variants, varying in families:
            if variants[0].category not in names:
                continue  # a category the catalogue lacks: no unused names are known
            products, _ = _relabel(rng, variants, id_pool, names)
            task = _shopper(rng, f"p{len(made):05d}", (products[0].name, products, varying),
                            rng.choice(products))
            made.append((products, task))
    return made[:count]
