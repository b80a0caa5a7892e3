"""`ServerPool`: least-loaded choice, failover to a live server, re-admission of a server
whose /health answers again, and a clear error when none is up."""

import pytest

from livethinking.engine import LLM
from livethinking.rollout import ServerDown, ServerPool
from livethinking.server import AsyncEngine, build_app
from serving import Served, free_port

PARAMS = {"n": 2, "max_new_tokens": 3, "temperature": 1.0, "sampling_seed": 5}


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    served = Served(build_app(AsyncEngine(llm.engine), "tiny", api_key="k"))
    yield served
    served.close()


def test_failover_readmission_and_none_up(live):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pool = ServerPool([dead, live.url], api_key="k", timeout_s=30)
    try:
        for _ in range(3):  # whichever is tried first, the live one answers
            samples = pool.generate([1, 2, 3], PARAMS, eos_token_ids=set())
            assert len(samples) == 2 and all(len(s.token_ids) == 3 for s in samples)
            assert all(s.weight_version == "default" and s.logprobs for s in samples)
        assert pool.healthy_urls() == [live.url]
        assert pool.stats() == {"servers_healthy": 1.0, "server_failures": 1.0}
        pool.mark_down(live.url)
        with pytest.raises(ServerDown, match="no rollout server is reachable"):
            pool.generate([1, 2, 3], PARAMS, eos_token_ids=set())
        assert pool.refresh_health() == [live.url]  # back once /health answers
        assert len(pool.generate([1, 2], PARAMS, eos_token_ids=set())) == 2
        assert [s.served for s in pool.servers] == [0, 4]
    finally:
        pool.close()


def test_a_client_error_is_not_retried_elsewhere(live):
    pool = ServerPool([live.url], api_key="wrong", timeout_s=30)
    try:
        with pytest.raises(Exception, match="401"):
            pool.generate([1], PARAMS, eos_token_ids=set())
        assert pool.healthy_urls() == [live.url]  # our mistake, not the server's failure
    finally:
        pool.close()


def test_end_of_sequence_left_out_by_a_server_is_appended():
    from livethinking.rollout.servers import _sample

    item = {"text": "ab", "output_ids": [4, 5], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 9},
        "output_token_logprobs": [[-0.1, 4, None], [-0.2, 5, None]], "weight_version": "3"}}
    sample = _sample(item, eos_token_ids={9})
    assert sample.token_ids == [4, 5, 9] and sample.logprobs is None  # no longer aligned
    kept = _sample({**item, "output_ids": [4, 9], "meta_info": {
        **item["meta_info"], "output_token_logprobs": [[-0.1, 4, None], [-0.3, 9, None]]}},
        eos_token_ids={9})
    assert kept.token_ids == [4, 9] and kept.logprobs == [-0.1, -0.3]
    stop_string = _sample({**item, "meta_info": {**item["meta_info"],
                                                 "finish_reason": {"type": "stop",
                                                                   "matched": "\n"}}},
                          eos_token_ids={9})
    assert stop_string.token_ids == [4, 5] and stop_string.logprobs == [-0.1, -0.2]
