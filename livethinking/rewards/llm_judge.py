"""An LLM-as-judge over an OpenAI-compatible chat endpoint.

Each (record, answer) becomes one chat request: the rubric filled with the product
document, chat history, question and the answer part of the response. Requests run in a
thread pool of ``concurrency``; a failed request (HTTP error, timeout) or an unparseable
reply is retried up to ``retries`` times, sleeping backoff·2^(k−1) before retry k. A reply
parses as JSON ``{"score": 0..1 | "yes"/"no", "reason": ...}`` (bare, in ```json
fences, or amid text) or as a ``VERDICT: yes|no`` / ``Score: 0.8`` line. When every
attempt fails the verdict is ``Verdict(0.0, "unparseable: ..." | "error: ...")`` and
``num_failures`` grows by one. Needs the ``openai`` package (imported on construction).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from livethinking.data import LivestreamRecord
from livethinking.rewards.base import Judge, Verdict, check_batch
from livethinking.tasks.livestream import split_response

__all__ = ["DEFAULT_RUBRICS", "JUDGE_KINDS", "LLMJudge", "parse_verdict"]

JUDGE_KINDS = ("correctness", "helpfulness")

_SHOW = """Product document:
{product_doc}

Chat so far:
{history}

Viewer question: {question}

Assistant answer: {answer}
"""

_REPLY_BINARY = 'Reply with JSON only: {{"score": 1 or 0, "reason": "<one sentence>"}}'
_REPLY_GRADED = 'Reply with JSON only: {{"score": <0 to 1>, "reason": "<one sentence>"}}'

DEFAULT_RUBRICS = {
    "correctness": (
        "You check answers of a livestream shopping assistant against the product "
        "document. The answer is correct when every fact it states agrees with the "
        "document and it invents nothing; when the document does not cover the question, "
        "the only correct answer is a polite statement that the document does not say.\n\n"
        + _SHOW + "\nIs the answer correct? " + _REPLY_BINARY),
    "helpfulness": (
        "You rate answers of a livestream shopping assistant for helpfulness to the "
        "viewer: it addresses the question directly, is short and friendly, and shows no "
        "internal reasoning or markup.\n\n" + _SHOW + "\nHow helpful is the answer? "
        + _REPLY_GRADED),
}

_FIELDS = {"product_doc": "", "history": "", "question": "", "answer": ""}
_WORDS = {"yes": 1.0, "no": 0.0, "true": 1.0, "false": 0.0, "correct": 1.0,
          "incorrect": 0.0, "pass": 1.0, "fail": 0.0, "helpful": 1.0, "unhelpful": 0.0}
_LINE = re.compile(r"^[\s*#>-]*(?:verdict|score|rating|judg(?:e)?ment)\s*\**\s*[:=]\s*\**\s*"
                   r"([^\s*,;]+(?:\s*/\s*\d+)?)", re.IGNORECASE | re.MULTILINE)


def _score(value) -> float | None:
    """A score in [0, 1] from a number, a yes/no word or "n/d"; None if it is none."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if 0.0 <= value <= 1.0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().strip(".!\"'").lower()
    if text in _WORDS:
        return _WORDS[text]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", text)
    if m and float(m.group(2)) > 0:
        return _score(float(m.group(1)) / float(m.group(2)))
    try:
        return _score(float(text))
    except ValueError:
        return None


def _json_objects(text: str):
    """Every JSON object in ``text`` (bare, fenced or amid prose), in order."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def parse_verdict(text: str) -> Verdict | None:
    """The verdict in a judge's reply (module docstring), or None if there is none."""
    if "</think>" in text:  # a reasoning judge: read only what follows its reasoning
        text = text.rsplit("</think>", 1)[1]
    for obj in _json_objects(text):
        keys = {k.lower(): v for k, v in obj.items()}
        for key in ("score", "verdict", "rating"):
            if key in keys and (score := _score(keys[key])) is not None:
                return Verdict(score, str(keys.get("reason", "")).strip() or "no reason given")
    for m in _LINE.finditer(text):
        if (score := _score(m.group(1))) is not None:
            rest = text[m.end():].strip() or text[:m.start()].strip()
            return Verdict(score, rest[:300] or "no reason given")
    return None


def _history(record: LivestreamRecord) -> str:
    return "\n".join(f"{t.role}: {t.content}" for t in record.history) or "(none)"


class LLMJudge(Judge):
    """Judge ``kind`` ("correctness" or "helpfulness") with a model behind ``base_url``."""

    def __init__(self, base_url: str, model: str, *, kind: str = "correctness",
                 api_key: str = "EMPTY", rubric: str | None = None, concurrency: int = 8,
                 retries: int = 3, timeout: float = 60.0, temperature: float = 0.0,
                 backoff: float = 0.5, max_tokens: int = 512):
        if kind not in JUDGE_KINDS:
            raise ValueError(f"kind must be one of {JUDGE_KINDS}, got {kind!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout <= 0 or backoff < 0:
            raise ValueError(f"timeout must be > 0 and backoff >= 0, got {timeout}, {backoff}")
        rubric = DEFAULT_RUBRICS[kind] if rubric is None else rubric
        try:
            rubric.format_map(_FIELDS)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"rubric may use only the fields {sorted(_FIELDS)} "
                             f"(write literal braces as {{{{ }}}}): {e!r}") from None
        try:
            import openai
        except ImportError as e:
            raise ImportError("LLMJudge needs the openai package: pip install openai") from e
        self.kind, self.model, self.rubric = kind, model, rubric
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                    max_retries=0)  # retries are ours, with our backoff
        self.num_failures = 0
        self._lock = threading.Lock()

    def prompt(self, record: LivestreamRecord, response: str) -> str:
        _, answer = split_response(response)
        return self.rubric.format(product_doc=record.product_doc, history=_history(record),
                                  question=record.question, answer=answer)

    def judge(self, record: LivestreamRecord, response: str) -> Verdict:
        messages = [{"role": "user", "content": self.prompt(record, response)}]
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    max_tokens=self.max_tokens)
                text = reply.choices[0].message.content or ""
            except Exception as e:  # noqa: BLE001 - any transport/API error is retried
                failure = f"error: {type(e).__name__}: {str(e)[:200]}"
                continue
            verdict = parse_verdict(text)
            if verdict is not None:
                return verdict
            failure = f"unparseable: {text[:200]!r}"
        with self._lock:
            self.num_failures += 1
        return Verdict(0.0, failure)

    def judge_many(self, records: Sequence[LivestreamRecord],
                   responses: Sequence[str]) -> list[Verdict]:
        check_batch(records, responses)
        if not records:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(records))) as pool:
            return list(pool.map(self.judge, records, responses))
