"""The synthetic shop: families of near-identical products, shoppers, expert trajectories.

Each family is one demo-catalogue product and its variants: one or two of its attributes
(never the price, which search results show) take two values each, so a family holds 2 or
4 products with the same name. A shopper wants one variant: their hidden preferences are
its values of the varying attributes (``required``) and of one attribute all variants
share. Held-out shoppers come in two kinds: new shoppers of the training families (a
variant no training shopper wants: the questions and the choice must follow this shopper)
and shoppers of families no training shopper wants (new products as well). Deterministic
given the seed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from livethinking.tasks.livestream.demo_data import CATEGORIES, NAME_PREFIXES, make_catalogue
from livethinking.tasks.livestream.domain import ATTRIBUTES, Product
from livethinking.tasks.shop.records import ShopTask, write_catalogue, write_shop_tasks

__all__ = ["MODEL_WORDS", "REQUEST_TEMPLATES", "ShopPaths", "make_shop_catalogue", "make_shop_data"]

MODEL_WORDS = ("Aria", "Nova", "Flux", "Vita", "Luxe", "Echo", "Mira", "Zest", "Halo", "Rift",
               "Pulse", "Dune", "Glow", "Peak", "Core", "Wave")
REQUEST_TEMPLATES = ("I want to buy a {family}.", "Hi! I am looking for the {family}.",
                     "Can you get me a {family}?", "I need a {family}, please.")


@dataclass(frozen=True, slots=True)
class ShopPaths:
    out_dir: Path
    catalogue: Path
    train: Path
    heldout: Path
    heldout_new: Path
    rl: Path
    expert: Path
    corpus: Path
    num_train: int
    num_heldout: int
    num_heldout_new: int
    num_rl: int
    pretrain: Path | None = None  # pre-training texts (make_shop_demo writes them and expert)
    num_expert: int = 0
    num_pretrain: int = 0


def make_shop_catalogue(rng: random.Random, num_families: int
                        ) -> tuple[list[Product], list[tuple[str, list[Product], list[str]]]]:
    """(products, families as (name, variants, varying attributes)); ids ``sNNNN`` at
    random.
    Family names are ``prefix model category``, unique, so a search by a family's name
    matches all three words of that family only."""
    stems = [f"{p} {m}" for p in NAME_PREFIXES for m in MODEL_WORDS]
    if num_families > len(stems) * len(CATEGORIES):
        raise ValueError(f"at most {len(stems) * len(CATEGORIES)} families, got {num_families}")
    unused = {c: rng.sample(stems, len(stems)) for c in CATEGORIES}  # per category
    products, families = [], []
    # ids drawn at random from s0000-s9999 (not in order), so training and held-out
    # products' ids are made of the same digit pieces: copying an id generalises
    ids = iter(rng.sample(range(10000), 4 * num_families))
    for base in make_catalogue(rng, num_families):
        base = Product(id=base.id, name=f"{unused[base.category].pop()} {base.category.title()}",
                       category=base.category, attributes=base.attributes)
        keys = [a for a in base.attributes if a != "price"]
        varying = rng.sample(keys, 1 if rng.random() < 0.5 else 2)
        choices = []
        for key in varying:
            other = rng.choice([v for v in ATTRIBUTES[key] if v != base.attributes[key]])
            choices.append((base.attributes[key], other))
        variants = []
        for combo in itertools.product(*choices):
            attributes = dict(base.attributes)
            attributes.update(zip(varying, combo))
            variants.append(Product(id=f"s{next(ids):04d}", name=base.name,
                                    category=base.category, attributes=attributes))
        rng.shuffle(variants)
        products += variants
        families.append((base.name, variants, varying))
    return products, families


def _shopper(rng: random.Random, task_id: str, family, target: Product) -> ShopTask:
    name, _, varying = family
    shared = [a for a in target.attributes if a not in varying and a != "price"]
    extra = rng.sample(shared, min(1, len(shared)))
    return ShopTask(id=task_id, request=rng.choice(REQUEST_TEMPLATES).format(family=name),
                    family=name, category=target.category,
                    preferences={a: target.attributes[a] for a in [*varying, *extra]},
                    target_id=target.id, required=tuple(varying))


def _split_shoppers(rng: random.Random, families, per_family: int
                    ) -> tuple[list[ShopTask], list[ShopTask], list[ShopTask]]:
    """Per family: up to ``per_family`` training shoppers, one held-out shopper and, when a
    variant is left, one RL shopper, each wanting a different variant (at least one variant
    is kept for the held-out shopper)."""
    train, heldout, rl = [], [], []
    for f, family in enumerate(families):
        targets = rng.sample(family[1], len(family[1]))
        k = min(per_family, len(targets) - 1)
        train += [_shopper(rng, f"t{f:04d}-{j}", family, t) for j, t in enumerate(targets[:k])]
        heldout.append(_shopper(rng, f"h{f:04d}", family, targets[k]))
        if len(targets) > k + 1:
            rl.append(_shopper(rng, f"r{f:04d}", family, targets[k + 1]))
    return train, heldout, rl


def make_shop_data(out_dir: str | Path, *, num_families: int = 120, heldout_families: int = 30,
                   tasks_per_family: int = 2, seed: int = 0) -> ShopPaths:
    """Write the shop to ``out_dir``: catalogue.jsonl; train.jsonl, up to
    ``tasks_per_family`` shoppers of each of ``num_families`` families; heldout.jsonl, one
    more shopper per training family, wanting a variant no training shopper of it wants
    (new preferences, known products); heldout_new.jsonl, one shopper of each of
    ``heldout_families`` families no training shopper wants (new products too); rl.jsonl,
    one more shopper of each training family with a variant left, wanting it (GRPO's
    shoppers: new preferences the SFT data does not hold).
    ``livethinking.envs.shop_oracle.make_shop_demo`` adds the expert trajectories and the
    tokenizer corpus."""
    if num_families < 1 or heldout_families < 1:
        raise ValueError(f"num_families and heldout_families must be >= 1, got "
                         f"{num_families} and {heldout_families}")
    if tasks_per_family < 1:
        raise ValueError(f"tasks_per_family must be >= 1, got {tasks_per_family}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    products, families = make_shop_catalogue(rng, num_families + heldout_families)
    train, heldout, rl = _split_shoppers(rng, families[:num_families], tasks_per_family)
    new = [_shopper(rng, f"n{f:04d}", family, rng.choice(family[1]))
           for f, family in enumerate(families[num_families:])]
    paths = ShopPaths(out, out / "catalogue.jsonl", out / "train.jsonl", out / "heldout.jsonl",
                      out / "heldout_new.jsonl", out / "rl.jsonl", out / "expert.jsonl",
                      out / "corpus.txt", len(train), len(heldout), len(new), len(rl),
                      pretrain=out / "pretrain.jsonl")
    write_catalogue(paths.catalogue, products)
    write_shop_tasks(paths.train, train)
    write_shop_tasks(paths.heldout, heldout)
    write_shop_tasks(paths.heldout_new, new)
    write_shop_tasks(paths.rl, rl)
    return paths
