"""SGLang's RL API on our server, in process: /generate (tokens in, tokens out, against
`LLM.generate`), token ids from /v1/completions, weight updates from disk, pause /
continue semantics across in-flight requests, --api-key and --enable-weight-updates."""

import threading
import time

import httpx2
import pytest
import torch

from livethinking.engine import LLM, EngineConfig, SamplingParams
from livethinking.engine.weight_update import weights_checksum
from livethinking.model import CausalLM
from livethinking.server import AsyncEngine, build_app
from serving import Served

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"max_new_tokens": 400, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def perturbed_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with every weight moved: another policy of the same model."""
    model = CausalLM.from_pretrained(tiny_checkpoint)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    return model.save_pretrained(tmp_path_factory.mktemp("perturbed"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", config=EngineConfig(max_num_seqs=16))
    served = Served(build_app(AsyncEngine(llm.engine), "tiny", enable_weight_updates=True,
                              api_key=KEY))
    yield served
    served.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu")


def _post(server, path, body=None, timeout=60, **kwargs):
    return httpx2.post(f"{server.url}{path}", json=body if body is not None else {},
                       headers=AUTH, timeout=timeout, **kwargs)


def _get(server, path):
    return httpx2.get(f"{server.url}{path}", headers=AUTH, timeout=30)


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, box) with box["result"] once done."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(), done=time.monotonic()),
                              daemon=True)
    thread.start()
    return thread, box


def _wait_running(server, count=1, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _get(server, "/metrics").text
        running = [line for line in text.splitlines()
                   if line.startswith("livethinking_num_requests_running")]
        if running and float(running[0].split()[-1]) >= count:
            return
        time.sleep(0.01)
    pytest.fail("the request never started running")


@pytest.mark.parametrize("sampling", [{"temperature": 0.0},
                                      {"temperature": 1.0, "sampling_seed": 11}])
def test_generate_equals_llm_generate(server, reference, sampling):
    tokenizer = reference.engine.tokenizer
    prompt = tokenizer.encode("does the kettle come in red?")
    reply = _post(server, "/generate", {"input_ids": prompt, "return_logprob": True,
                                        "sampling_params": {"max_new_tokens": 9,
                                                            "ignore_eos": True, **sampling}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    params = SamplingParams(max_tokens=9, ignore_eos=True, temperature=sampling["temperature"],
                            seed=sampling.get("sampling_seed"))
    expected = reference.generate([prompt], [params])[0].outputs[0]
    assert body["output_ids"] == expected.token_ids and len(expected.token_ids) == 9
    assert body["text"] == expected.text
    meta = body["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == expected.token_ids
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == expected.logprobs
    assert all(text is None for _, _, text in meta["output_token_logprobs"])
    assert meta["finish_reason"] == {"type": "length", "length": 9}
    assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 9
    assert meta["weight_version"] == "default" and meta["cached_tokens"] >= 0
    assert reply.headers["x-weight-version"] == "default"


def test_generate_batches_samples_and_stops(server, reference):
    tokenizer = reference.engine.tokenizer
    prompts = [tokenizer.encode("what is the price?"), tokenizer.encode("is it heavy?")]
    batch = _post(server, "/generate", {"input_ids": prompts, "rid": ["a", "b"],
                                        "sampling_params": {"max_new_tokens": 4, "n": 2,
                                                            "temperature": 1.0,
                                                            "sampling_seed": 3}}).json()
    assert isinstance(batch, list) and len(batch) == 4  # prompt-major, n each
    assert [item["meta_info"]["id"] for item in batch] == ["a-0", "a-1", "b-0", "b-1"]
    assert [item["meta_info"]["prompt_tokens"] for item in batch] == [
        len(prompts[0])] * 2 + [len(prompts[1])] * 2
    assert "output_token_logprobs" not in batch[0]["meta_info"]
    by_text = _post(server, "/generate", {"text": "is it heavy?", "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.0}}).json()
    by_ids = _post(server, "/generate", {"input_ids": prompts[1], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.0}}).json()
    assert by_text["output_ids"] == by_ids["output_ids"]
    # stop on a token: it ends the output and is reported as matched
    stop_id = by_ids["output_ids"][2]
    stopped = _post(server, "/generate", {"input_ids": prompts[1], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.0, "stop_token_ids": [stop_id]}}).json()
    first = by_ids["output_ids"].index(stop_id)
    assert stopped["output_ids"] == by_ids["output_ids"][:first + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}


@pytest.mark.parametrize("body, fragment", [
    ({}, "exactly one of input_ids and text"),
    ({"input_ids": [1], "text": "x"}, "exactly one of input_ids and text"),
    ({"input_ids": []}, "non-empty"),
    ({"input_ids": [[1], []]}, "non-empty"),
    ({"input_ids": [1, -2]}, "token ids"),
    ({"input_ids": [1], "sampling_params": {"min_p": 0.1}}, "min_p"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),
    ({"input_ids": [[1], [2]], "rid": ["only-one"]}, "rid"),
    ({"input_ids": [10**9]}, "token ids must be ints"),
])
def test_generate_refuses_bad_requests(server, body, fragment):
    reply = _post(server, "/generate", body)
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["error"]["message"]


def test_completions_return_token_ids(server, reference):
    tokenizer = reference.engine.tokenizer
    prompt = tokenizer.encode("how long is the warranty?")
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 7, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    whole = _post(server, "/v1/completions", body).json()["choices"][0]
    expected = reference.generate([prompt], [SamplingParams(max_tokens=7, temperature=0.0,
                                                            ignore_eos=True)])[0]
    assert whole["prompt_token_ids"] == prompt
    assert whole["token_ids"] == expected.outputs[0].token_ids
    with httpx2.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                       headers=AUTH, timeout=60) as response:
        import json

        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    ids = [t for c in chunks for choice in c["choices"] for t in choice["token_ids"]]
    assert ids == whole["token_ids"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in choice for c in chunks[1:] for choice in c["choices"])
    plain = _post(server, "/v1/completions", {**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]


def test_api_key_guards_every_endpoint(server):
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/generate"), ("POST", "/v1/completions"),
                         ("POST", "/update_weights_from_disk"), ("GET", "/get_weight_version")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            reply = httpx2.request(method, f"{server.url}{path}", headers=headers, timeout=30,
                                   json={"input_ids": [1]})
            assert reply.status_code == 401, (path, headers)
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.headers["www-authenticate"] == "Bearer"
    assert _get(server, "/health").status_code == 200


def test_weight_updates_are_off_unless_enabled(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    served = Served(build_app(AsyncEngine(llm.engine), "tiny"))
    try:
        for path, body in [("/update_weights_from_disk", {"model_path": str(tiny_checkpoint)}),
                           ("/init_weights_update_group", {
                               "master_address": "127.0.0.1", "master_port": 1,
                               "rank_offset": 1, "world_size": 2, "backend": "gloo"}),
                           ("/update_weights_from_distributed", {
                               "names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}),
                           ("/pause_generation", {}), ("/continue_generation", {}),
                           ("/flush_cache", {}), ("/destroy_weights_update_group", {})]:
            reply = httpx2.post(f"{served.url}{path}", json=body, timeout=30)
            assert reply.status_code == 403, path
            assert "--enable-weight-updates" in reply.json()["error"]["message"]
        # reading stays open, and no key is needed on a server started without one
        assert httpx2.get(f"{served.url}/get_weight_version").json() == {
            "weight_version": "default"}
        assert httpx2.post(f"{served.url}/generate", json={
            "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    finally:
        served.close()


def test_update_from_disk_loads_the_checkpoint(server, tiny_checkpoint, perturbed_checkpoint):
    tokenizer = LLM(tiny_checkpoint, device="cpu").engine.tokenizer
    prompt = tokenizer.encode("what colour is the lamp?")
    greedy = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 12,
                                                      "temperature": 0.0, "ignore_eos": True}}
    before = _post(server, "/generate", greedy).json()
    reply = _post(server, "/update_weights_from_disk", {"model_path": str(perturbed_checkpoint),
                                                       "weight_version": "v1"})
    assert reply.status_code == 200 and reply.json()["success"], reply.text
    assert reply.json()["weight_version"] == "v1" and reply.json()["num_paused_requests"] == 0
    served_sum = _get(server, "/get_weights_checksum").json()
    assert served_sum == {"checksum": weights_checksum(
        CausalLM.from_pretrained(perturbed_checkpoint)), "weight_version": "v1"}
    after = _post(server, "/generate", greedy).json()
    fresh = LLM(perturbed_checkpoint, device="cpu").generate(
        [prompt], [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)])[0]
    assert after["output_ids"] == fresh.outputs[0].token_ids != before["output_ids"]
    assert after["meta_info"]["weight_version"] == "v1"
    assert _get(server, "/get_weight_version").json() == {"weight_version": "v1"}
    # a bad checkpoint changes nothing
    for bad in [{"model_path": str(perturbed_checkpoint / "missing")},
                {"model_path": str(perturbed_checkpoint.parent)}]:
        failed = _post(server, "/update_weights_from_disk", bad)
        assert failed.status_code == 400 and failed.json()["success"] is False
    assert _get(server, "/get_weights_checksum").json() == served_sum
    back = _post(server, "/update_weights_from_disk", {"model_path": str(tiny_checkpoint),
                                                      "weight_version": "default"})
    assert back.json()["success"]
    assert _post(server, "/generate", greedy).json()["output_ids"] == before["output_ids"]


def test_update_waits_for_running_requests(server, tiny_checkpoint):
    long_request, generated = _in_thread(lambda: _post(server, "/generate", {
        "input_ids": [1, 2, 3], "sampling_params": LONG}).json())
    _wait_running(server)
    update, updated = _in_thread(lambda: _post(server, "/update_weights_from_disk", {
        "model_path": str(tiny_checkpoint), "weight_version": "w2"}).json())
    long_request.join(120)
    update.join(120)
    assert updated["result"]["success"]
    assert generated["done"] <= updated["done"]  # the update waited for the generation
    assert generated["result"]["meta_info"]["weight_version"] != "w2"
    assert generated["result"]["meta_info"]["finish_reason"]["type"] == "length"
    _post(server, "/update_weights_from_disk", {"model_path": str(tiny_checkpoint),
                                               "weight_version": "default"})


def test_pause_abort_ends_requests_and_holds_new_ones(server):
    running, result = _in_thread(lambda: _post(server, "/generate", {
        "input_ids": [4, 5, 6], "return_logprob": True, "sampling_params": LONG}).json())
    _wait_running(server)
    paused = _post(server, "/pause_generation", {"mode": "abort"})
    assert paused.status_code == 200 and paused.json()["success"]
    running.join(30)
    meta = result["result"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert set(meta["finish_reason"]) == {"type", "message", "status_code", "err_type"}
    assert 0 < meta["completion_tokens"] < LONG["max_new_tokens"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    waiting, answered = _in_thread(lambda: _post(server, "/generate", {
        "input_ids": [7], "sampling_params": {"max_new_tokens": 2}}).json())
    time.sleep(0.5)
    assert "result" not in answered  # held while paused
    assert _post(server, "/continue_generation").json()["success"]
    waiting.join(30)
    assert answered["result"]["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_keeps_requests_and_updates_at_once(server, tiny_checkpoint, perturbed_checkpoint,
                                                  mode):
    body = {"input_ids": [8, 9, 10], "sampling_params": {**LONG, "max_new_tokens": 200}}
    uninterrupted = _post(server, "/generate", body).json()
    running, result = _in_thread(lambda: _post(server, "/generate", body).json())
    _wait_running(server)
    assert _post(server, "/pause_generation", {"mode": mode}).json()["success"]
    time.sleep(0.3)
    assert "result" not in result  # paused, not ended
    update = _post(server, "/update_weights_from_disk", {"model_path": str(tiny_checkpoint),
                                                        "weight_version": f"after-{mode}"})
    assert update.json()["success"]  # ran at once: the paused request holds no lock
    assert "result" not in result
    assert _post(server, "/continue_generation").json()["success"]
    running.join(60)
    out = result["result"]
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["weight_version"] == f"after-{mode}"
    # the same weights were loaded again, so the request ends as it would have
    assert out["output_ids"] == uninterrupted["output_ids"]


def test_flush_cache_and_groups_answer_in_sglang_shape(server):
    flushed = _post(server, "/flush_cache")
    assert flushed.status_code == 200 and flushed.json()["success"] is True
    missing = _post(server, "/update_weights_from_distributed", {
        "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]],
        "group_name": "nope"})
    assert missing.status_code == 400 and "init_weights_update_group" in missing.json()["message"]
    nccl = _post(server, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2})
    assert nccl.status_code == 400 and "use backend gloo" in nccl.json()["message"]
    bad_rank = _post(server, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 2, "world_size": 2,
        "backend": "gloo"})
    assert bad_rank.status_code == 400 and "rank_offset" in bad_rank.text
    unaligned = _post(server, "/update_weights_from_distributed", {
        "names": ["a", "b"], "dtypes": ["float32"], "shapes": [[1], [1]]})
    assert unaligned.status_code == 400 and "one entry per tensor" in unaligned.text
    assert _post(server, "/destroy_weights_update_group", {"group_name": "nope"}).status_code == 400
