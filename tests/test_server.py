"""The OpenAI-compatible server end to end: the real engine on the tiny checkpoint, real
uvicorn on loopback, the official ``openai`` client and raw HTTP for what it cannot send."""

import asyncio
import json
import threading
import time

# The server stack is a dependency of the package (fastapi, uvicorn, prometheus-client) or
# of its dev extra (openai, httpx2): imported plainly, so a missing one fails, never skips.
import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from livethinking.engine import LLM, EngineConfig
from livethinking.server import AsyncEngine, build_app
from serving import Served as _Served

MODEL = "tiny"
LONG = {"max_tokens": 10_000, "temperature": 0.0, "ignore_eos": True}  # runs to the context


def _stats(engine: AsyncEngine):
    return asyncio.run(engine.stats())


def _wait_idle(engine: AsyncEngine, timeout: float = 5.0):
    """Wait until the engine holds no request and every KV block is free; return stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(engine)
        if (stats.num_running == 0 and stats.num_waiting == 0
                and stats.kv_blocks_free == stats.kv_blocks_total):
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"the engine is not idle after {timeout} s: {stats}")
        time.sleep(0.02)


def _metric(url: str, name: str, labels: dict | None = None) -> float:
    text = httpx2.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


class _RawStream:
    """A raw streaming completion read event by event; ``close()`` hangs up mid-stream.
    (The line iterator is kept: dropping it would close the response early.)"""

    def __init__(self, url: str, body: dict, events: int = 2) -> None:
        self.client = httpx2.Client(timeout=30)
        self.ctx = self.client.stream("POST", f"{url}/v1/completions",
                                      json={**body, "stream": True})
        response = self.ctx.__enter__()
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self.lines = response.iter_lines()
        self.events = [self.next_event() for _ in range(events)]

    def next_event(self) -> dict:
        for line in self.lines:
            if line.startswith("data: "):
                return json.loads(line[len("data: "):])
        raise AssertionError("the stream ended early")

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)
        self.client.close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", config=EngineConfig(max_num_seqs=64))
    return AsyncEngine(llm.engine)


@pytest.fixture(scope="module")
def served(engine):
    served = _Served(build_app(engine, MODEL))
    yield served
    served.close()
    assert not engine.running, "the app's lifespan must stop the engine it started"


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0,
                       timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def test_health_models_and_lifespan(served, client, engine):
    assert engine.running  # started by the app's lifespan
    response = httpx2.get(f"{served.url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7}])
def test_completion_stream_equals_whole(client, tokenizer, sampling):
    prompt = "the red kettle boils"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True},
                  **sampling)
    whole = client.completions.create(**kwargs, logprobs=0)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == MODEL
    assert choice.finish_reason == "length" and choice.text
    assert len(choice.logprobs.tokens) == 12 and len(choice.logprobs.token_logprobs) == 12
    assert all(lp <= 0.0 for lp in choice.logprobs.token_logprobs)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_token_id_prompt(client, tokenizer):
    ids = tokenizer.encode("does it come in blue?")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="does it come in blue?",
                                        max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3}])
def test_chat_stream_equals_whole(client, tokenizer, sampling):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "what does it cost?"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=10,
                  extra_body={"ignore_eos": True}, **sampling)
    whole = client.chat.completions.create(**kwargs, logprobs=True)
    choice = whole.choices[0]
    assert whole.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert [t.token for t in choice.logprobs.content] and len(choice.logprobs.content) == 10
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(templated,
                                                             add_special_tokens=False))
    assert whole.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_max_completion_tokens_and_natural_stop(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "how fast does it boil?"}],
        max_completion_tokens=5, temperature=0)
    choice = response.choices[0]
    assert response.usage.completion_tokens <= 5
    assert choice.finish_reason in ("stop", "length")
    assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 5)
    assert "<|im_end|>" not in choice.message.content


def test_n_choices_stream_equals_whole(client):
    kwargs = dict(model=MODEL, prompt="only red for now.", max_tokens=8, n=3, temperature=1.0,
                  seed=11, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    assert whole.usage.completion_tokens == 24
    texts = {c.index: c.text for c in whole.choices}
    assert len(set(texts.values())) > 1, "three samples at temperature 1 should differ"
    streamed = {i: "" for i in range(3)}
    finished = set()
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_metrics(served, client, engine):
    families = {f.name: f for f in text_string_to_metric_families(
        httpx2.get(f"{served.url}/metrics").text)}
    for name in ("livethinking_time_to_first_token_seconds",
                 "livethinking_time_per_output_token_seconds", "livethinking_num_requests_waiting",
                 "livethinking_num_requests_running", "livethinking_kv_blocks_used",
                 "livethinking_kv_blocks_total", "livethinking_prefix_cache_hit_rate",
                 "livethinking_requests_finished", "livethinking_prompt_tokens",
                 "livethinking_generation_tokens"):
        assert name in families, name
    total = _metric(served.url, "livethinking_kv_blocks_total")
    assert total == _stats(engine).kv_blocks_total > 0
    ttft = _metric(served.url, "livethinking_time_to_first_token_seconds_count")
    tpot = _metric(served.url, "livethinking_time_per_output_token_seconds_count")
    generated = _metric(served.url, "livethinking_generation_tokens_total")
    lengths = _metric(served.url, "livethinking_requests_finished_total",
                      {"finish_reason": "length"})
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="the red kettle", max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert _metric(served.url, "livethinking_time_to_first_token_seconds_count") == ttft + 2
    assert _metric(served.url, "livethinking_time_per_output_token_seconds_count") == tpot + 2
    assert _metric(served.url, "livethinking_generation_tokens_total") == generated + 12
    assert _metric(served.url, "livethinking_requests_finished_total",
                   {"finish_reason": "length"}) == lengths + 2
    # the second identical prompt reuses the first one's cached blocks
    assert _metric(served.url, "livethinking_prefix_cache_hit_rate") > 0.0
    assert _metric(served.url, "livethinking_kv_blocks_used") == 0


def _error(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_json_and_invalid_fields(served):
    response = httpx2.post(f"{served.url}/v1/completions", content=b'{"model": "tiny", "pro',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in _error(response)["message"]
    response = httpx2.post(f"{served.url}/v1/chat/completions",
                           json={"model": MODEL, "messages": "hello"})
    assert response.status_code == 400
    assert _error(response)["param"] == "messages"
    response = httpx2.post(f"{served.url}/v1/completions",
                           json={"model": MODEL, "prompt": "x", "temperature": -1})
    assert response.status_code == 400 and "temperature" in _error(response)["message"]
    response = httpx2.post(f"{served.url}/v1/completions",
                           json={"model": MODEL, "prompt": "x", "stop": [""]})
    assert response.status_code == 400 and "stop" in _error(response)["message"]


def test_oversized_body_413_over_a_real_socket(served):
    """Refused from its Content-Length before the body is read, or counted as a chunked
    body arrives; the client still reads the 413 and the server keeps serving."""
    big = json.dumps({"model": MODEL, "prompt": "x" * (5 * 2**20)}).encode()
    response = httpx2.post(f"{served.url}/v1/completions", content=big,
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    chunks = (b" " * 2**20 for _ in range(5))
    response = httpx2.post(f"{served.url}/v1/completions", content=chunks,
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    assert httpx2.get(f"{served.url}/health").status_code == 200


def test_unknown_model_and_bad_lengths(client, engine):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert info.value.status_code == 400 and "gpt-4" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 400 and "gpt-4" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=0)
    assert info.value.status_code == 400
    too_long = [5] * engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=2)
    assert info.value.status_code == 400 and str(engine.max_model_len) in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=2, stream=True)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "blue? " * 400}], max_tokens=2)
    assert info.value.status_code == 400
    _wait_idle(engine)


def test_client_disconnect_aborts(served, engine, tokenizer):
    aborted = _metric(served.url, "livethinking_requests_finished_total",
                      {"finish_reason": "abort"})
    decoded = _stats(engine).decode_tokens
    stream = _RawStream(served.url, {"model": MODEL, "prompt": "the red", **LONG})
    assert all(e["choices"][0]["finish_reason"] is None for e in stream.events)
    time.sleep(0.1)  # the request keeps running while the client stays connected
    assert stream.next_event()["choices"][0]["finish_reason"] is None
    assert _stats(engine).num_running == 1
    stream.close()
    stats = _wait_idle(engine, timeout=5.0)
    # aborted: it stopped long before filling the context, as it would have on its own
    full = engine.max_model_len - len(tokenizer.encode("the red"))
    assert stats.decode_tokens - decoded < full // 2
    assert _metric(served.url, "livethinking_requests_finished_total",
                   {"finish_reason": "abort"}) == aborted + 1


def test_client_disconnect_aborts_whole_request(served, engine, tokenizer):
    aborted = _metric(served.url, "livethinking_requests_finished_total",
                      {"finish_reason": "abort"})
    decoded = _stats(engine).decode_tokens
    with pytest.raises(httpx2.ReadTimeout):  # the client gives up and hangs up
        httpx2.post(f"{served.url}/v1/completions", timeout=httpx2.Timeout(5.0, read=0.3),
                    json={"model": MODEL, "prompt": "the red", **LONG})
    stats = _wait_idle(engine, timeout=5.0)
    # aborted, not run to the context's end (~1 ms a token here: ~250 decoded in 0.3 s,
    # more on a loaded machine, so the bound is the full length, not half of it)
    full = engine.max_model_len - len(tokenizer.encode("the red"))
    assert stats.decode_tokens - decoded < full
    assert _metric(served.url, "livethinking_requests_finished_total",
                   {"finish_reason": "abort"}) == aborted + 1


def test_max_concurrent_requests_429(engine, served):
    limited = _Served(build_app(engine, MODEL, max_concurrent_requests=1))
    try:
        with openai.OpenAI(base_url=f"{limited.url}/v1", api_key="x", max_retries=0) as c:
            held = _RawStream(limited.url, {"model": MODEL, "prompt": "a", **LONG})
            try:
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
                assert info.value.status_code == 429
            finally:
                held.close()
            _wait_idle(engine)
            # the aborted stream gave its slot back
            assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    finally:
        limited.close()
    assert engine.running, "an app must not stop an engine it did not start"


def test_engine_queue_full_429(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu",
              config=EngineConfig(max_num_seqs=1, max_waiting=1, num_kv_blocks=64))
    small = AsyncEngine(llm.engine)
    served = _Served(build_app(small, MODEL))
    try:
        c = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
        held = _RawStream(served.url, {"model": MODEL, "prompt": "a", **LONG})
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append(c.completions.create(
            model=MODEL, prompt="hi", max_tokens=3, temperature=0)))
        try:
            waiter.start()
            deadline = time.monotonic() + 5
            while _stats(small).num_waiting < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)
            assert _stats(small).num_running == 1
            with pytest.raises(openai.RateLimitError) as info:
                c.completions.create(model=MODEL, prompt="full", max_tokens=2)
            assert info.value.status_code == 429 and "waiting" in info.value.message
        finally:
            held.close()
            waiter.join(30)
        assert len(queued) == 1 and queued[0].usage.completion_tokens >= 1
        _wait_idle(small)
    finally:
        served.close()
    assert not small.running


def test_32_concurrent_streams(served, engine):
    prompts = [f"question {i}: what does the {'red ' * (i % 5)}kettle cost?" for i in range(32)]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="x",
                                      max_retries=0, timeout=60) as c:
            async def whole(prompt):
                r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                               temperature=0)
                return r.choices[0].text, r.choices[0].finish_reason

            async def streamed(prompt):
                text, finish = "", None
                async for chunk in await c.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True):
                    for choice in chunk.choices:
                        text += choice.text
                        finish = choice.finish_reason or finish
                return text, finish

            expected = [await whole(p) for p in prompts]  # one at a time
            got = await asyncio.gather(*(streamed(p) for p in prompts))
            return expected, list(got)

    expected, got = asyncio.run(run())
    assert all(finish in ("stop", "length") for _, finish in got)
    assert len({text for text, _ in expected}) > 1
    assert got == expected
    stats = _wait_idle(engine, timeout=2.0)
    assert stats.num_running == 0 and stats.num_waiting == 0
