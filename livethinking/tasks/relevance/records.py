"""The relevance task's record: a search query, one product document and its gold tier,
with strict JSONL loading (the livestream loader's machinery: every problem reported as
``"{path}:{line}: {reason}"`` naming the field) and atomic writing.

JSON: ``{"id", "query", "product_doc", "label": 1..4, "reference_reasoning"?}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from livethinking.data import LoadResult, write_jsonl
from livethinking.data.jsonl import _check_keys, _Invalid, _load, _text
from livethinking.tasks.relevance.responses import TIERS

__all__ = ["RelevanceRecord", "load_relevance_records", "write_relevance_records"]

_KEYS = ("id", "query", "product_doc", "label", "reference_reasoning")
_REQUIRED = ("id", "query", "product_doc", "label")


def _label_error(label: object) -> str | None:
    if isinstance(label, bool) or not isinstance(label, int):
        return f"'label' must be an int in 1..4, got {type(label).__name__} {label!r}"
    if label not in TIERS:
        return f"'label' must be an int in 1..4, got {label}"
    return None


@dataclass(kw_only=True, slots=True)
class RelevanceRecord:
    """One query-product pair and its gold tier (``label``, 1..4: :data:`TIERS`);
    ``reference_reasoning`` is a correct reasoning for it when known (the demo's is
    programmatic). Construction checks the fields as the loader does (ValueError)."""

    id: str
    query: str
    product_doc: str
    label: int
    reference_reasoning: str | None = None

    def __post_init__(self):
        for name in ("id", "query", "product_doc"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"RelevanceRecord.{name} must be a non-empty string, "
                                 f"got {value!r}")
        if (error := _label_error(self.label)) is not None:
            raise ValueError(f"RelevanceRecord: {error}")
        if self.reference_reasoning is not None and not isinstance(self.reference_reasoning, str):
            raise ValueError("RelevanceRecord.reference_reasoning must be a string or None, "
                             f"got {type(self.reference_reasoning).__name__}")

    def to_json(self) -> dict:
        d = {"id": self.id, "query": self.query, "product_doc": self.product_doc,
             "label": self.label}
        if self.reference_reasoning is not None:
            d["reference_reasoning"] = self.reference_reasoning
        return d

    def messages(self, system_prompt: str | None = None, *, output_format: str = "cot",
                 layout: str = "default") -> list[dict[str, str]]:
        """The chat messages asking for this pair's tier (:func:`~.prompt.messages`)."""
        from livethinking.tasks.relevance.prompt import messages

        return messages(self, system_prompt, output_format=output_format, layout=layout)


def _parse(obj: object) -> RelevanceRecord:
    obj = _check_keys(obj, _KEYS, _REQUIRED)
    if (error := _label_error(obj["label"])) is not None:
        raise _Invalid(error)
    reasoning = obj.get("reference_reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise _Invalid(f"'reference_reasoning' must be a string or null, "
                       f"got {type(reasoning).__name__}")
    return RelevanceRecord(id=_text(obj, "id", non_empty=True),
                           query=_text(obj, "query", non_empty=True),
                           product_doc=_text(obj, "product_doc", non_empty=True),
                           label=obj["label"], reference_reasoning=reasoning)


def load_relevance_records(path: str | os.PathLike, *, on_error: str = "fail") -> LoadResult:
    """Relevance records, ids unique within the file. ``on_error="fail"`` raises
    :class:`livethinking.data.DataError` (``"{path}:{line}: {reason}"``) at the first bad
    line; ``"skip"`` drops it and lists ``(line, reason)`` in ``skipped``."""
    return _load(path, _parse, on_error, unique_ids=True)


def write_relevance_records(path: str | os.PathLike, records: Iterable[RelevanceRecord]) -> None:
    """``records`` as JSONL, atomically (``write_jsonl`` of their ``to_json()`` dicts)."""
    write_jsonl(path, [r.to_json() for r in records])
