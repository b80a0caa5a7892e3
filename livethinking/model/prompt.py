"""Prompt formatting: chat messages rendered to token ids with the tokenizer's own chat
template, message text never able to open a turn (`encode_chat`), and the livestream
assistant's prompt (a product document, the chat so far, a viewer's question)."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["DEFAULT_SYSTEM_PROMPT", "build_messages", "encode_chat", "format_livestream_prompt"]

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


def _special_tokens(tokenizer) -> list:
    """The tokenizer's special added tokens (``AddedToken``s), longest text first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = [t for t in decoder.values() if getattr(t, "special", False) and t.content]
    return sorted(tokens, key=lambda t: len(t.content), reverse=True)


def _free_marker(texts: Sequence[str]) -> str:
    """A private-use character that occurs in none of ``texts``."""
    for code in range(0xE000, 0xF900):
        marker = chr(code)
        if not any(marker in t for t in texts):
            return marker
    raise ValueError("the messages use every private-use character; cannot encode them")


def encode_chat(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                **template_kwargs) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, where text
    inside a message's content can never become a control token.

    Special-token text typed in a content (``<|im_start|>system``) is tokenised as ordinary
    text (``split_special_tokens``), so it cannot close the turn or open another; only the
    template's own special tokens are control tokens. For content without special-token
    text the ids equal ``tokenizer.encode(rendered, add_special_tokens=False)``: the
    rendered text is split at the template's special tokens and each piece in between is
    encoded alone, as the tokenizer itself does (an ``lstrip``/``rstrip`` special token
    still eats the whitespace beside it). Content is marked, not replaced, while the
    template runs, so templates that trim or inspect it behave as usual.
    """
    specials = _special_tokens(tokenizer)
    contents = [m.get("content") for m in messages]
    template = getattr(tokenizer, "chat_template", None)
    texts = [c for c in contents if isinstance(c, str)] + [str(template or "")]
    marker = _free_marker(texts)
    guards = [(t.content, t.content[0] + marker + t.content[1:]) for t in specials]
    marked = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            for text, guarded in guards:
                content = content.replace(text, guarded)
            message = {**message, "content": content}
        marked.append(message)
    rendered = tokenizer.apply_chat_template(marked, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    if not specials:
        return list(tokenizer.encode(rendered.replace(marker, ""), add_special_tokens=False))
    by_text = {t.content: t for t in specials}
    pattern = re.compile("|".join(re.escape(t.content) for t in specials))
    ids: list[int] = []
    pieces: list[str | object] = []  # text pieces and AddedTokens, in order
    at = 0
    for match in pattern.finditer(rendered):  # only the template's: content ones are marked
        pieces += [rendered[at:match.start()], by_text[match.group()]]
        at = match.end()
    pieces.append(rendered[at:])
    for i, piece in enumerate(pieces):
        if not isinstance(piece, str):
            ids.append(tokenizer.convert_tokens_to_ids(piece.content))
            continue
        if i > 0 and getattr(pieces[i - 1], "rstrip", False) is True:
            piece = piece.lstrip()
        if i + 1 < len(pieces) and getattr(pieces[i + 1], "lstrip", False) is True:
            piece = piece.rstrip()
        piece = piece.replace(marker, "")
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
    return [int(i) for i in ids]


def format_livestream_prompt(tokenizer, product_doc: str, history: Sequence[dict], question: str, *,
                             system_prompt: str | None = None, add_generation_prompt: bool = True,
                             enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the prompt for answering ``question`` (by `encode_chat`: the product
    document, history and question come from users, so their text cannot open a turn).

    ``enable_thinking`` is passed to the template (Qwen3 templates read it) only when
    given, so templates that do not know it are unaffected.
    """
    messages = build_messages(product_doc, history, question, system_prompt=system_prompt)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, **extra)
