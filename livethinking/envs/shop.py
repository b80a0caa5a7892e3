"""A shopping simulator in ShopSimulator's spirit, built from the demo catalogue.

The agent serves one simulated shopper per episode. Tools: ``search(query, filters)``
(products whose name and category hold the query's words, filtered by exact attribute
values; at most ``max_results``), ``view(product_id)`` (the product's details),
``compare(ids)`` (the attributes in which 2-5 products differ), ``ask_user(question)``
(the shopper answers for the attributes the question names, from a hidden profile they
reveal only when asked) and ``buy(product_id)``, which ends the episode. The catalogue holds
families of near-identical products that differ in one or two attributes, so buying the
first search hit is usually wrong.

Rewards, at the end: ``strict`` (1 when the bought product is the shopper's target) and
``loose`` (the fraction of the shopper's required attributes the bought product has);
reward = strict + ``loose_weight`` · loose. The episode also ends, with reward 0, when the
turn budget (``max_turns`` model turns) runs out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from livethinking.envs.base import ToolEnvironment
from livethinking.envs.tools import ToolCallError, ToolSpec
from livethinking.tasks.livestream.domain import ATTRIBUTES, Product
from livethinking.tasks.shop.records import ShopTask, load_catalogue, load_shop_tasks
from livethinking.tasks.shop.shopper import (format_comparison, format_results, format_view,
                                             shopper_reply)

__all__ = ["SHOP_SYSTEM_PROMPT", "ShopConfig", "ShopEnvironment", "shop_rewards"]

SHOP_SYSTEM_PROMPT = ("You are a shopping assistant. Find the product the shopper wants and "
                      "buy it. Call one tool per turn.")

_STRING = {"type": "string"}
SHOP_TOOLS = (
    ToolSpec("search", "Search the catalogue by words of the product name or category, "
             "optionally keeping only products with the given attribute values.",
             {"query": {**_STRING, "description": "words of the product name or category"},
              "filters": {"type": "object", "description": "attribute -> exact value"}},
             ("query",)),
    ToolSpec("view", "Show every detail of one product.",
             {"product_id": {**_STRING, "description": "a product id from a search"}},
             ("product_id",)),
    ToolSpec("compare", "List the attributes in which 2 to 5 products differ.",
             {"ids": {"type": "array", "items": _STRING, "description": "product ids"}},
             ("ids",)),
    ToolSpec("ask_user", "Ask the shopper a question about what they want.",
             {"question": {**_STRING, "description": "the question"}}, ("question",)),
    ToolSpec("buy", "Buy one product for the shopper; ends the conversation.",
             {"product_id": {**_STRING, "description": "the product to buy"}},
             ("product_id",)),
)


@dataclass(kw_only=True, slots=True)
class ShopConfig:
    """``catalogue``: a JSONL file of products (``data make-demo --task shop`` writes one);
    or ``products`` given in memory."""

    catalogue: str | None = None
    products: tuple | None = None  # of Product, instead of a file
    max_turns: int = 8
    max_results: int = 5
    loose_weight: float = 0.5
    system_prompt: str = SHOP_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if (self.catalogue is None) == (self.products is None):
            raise ValueError("give exactly one of catalogue (a JSONL path) or products")
        for name in ("max_turns", "max_results"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.loose_weight < 0:
            raise ValueError(f"loose_weight must be >= 0, got {self.loose_weight!r}")


def shop_rewards(task: ShopTask, bought: Product | None) -> tuple[float, float]:
    """(strict, loose): bought the target; the fraction of ``task.required`` attributes the
    bought product has with the shopper's value (1 when nothing is required; 0, 0 when
    nothing was bought)."""
    if bought is None:
        return 0.0, 0.0
    strict = float(bought.id == task.target_id)
    if not task.required:
        return strict, 1.0
    met = sum(bought.attributes.get(a) == task.preferences[a] for a in task.required)
    return strict, met / len(task.required)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class ShopEnvironment(ToolEnvironment):
    Config = ShopConfig
    tool_specs = SHOP_TOOLS

    def __init__(self, config: ShopConfig | None = None, **overrides) -> None:
        if config is None:
            config = ShopConfig(**overrides)
        elif overrides:
            raise ValueError("pass either config or keyword overrides, not both")
        self.config = config
        products = (load_catalogue(config.catalogue) if config.catalogue is not None
                    else list(config.products))
        self.products = {p.id: p for p in products}
        if len(self.products) != len(products):
            raise ValueError("the catalogue repeats a product id")
        self._index = [(p, _words(p.name) | _words(p.category)) for p in products]
        self.task: ShopTask | None = None

    @classmethod
    def load_tasks(cls, path) -> list[ShopTask]:
        """Shopper tasks from JSON lines (``data make-demo --task shop`` writes them)."""
        return load_shop_tasks(path)

    # ------------------------------------------------------------------ episode
    def reset(self, task: ShopTask) -> list[dict[str, str]]:
        if not isinstance(task, ShopTask):
            raise TypeError(f"task must be a ShopTask, got {type(task).__name__}")
        if task.target_id not in self.products:
            raise ValueError(f"task {task.id!r}: target {task.target_id!r} is not in the "
                             f"catalogue")
        self.task = task
        self.turns = 0
        self.bought: Product | None = None
        self.asked: list[str] = []
        return [{"role": "system", "content": self.config.system_prompt},
                {"role": "user", "content": task.request}]

    def step(self, action_text: str):
        if self.task is None:
            raise RuntimeError("call reset(task) before step")
        if self.bought is not None or self.turns >= self.config.max_turns:
            raise RuntimeError("the episode is over; call reset(task)")
        self.turns += 1
        return super().step(action_text)

    def after_turn(self) -> tuple[float, bool, dict]:
        done = self.bought is not None or self.turns >= self.config.max_turns
        if not done:
            return 0.0, False, {}
        strict, loose = shop_rewards(self.task, self.bought)
        return (strict + self.config.loose_weight * loose, True,
                {"strict": strict, "loose": loose, "turns": self.turns,
                 "bought": None if self.bought is None else self.bought.id,
                 "end": "bought" if self.bought is not None else "turn budget",
                 "asked": list(self.asked)})

    # ------------------------------------------------------------------ tools
    def _product(self, product_id) -> Product:
        product = self.products.get(product_id)
        if product is None:
            raise ToolCallError(f"no product has id {product_id!r}")
        return product

    def tool_search(self, query: str, filters: dict | None = None) -> str:
        filters = filters or {}
        for key, value in filters.items():
            if key not in ATTRIBUTES:
                raise ToolCallError(f"unknown filter {key!r}; filters are attributes: "
                                    f"{', '.join(ATTRIBUTES)}")
            if not isinstance(value, str):
                raise ToolCallError(f"the filter {key} must be a string value")
        words = _words(query)
        if not words:
            raise ToolCallError("the query has no words")
        scored = [(len(words & have), p) for p, have in self._index]
        best = max((s for s, _ in scored), default=0)
        hits = [p for s, p in scored if s == best and s > 0
                and all(p.attributes.get(k, "").lower() == v.lower() for k, v in filters.items())]
        return format_results(hits[:self.config.max_results])

    def tool_view(self, product_id: str) -> str:
        return format_view(self._product(product_id))

    def tool_compare(self, ids: list) -> str:
        if not 2 <= len(ids) <= 5:
            raise ToolCallError(f"compare takes 2 to 5 ids, got {len(ids)}")
        return format_comparison([self._product(i) for i in ids])

    def tool_ask_user(self, question: str) -> str:
        reply = shopper_reply(self.task.preferences, question)
        self.asked.append(question)
        return reply

    def tool_buy(self, product_id: str) -> str:
        self.bought = self._product(product_id)
        return f"Order placed for {self.bought.id}."
