"""The OpenAI wire format the server speaks: request models and response / chunk builders.

Requests are pydantic models (unknown OpenAI fields are ignored); responses are plain dicts
shaped like OpenAI's ``text_completion``, ``chat.completion`` and ``chat.completion.chunk``
objects. Log-probs: the engine reports the log-prob of each sampled token only, so chat
``top_logprobs`` lists stay empty (``top_logprobs > 0`` is refused) and completions'
``top_logprobs`` hold just the sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from livethinking.engine.outputs import RequestOutput
from livethinking.engine.sampling_params import SamplingParams

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "Delta", "DeltaTracker",
    "StreamOptions", "chat_chunk", "chat_choice", "chat_logprobs", "chat_response",
    "completion_choice", "completion_logprobs", "completion_response", "error_body",
    "sampling_params", "usage",
]


class _Lenient(BaseModel):
    """Ignores fields it does not know (OpenAI clients send many)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    """``stream_options``: ``include_usage`` adds a last chunk with usage, no choices."""

    include_usage: bool = False


class _SamplingFields(_Lenient):
    """Fields completions and chat share (None: the OpenAI default)."""

    model: str
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Extras beyond OpenAI (vLLM spells them the same way).
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``logprobs``: report the sampled tokens' log-probs (0..5)."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)


class ChatMessage(_Lenient):
    """One chat message; content is a string or a list of text parts."""

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as one string (text parts of a multi-part content joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. Without a length limit the answer may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def sampling_params(request: CompletionRequest | ChatCompletionRequest,
                    default_max_tokens: int) -> SamplingParams:
    """The request's `SamplingParams`; raises ValueError for values the engine refuses."""
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = bool(request.logprobs)
        if request.top_logprobs:
            raise ValueError("top_logprobs > 0 is not supported: the engine reports the "
                             "sampled token's log-prob only")
    else:
        max_tokens = request.max_tokens
        logprobs = request.logprobs is not None
    return SamplingParams(
        n=1 if request.n is None else request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        seed=request.seed,
        stop=request.stop or [],
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
    )


# -- streaming deltas ------------------------------------------------------------------

@dataclass(slots=True)
class Delta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None


class DeltaTracker:
    """Turns cumulative `RequestOutput`s into per-choice deltas (slices off what was sent)."""

    def __init__(self, n: int) -> None:
        self._text_len = [0] * n
        self._num_tokens = [0] * n
        self._finished = [False] * n

    def deltas(self, output: RequestOutput) -> list[Delta]:
        """The new text / tokens / finish of each choice that changed, in index order."""
        result = []
        for choice in sorted(output.outputs, key=lambda c: c.index):
            i = choice.index
            if self._finished[i]:
                continue
            text = choice.text[self._text_len[i]:]
            token_ids = choice.token_ids[self._num_tokens[i]:]
            logprobs = (None if choice.logprobs is None
                        else choice.logprobs[self._num_tokens[i]:])
            if not text and not token_ids and choice.finish_reason is None:
                continue
            self._text_len[i] = max(self._text_len[i], len(choice.text))
            self._num_tokens[i] = len(choice.token_ids)
            self._finished[i] = choice.finish_reason is not None
            result.append(Delta(i, text, token_ids, logprobs, choice.finish_reason))
        return result


# -- log-probs ------------------------------------------------------------------------

def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float] | None) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": []}, ...]}``."""
    content = []
    for token_id, logprob in zip(token_ids, logprobs or []):
        token = _token_text(tokenizer, token_id)
        content.append({"token": token, "logprob": float(logprob),
                        "bytes": list(token.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float] | None,
                        text_offset: int = 0) -> dict:
    """The legacy completions shape; ``top_logprobs`` holds the sampled token only."""
    tokens, offsets = [], []
    for token_id in token_ids:
        token = _token_text(tokenizer, token_id)
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
    values = [float(v) for v in (logprobs or [])]
    return {"tokens": tokens, "token_logprobs": values,
            "top_logprobs": [{t: v} for t, v in zip(tokens, values)], "text_offset": offsets}


# -- bodies ---------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None = None) -> dict:
    """One choice of a completion (also of a completion chunk)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(request_id: str, created: int, model: str, choices: list[dict],
                        usage_: dict | None) -> dict:
    """A ``text_completion`` object (streamed chunks use the same object name)."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_choice(index: int, content: str, finish_reason: str | None,
                logprobs: dict | None = None) -> dict:
    """One choice of a ``chat.completion``."""
    return {"index": index, "message": {"role": "assistant", "content": content},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(request_id: str, created: int, model: str, choices: list[dict],
                  usage_: dict) -> dict:
    """A ``chat.completion`` object."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict],
               usage_: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``choices`` items: {index, delta, logprobs, finish_reason}."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


ErrorType = Literal["invalid_request_error", "rate_limit_error", "server_error",
                    "service_unavailable_error", "not_found_error"]


def error_body(message: str, type_: ErrorType = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
