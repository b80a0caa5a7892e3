"""Prompt formatting for the livestream assistant: a product document, the chat so far,
and a viewer's question, rendered to token ids with the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_SYSTEM_PROMPT", "build_messages", "format_livestream_prompt"]

DEFAULT_SYSTEM_PROMPT = (
    "You are the host's assistant on a live shopping stream. Answer viewers' questions "
    "about the product using only the product document below. Be brief, friendly and "
    "accurate; if the document does not say, answer that you do not know rather than guess."
)

_ROLES = ("user", "assistant")


def build_messages(product_doc: str, history: Sequence[dict], question: str, *,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages: system (instructions + product document), history, the question."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if not isinstance(product_doc, str):
        raise TypeError(f"product_doc must be a string, got {type(product_doc).__name__}")
    instructions = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    system = f"{instructions}\n\n# Product document\n{product_doc.strip()}" if product_doc.strip() else instructions
    messages = [{"role": "system", "content": system}]
    for i, turn in enumerate(history):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn or "content" not in turn:
            raise ValueError(f"history[{i}] must be a dict with exactly 'role' and 'content', got {turn!r}")
        if turn["role"] not in _ROLES:
            raise ValueError(f"history[{i}] has role {turn['role']!r}; history roles must be 'user' or 'assistant'")
        if not isinstance(turn["content"], str):
            raise ValueError(f"history[{i}] content must be a string, got {type(turn['content']).__name__}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    messages.append({"role": "user", "content": question})
    return messages


def format_livestream_prompt(tokenizer, product_doc: str, history: Sequence[dict], question: str, *,
                             system_prompt: str | None = None, add_generation_prompt: bool = True,
                             enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the prompt for answering ``question``.

    ``enable_thinking`` is passed to the template (Qwen3 templates read it) only when
    given, so templates that do not know it are unaffected.
    """
    messages = build_messages(product_doc, history, question, system_prompt=system_prompt)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False, **extra)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # some versions return a batch of one
        ids = ids[0]
    return [int(i) for i in ids]
