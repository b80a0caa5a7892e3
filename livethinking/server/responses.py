"""Answers built from engine outputs: a whole completion / chat completion, or its SSE
events. A request of ``P`` prompts with ``n`` samples each has ``P·n`` choices; choice
``c`` of prompt ``p`` is numbered ``p·n + c`` (as vLLM and OpenAI number a batch), and
usage sums over the prompts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from livethinking.engine.outputs import RequestOutput
from livethinking.server import protocol as P
from livethinking.server.engine_thread import EngineDeadError, EngineStepError
from livethinking.server.metrics import RequestTracker
from livethinking.server.streaming import sse

__all__ = ["ENGINE_DEAD_MESSAGE", "STEP_FAILED_MESSAGE", "stream_events", "whole_response"]

_log = logging.getLogger(__name__)

ENGINE_DEAD_MESSAGE = "the engine is not running; retry later"
STEP_FAILED_MESSAGE = "the server failed while generating this request"


def _usage(lasts: list[RequestOutput]) -> dict:
    return P.usage(sum(len(last.prompt_token_ids) for last in lasts),
                   sum(len(c.token_ids) for last in lasts for c in last.outputs))


def whole_response(tokenizer, model: str, kind: str, want_logprobs: bool, request_id: str,
                   created: int, lasts: list[RequestOutput], n: int,
                   return_token_ids: bool = False) -> dict:
    """The ``text_completion`` or ``chat.completion`` of the finished outputs, one per
    prompt (completions' choices with ``prompt_token_ids`` and ``token_ids`` when
    ``return_token_ids``)."""
    choices = []
    for p, last in enumerate(lasts):
        for c in sorted(last.outputs, key=lambda c: c.index):
            index = p * n + c.index
            if kind == "chat":
                lp = P.chat_logprobs(tokenizer, c.token_ids, c.logprobs) if want_logprobs else None
                choices.append(P.chat_choice(index, c.text, c.finish_reason, lp))
            else:
                lp = (P.completion_logprobs(tokenizer, c.token_ids, c.logprobs)
                      if want_logprobs else None)
                choices.append(P.completion_choice(index, c.text, c.finish_reason, lp))
                if c.routed_experts is not None:
                    choices[-1]["routed_experts"] = P.routed_experts_b64(c.routed_experts)
                if return_token_ids:
                    choices[-1].update(prompt_token_ids=list(last.prompt_token_ids),
                                       token_ids=list(c.token_ids))
    build = P.chat_response if kind == "chat" else P.completion_response
    return build(request_id, created, model, choices, _usage(lasts))


async def stream_events(tokenizer, model: str, kind: str, request_id: str, created: int,
                        firsts: list[RequestOutput],
                        outputs: AsyncIterator[tuple[int, RequestOutput]],
                        trackers: list[RequestTracker], include_usage: bool,
                        n: int, return_token_ids: bool = False) -> AsyncIterator[str]:
    """The SSE events of one request: its first outputs, then ``(prompt, output)`` pairs
    as they come; closing it early closes ``outputs`` (which aborts the requests). A
    failure mid-stream ends the stream with an error event, never a traceback."""
    chat = kind == "chat"
    deltas = [P.DeltaTracker(n) for _ in firsts]
    text_offsets = [0] * (len(firsts) * n)  # completions' text_offset per choice
    want_logprobs = any(c.logprobs is not None for f in firsts for c in f.outputs)
    lasts = list(firsts)
    sent_prompt_ids: set[int] = set()  # choices whose chunk carried prompt_token_ids

    def chunk(p: int, output: RequestOutput) -> str | None:
        choices = []
        for d in deltas[p].deltas(output):
            index = p * n + d.index
            if not d.text and d.finish_reason is None and not want_logprobs \
                    and not (return_token_ids and d.token_ids):
                continue  # tokens that do not complete a character yet
            if chat:
                lp = (P.chat_logprobs(tokenizer, d.token_ids, d.logprobs)
                      if want_logprobs else None)
                delta = {"content": d.text} if d.text or not d.finish_reason else {}
                choices.append({"index": index, "delta": delta, "logprobs": lp,
                                "finish_reason": d.finish_reason})
            else:
                lp = None
                if want_logprobs:
                    lp = P.completion_logprobs(tokenizer, d.token_ids, d.logprobs,
                                               text_offsets[index])
                    text_offsets[index] += len(d.text)
                choices.append(P.completion_choice(index, d.text, d.finish_reason, lp))
                if return_token_ids:
                    choices[-1]["token_ids"] = list(d.token_ids)
                    if index not in sent_prompt_ids:
                        sent_prompt_ids.add(index)
                        choices[-1]["prompt_token_ids"] = list(output.prompt_token_ids)
        if not choices:
            return None
        build = P.chat_chunk if chat else P.completion_response
        return sse(build(request_id, created, model, choices, None))

    try:
        async with contextlib.aclosing(outputs):
            if chat:
                yield sse(P.chat_chunk(request_id, created, model, [
                    {"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None} for i in range(len(firsts) * n)]))
            for p, first in enumerate(firsts):
                if (event := chunk(p, first)) is not None:
                    yield event
            async for p, output in outputs:
                trackers[p].observe(output)
                lasts[p] = output
                if (event := chunk(p, output)) is not None:
                    yield event
        if include_usage:
            build = P.chat_chunk if chat else P.completion_response
            yield sse(build(request_id, created, model, [], _usage(lasts)))
        yield sse("[DONE]")
    except EngineDeadError:
        yield sse(P.error_body(ENGINE_DEAD_MESSAGE, "service_unavailable_error"))
        yield sse("[DONE]")
    except EngineStepError:
        yield sse(P.error_body(STEP_FAILED_MESSAGE, "server_error"))
        yield sse("[DONE]")
    except Exception:  # a bug here must not reach the client as a traceback
        _log.exception("streaming request %s failed", request_id)
        yield sse(P.error_body(STEP_FAILED_MESSAGE, "server_error"))
        yield sse("[DONE]")
