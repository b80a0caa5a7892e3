"""The relevance task's chat prompt: a system message (instructions, the tier definitions,
the required output format, then the product document) and a user message (the query).

Render it with ``livethinking.model.prompt.encode_chat(tokenizer, messages)``; the query and
document come from users, and ``encode_chat`` keeps their text from opening a turn.
"""

from __future__ import annotations

from livethinking.tasks.relevance.responses import TIERS, check_output_format, format_label

__all__ = ["DEFAULT_RELEVANCE_PROMPT", "LABEL_FIRST_PROMPT", "PROMPT_LAYOUTS", "TIER_DEFINITIONS",
           "format_instructions", "messages"]

# "default": system = instructions + tier definitions + the document, user = the query.
# "query_doc_query" (label first): system = one short instruction, user = the query, the
# document (without its "# Product:" name line), the query again. Under causal attention
# the document's lines can attend to the query before them and the query after them to the
# document, so the forward that emits the first response token can decide the tier
# (benchmarks/RESULTS.md, the relevance demo: label first).
PROMPT_LAYOUTS: tuple[str, ...] = ("default", "query_doc_query")
LABEL_FIRST_PROMPT = "Judge how well the product matches the search query. Label first."

DEFAULT_RELEVANCE_PROMPT = (
    "You judge how well a product matches a shopper's search query on an e-commerce site. "
    "Use only the product document below.")

TIER_DEFINITIONS: dict[int, str] = {
    4: "the product is the queried kind and every queried attribute matches the document",
    3: "the product is the queried kind, nothing contradicts the query, but a queried "
       "attribute is not listed in the document",
    2: "the product is the queried kind but a queried attribute contradicts the document",
    1: "the product is another kind of product",
}


def format_instructions(output_format: str) -> str:
    """The tier definitions and the output format the parser (`parse_label`) expects."""
    check_output_format(output_format)
    tiers = "\n".join(f"{format_label(k)}: {TIER_DEFINITIONS[k]}." for k in TIERS)
    if output_format == "cot":
        shape = ("First reason step by step inside <think></think>, then give the label "
                 "alone on the next line: <think>reasoning</think>\n4-Excellent")
    else:
        shape = ("Give the label first, alone on the first line, then your reasoning "
                 "inside <think></think>: 4-Excellent\n<think>reasoning</think>")
    return f"Relevance tiers:\n{tiers}\n\n{shape}"


def messages(record, system_prompt: str | None = None, *, output_format: str = "cot",
             layout: str = "default") -> list[dict[str, str]]:
    """``[system, user]`` for ``record`` (anything with ``query`` and ``product_doc``).
    ``system_prompt`` replaces :data:`DEFAULT_RELEVANCE_PROMPT` (the opening instructions)
    only: the tier definitions and the output format are always included, since the
    parser depends on them. ``layout`` (:data:`PROMPT_LAYOUTS`): ``"query_doc_query"``
    replaces all of it by :data:`LABEL_FIRST_PROMPT` (or ``system_prompt``) and sends the
    query, the document and the query again as the user message (the label-first layout)."""
    if layout not in PROMPT_LAYOUTS:
        raise ValueError(f"layout must be one of {PROMPT_LAYOUTS}, got {layout!r}")
    query, doc = record.query, record.product_doc
    if not isinstance(query, str) or not query.strip():
        raise ValueError("record.query must be a non-empty string")
    if not isinstance(doc, str):
        raise TypeError(f"record.product_doc must be a string, got {type(doc).__name__}")
    if layout == "query_doc_query":
        check_output_format(output_format)
        lines = "\n".join(l for l in doc.strip().splitlines() if not l.startswith("# Product:"))
        asked = f"Query: {query}"
        return [{"role": "system",
                 "content": LABEL_FIRST_PROMPT if system_prompt is None else system_prompt},
                {"role": "user", "content": f"{asked}\n\n# Product document\n{lines}\n\n{asked}"}]
    intro = DEFAULT_RELEVANCE_PROMPT if system_prompt is None else system_prompt
    system = f"{intro}\n\n{format_instructions(output_format)}"
    if doc.strip():
        system += f"\n\n# Product document\n{doc.strip()}"
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]
