"""The livestream task's records: a product document, the chat so far, a viewer question."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LivestreamRecord", "TeacherSample", "Turn"]

ROLES = ("user", "assistant")


@dataclass(kw_only=True, slots=True, frozen=True)
class Turn:
    role: str  # "user" (a viewer) or "assistant" (the host assistant)
    content: str


@dataclass(kw_only=True, slots=True)
class LivestreamRecord:
    """One prompt: JSON ``{id, product_doc, history: [{role, content}], question,
    reference?}``. ``reference`` is a correct, helpful answer when known (for a question
    the document cannot answer, a polite refusal)."""

    id: str
    product_doc: str
    question: str
    history: list[Turn] = field(default_factory=list)
    reference: str | None = None

    def to_json(self) -> dict:
        d = {"id": self.id, "product_doc": self.product_doc,
             "history": [{"role": t.role, "content": t.content} for t in self.history],
             "question": self.question}
        if self.reference is not None:
            d["reference"] = self.reference
        return d


@dataclass(kw_only=True, slots=True, frozen=True)
class TeacherSample:
    """One teacher response for record ``id``: JSON ``{id, response}``."""

    id: str
    response: str
