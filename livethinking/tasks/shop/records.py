"""The shop task record and the catalogue's JSONL IO.

A task is one simulated shopper: ``request`` (their opening message), the product
``family`` they want (near-identical variants sharing a name), their hidden
``preferences`` (attribute -> value; revealed only when asked), the ``target_id`` (the one
variant that satisfies them) and the ``required`` attributes (those in which the family's
variants differ: what must be asked to tell them apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from livethinking.data import load_json_lines, write_jsonl
from livethinking.tasks.livestream.domain import Product

__all__ = ["ShopTask", "load_catalogue", "load_shop_tasks", "write_catalogue",
           "write_shop_tasks"]


@dataclass(frozen=True, slots=True)
class ShopTask:
    id: str
    request: str
    family: str
    category: str
    preferences: dict[str, str]
    target_id: str
    required: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("id", "request", "family", "target_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"shop task {self.id!r}: {name} must be a non-empty string")
        if not isinstance(self.preferences, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.preferences.items()):
            raise ValueError(f"shop task {self.id!r}: preferences must map strings to strings")
        missing = [a for a in self.required if a not in self.preferences]
        if missing:
            raise ValueError(f"shop task {self.id!r}: required attribute(s) "
                             f"{', '.join(missing)} have no preference")

    def to_json(self) -> dict:
        return {"id": self.id, "request": self.request, "family": self.family,
                "category": self.category, "preferences": dict(self.preferences),
                "target_id": self.target_id, "required": list(self.required)}

    @classmethod
    def from_json(cls, data: dict) -> "ShopTask":
        if not isinstance(data, dict):
            raise ValueError(f"a shop task must be a JSON object, got {type(data).__name__}")
        known = {"id", "request", "family", "category", "preferences", "target_id", "required"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"shop task: unknown field(s) {', '.join(unknown)}")
        missing = sorted(known - {"required"} - set(data))
        if missing:
            raise ValueError(f"shop task: missing field(s) {', '.join(missing)}")
        return cls(id=data["id"], request=data["request"], family=data["family"],
                   category=data["category"], preferences=dict(data["preferences"]),
                   target_id=data["target_id"], required=tuple(data.get("required", ())))


def write_shop_tasks(path: str | Path, tasks: list[ShopTask]) -> Path:
    """Write tasks as JSON lines (atomically)."""
    write_jsonl(path, [t.to_json() for t in tasks])
    return Path(path)


def load_shop_tasks(path: str | Path) -> list[ShopTask]:
    """The tasks of a JSONL file; ValueError naming the line for a bad one."""
    return load_json_lines(path, ShopTask.from_json).items


def write_catalogue(path: str | Path, products: list[Product]) -> Path:
    write_jsonl(path, [p.to_json() for p in products])
    return Path(path)


def _product(data: dict) -> Product:
    if not isinstance(data, dict) or set(data) != {"id", "name", "category", "attributes"}:
        raise ValueError("a catalogue line must be an object with exactly id, name, category, "
                         "attributes")
    return Product(id=data["id"], name=data["name"], category=data["category"],
                   attributes=dict(data["attributes"]))


def load_catalogue(path: str | Path) -> list[Product]:
    """The products of a catalogue JSONL file."""
    return load_json_lines(path, _product).items
