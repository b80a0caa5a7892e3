"""The OpenAI wire format the server speaks: request models and response / chunk builders.

Requests are pydantic models (unknown OpenAI fields are ignored); responses are plain dicts
shaped like OpenAI's ``text_completion``, ``chat.completion`` and ``chat.completion.chunk``
objects. Log-probs: the engine reports the log-prob of each sampled token only, so chat
``top_logprobs`` lists stay empty (``top_logprobs > 0`` is refused) and completions'
``top_logprobs`` hold just the sampled token; a log-prob of -inf is reported as
``MIN_LOGPROB`` (JSON has no infinities).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictBool,
                      StrictFloat, StrictInt)

from livethinking.engine.outputs import RequestOutput
from livethinking.engine.sampling_params import MAX_SEED, MAX_TOP_K, MIN_SEED, SamplingParams

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "Delta", "DeltaTracker",
    "MIN_LOGPROB", "StreamOptions", "TextPart", "chat_chunk", "chat_choice", "chat_logprobs",
    "chat_response", "completion_choice", "completion_logprobs", "completion_prompts",
    "completion_response", "error_body", "routed_experts_b64", "sampling_params", "usage",
]

MIN_LOGPROB = -9999.0  # what -inf log-probs are reported as (vLLM's floor; JSON has no inf)
_MAX_INT64 = 2**63 - 1


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text must be valid Unicode; found a lone surrogate at character "
                         f"{exc.start}") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]  # a string that encodes as UTF-8


def _is_token_id(value) -> bool:
    return type(value) is int and value >= 0


def _prompt(value):
    if isinstance(value, str):
        return _valid_unicode(value)
    if isinstance(value, list) and value:
        if all(_is_token_id(t) for t in value):
            return value
        if all(isinstance(p, str) for p in value):
            return [_valid_unicode(p) for p in value]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
            return value
    raise ValueError("prompt must be a string, a non-empty list of token ids (ints >= 0), "
                     "a non-empty list of strings, or a non-empty list of non-empty token-id "
                     "lists")


# OpenAI's four prompt shapes, checked in one place for one clear error message
Prompt = Annotated[str | list[int] | list[str] | list[list[int]],
                   PlainValidator(_prompt, json_schema_input_type=
                                  str | list[int] | list[str] | list[list[int]])]


class _Lenient(BaseModel):
    """Ignores fields it does not know (OpenAI clients send many); types are strict where
    OpenAI's are (no "yes" for a bool, no true for an int) and numbers must be finite."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Lenient):
    """``stream_options``: ``include_usage`` adds a last chunk with usage, no choices."""

    include_usage: StrictBool = False


class _SamplingFields(_Lenient):
    """Fields completions and chat share (None: the OpenAI default)."""

    model: Text
    temperature: StrictFloat | None = Field(None, ge=0.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=64)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    # Extras beyond OpenAI (vLLM spells them the same way).
    top_k: StrictInt | None = Field(None, ge=-1, le=MAX_TOP_K)
    ignore_eos: StrictBool = False


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a batch (a list
    of strings or of token-id lists; each prompt gets ``n`` choices, numbered
    ``prompt_index * n + sample_index``). ``logprobs``: report the sampled tokens'
    log-probs (0..5). ``return_token_ids`` (vLLM's): each choice also holds
    ``prompt_token_ids`` and its ``token_ids`` (streamed: the chunk's new ids, the prompt's
    ids in a choice's first chunk)."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(16, ge=1, le=_MAX_INT64)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    return_token_ids: StrictBool = False
    return_routed_experts: StrictBool = False  # SGLang's; each choice's ``routed_experts``


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts as a batch: a single prompt becomes a batch of one."""
    prompt = request.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


class TextPart(_Lenient):
    """A content part; only text parts are supported."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Lenient):
    """One chat message (OpenAI's roles); content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts of a multi-part content joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. Without a length limit the answer may fill the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, le=_MAX_INT64)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=_MAX_INT64)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


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
    routed = bool(getattr(request, "return_routed_experts", False))
    if routed and request.stream:
        raise ValueError("return_routed_experts is not supported with stream: true")
    return SamplingParams(
        n=1 if request.n is None else request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        seed=request.seed,
        stop=[] if request.stop is None else request.stop,  # "" is refused like [""]
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        return_routed_experts=routed,
    )


def routed_experts_b64(routes) -> str | None:
    """SGLang's wire form of a sample's routes (tokens, MoE layers, k): base64 of their
    int32 little-endian bytes (decode: ``frombuffer(b64decode(s), int32).reshape(-1,
    layers, k)``); None when there are none."""
    if routes is None:
        return None
    data = routes.to("cpu").int().contiguous().numpy().astype("<i4").tobytes()
    return base64.b64encode(data).decode("ascii")


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

def _finite(logprob: float) -> float:
    value = float(logprob)
    return value if math.isfinite(value) else MIN_LOGPROB


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float] | None) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": []}, ...]}``."""
    content = []
    for token_id, logprob in zip(token_ids, logprobs or []):
        token = _token_text(tokenizer, token_id)
        content.append({"token": token, "logprob": _finite(logprob),
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
    values = [_finite(v) for v in (logprobs or [])]
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
                    "service_unavailable_error", "not_found_error", "authentication_error",
                    "permission_error"]


def error_body(message: str, type_: ErrorType = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
