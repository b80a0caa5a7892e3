"""Rewards: rule judges on hand-written cases, the length band at its edges, the weighted
total, the RFT acceptance rule, and the LLM judge against a scripted fake
OpenAI-compatible server (in-process, 127.0.0.1)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from livethinking.data import LivestreamRecord, Turn
from livethinking.rewards import (Judge, LengthBand, LivestreamReward, LLMJudge,
                                  RewardWeights, RuleCorrectnessJudge, RuleHelpfulnessJudge,
                                  Verdict, Vocabulary, is_accepted, mean_length, parse_verdict,
                                  token_f1)
from livethinking.tasks.livestream import DemoTeacher
from livethinking.tasks.livestream.demo_data import QUESTION_TEMPLATES

DOC = ("# Product: Nimbus Kettle\ncategory: kettle\ncolor: red\nmaterial: stainless steel\n"
       "capacity: 1.5 liters\nsize: large\nprice: 39 dollars")


def rec(question, reference=None, doc=DOC, history=()):
    return LivestreamRecord(id="r", product_doc=doc, question=question,
                            history=list(history), reference=reference)


CORRECT = RuleCorrectnessJudge()
HELPFUL = RuleHelpfulnessJudge()


def both(record, response):
    return CORRECT.judge(record, response), HELPFUL.judge(record, response)


# --- rule judges -------------------------------------------------------------------------

def test_correct_answer():
    c, h = both(rec("What color is it?"), "<think>The doc says red.</think> It comes in red!")
    assert (c.score, c.reason) == (1.0, "ok")
    assert (h.score, h.reason) == (1.0, "ok")


def test_wrong_value():
    c, h = both(rec("What color is it?"), "<think>red</think> It comes in blue.")
    assert c.score == 0.0 and "'blue'" in c.reason and "color" in c.reason
    assert h.score == 0.75 and "addresses" in h.reason  # not the asked value


def test_extra_fact_contradicting_the_document():
    c, _ = both(rec("What color is it?"), "<think></think> It is red and made of plastic.")
    assert c.score == 0.0 and "'plastic'" in c.reason and "material" in c.reason


def test_longer_value_is_not_the_shorter_one():
    sizes = RuleCorrectnessJudge(attributes={"size": ("large", "extra large")},
                                 question_keywords={"size": ("how big",)})
    helpful = RuleHelpfulnessJudge(attributes={"size": ("large", "extra large")},
                                   question_keywords={"size": ("how big",)})
    doc = "# Product: Pack\nsize: large"
    c = sizes.judge(rec("How big is it?", doc=doc), "<think></think> It is extra large.")
    assert c.score == 0.0 and "'extra large'" in c.reason
    # "large" inside "extra large" does not count as stating it
    assert helpful.judge(rec("How big is it?", doc=doc), "It is extra large.").score == 0.75
    assert sizes.judge(rec("How big is it?", doc=doc), "It is large.").score == 1.0
    doc = "# Product: Pack\nsize: extra large"
    assert sizes.judge(rec("How big is it?", doc=doc), "It is extra large.").score == 1.0
    # decimals: "1.5 liters" is not "5 liters"
    vocab = Vocabulary(attributes={"capacity": ("5 liters", "1.5 liters")})
    assert vocab.stated_values("It holds 1.5 liters, not 5 liters") == ["1.5 liters", "5 liters"]
    assert Vocabulary(attributes={"capacity": ("5 liters",)}).stated_values("1.5 liters") == []
    vocab = Vocabulary(attributes={"color": ("navy", "navy blue", "blue")})
    assert vocab.stated_values("Navy blue or navy, never blue") == ["navy blue", "navy", "blue"]


def test_made_up_value_for_missing_attribute():
    c, h = both(rec("Does it have a warranty?"), "<think>hmm</think> The warranty is 2 years.")
    assert c.score == 0.0 and "made up '2 years'" in c.reason and "does not refuse" in c.reason
    assert h.score == 0.75 and "addresses" in h.reason


def test_refusal_that_still_guesses_is_wrong():
    c, _ = both(rec("Does it have a warranty?"),
                "The document doesn't say, but probably 1 year.")
    assert c.score == 0.0 and "made up '1 year'" in c.reason


def test_proper_refusal():
    c, h = both(rec("Does it have a warranty?"),
                "<think>no line</think> Sorry, the document doesn\u2019t say anything about that.")
    assert (c.score, h.score) == (1.0, 1.0)


def test_refusing_an_answerable_question():
    c, h = both(rec("What is it made of?"), "<think></think> Sorry, that is not listed.")
    assert c.score == 0.0 and "refuses although" in c.reason
    assert h.score == 0.75 and "addresses" in h.reason


def test_missing_think_block_judges_the_whole_text():
    c, h = both(rec("How much does it cost?"), "It costs 39 dollars.")
    assert (c.score, h.score) == (1.0, 1.0)
    c, _ = both(rec("How much does it cost?"), "It costs 49 dollars.")
    assert c.score == 0.0


def test_unclosed_think_block_leaves_an_empty_answer():
    c, h = both(rec("What color is it?"), "<think>It is red, I will say red")
    assert c.score == 0.0
    assert h.score == 0.5 and "non_empty" in h.reason and "addresses" in h.reason


def test_empty_answer():
    c, h = both(rec("What color is it?"), "<think>It is red.</think>   ")
    assert c.score == 0.0 and "does not state" in c.reason
    assert h.score == 0.5 and h.reason == "failed: non_empty, addresses"


def test_verbose_answer():
    answer = "It comes in red. " + "It is really a lovely shade for any kitchen. " * 4
    c, h = both(rec("What color is it?"), f"<think></think> {answer}")
    assert c.score == 1.0
    assert h.score == 0.75 and "concise" in h.reason
    short = RuleHelpfulnessJudge(max_answer_words=3).judge(rec("What color is it?"),
                                                           "It comes in red.")
    assert short.score == 0.75  # 4 words > 3


def test_leaked_markup():
    c, h = both(rec("What color is it?"),
                "<think>a</think> It comes in red. <think>more thoughts</think>")
    assert c.score == 1.0
    assert h.score == 0.75 and "no_markup" in h.reason
    _, h = both(rec("What color is it?"), "<think>a</think> It comes in red.<|im_end|>")
    assert h.score == 0.75 and "no_markup" in h.reason


def test_unknown_attribute_falls_back_to_the_reference():
    ref = "Yes, it is great for making tea every morning."
    question = "Is it good for tea?"
    assert CORRECT.judge(rec(question, ref), "Yes, it's great for making tea every morning!"
                         ).score == 1.0
    assert CORRECT.judge(rec(question, ref), "No idea, friend.").score == 0.0
    assert CORRECT.judge(rec(question), "Yes, great for tea.").reason.endswith("no reference")
    strict = RuleCorrectnessJudge(f1_threshold=1.0)
    assert strict.judge(rec(question, ref), "Yes, it's great for making tea every morning!"
                        ).score == 0.0  # F1 < 1 ("it's" ≠ "it is")
    # helpfulness: the addresses check uses the reference, or is skipped without one
    assert HELPFUL.judge(rec(question, ref), "No idea, friend.").score == 0.75
    assert HELPFUL.judge(rec(question), "No idea, friend.").score == 1.0


def test_token_f1():
    assert token_f1("a b c", "a b c") == 1.0
    assert token_f1("", "a") == 0.0
    assert token_f1("a b", "a c") == pytest.approx(0.5)


def test_other_catalogue():
    attributes = {"flavor": ("vanilla", "mint"), "size": ("250 ml", "500 ml")}
    keywords = {"flavor": ("flavor", "taste"), "size": ("size", "how big")}
    markers = ("no info",)
    judge = RuleCorrectnessJudge(attributes=attributes, question_keywords=keywords,
                                 refusal_markers=markers)
    doc = "# Product: Cool Cream\ncategory: ice cream\nflavor: mint"
    assert judge.judge(rec("How does it taste?", doc=doc), "It tastes of mint.").score == 1.0
    assert judge.judge(rec("How does it taste?", doc=doc), "Vanilla!").score == 0.0
    assert judge.judge(rec("What size?", doc=doc), "Sorry, no info.").score == 1.0
    assert judge.judge(rec("What size?", doc=doc), "Sorry, the document doesn't say."
                       ).score == 0.0  # the demo's markers are not this catalogue's
    with pytest.raises(ValueError, match="refusal_markers"):
        RuleCorrectnessJudge(refusal_markers=())


def test_rule_judges_separate_the_demo_teachers_answers():
    records = [rec(t.format(name="Nimbus Kettle")) for ts in QUESTION_TEMPLATES.values()
               for t in ts]
    for error_rate, expected in ((0.0, 1.0), (1.0, 0.0)):
        teacher = DemoTeacher(seed=3, error_rate=error_rate)
        responses = [teacher.respond(r, 1)[0] for r in records]
        verdicts = CORRECT.judge_many(records, responses)
        assert [v.score for v in verdicts] == [expected] * len(records)


def test_judge_protocol_and_batches():
    assert isinstance(CORRECT, Judge) and isinstance(HELPFUL, Judge)
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        CORRECT.judge_many([rec("a"), rec("b")], ["x"])
    with pytest.raises(ValueError, match="score"):
        Verdict(1.5, "too good")


# --- length band -------------------------------------------------------------------------

def test_length_band_edges():
    band = LengthBand(l_ref=100.0, epsilon=10.0)  # band [30, 60]
    assert (band.low, band.high) == pytest.approx((30.0, 60.0))
    assert band.reward(band.low) == 1.0
    assert band.reward(band.high) == 1.0
    assert band.reward(45) == 1.0
    assert band.reward(band.low - 10.0) == pytest.approx(0.0, abs=1e-12)  # d = ε
    assert band.reward(band.high + 10.0) == pytest.approx(0.0, abs=1e-12)
    assert band.reward(band.low - 5.0) == pytest.approx(0.5)  # d = ε/2
    assert band.reward(band.high + 5.0) == pytest.approx(0.5)
    assert band.reward(band.high + 25.0) == 0.0
    assert band.reward(0) == 0.0
    with pytest.raises(ValueError, match="length"):
        band.reward(-1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(l_ref=0.0, epsilon=1.0), "l_ref"),
    (dict(l_ref=10.0, lambda_lo=0.0, epsilon=1.0), "lambda_lo"),
    (dict(l_ref=10.0, lambda_lo=0.7, lambda_hi=0.6, epsilon=1.0), "lambda_hi"),
    (dict(l_ref=10.0, epsilon=0.0), "epsilon"),
    (dict(l_ref=float("nan"), epsilon=1.0), "l_ref"),
])
def test_length_band_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LengthBand(**kwargs)


def test_mean_length():
    assert mean_length([10, 20, 45]) == 25.0
    with pytest.raises(ValueError):
        mean_length([])


# --- the weighted total and acceptance ---------------------------------------------------

class Fixed(Judge):
    def __init__(self, scores):
        self.scores = iter(scores)

    def judge(self, record, response):
        return Verdict(next(self.scores), "fixed")


def test_weighted_total():
    band = LengthBand(l_ref=100.0, epsilon=10.0)
    reward = LivestreamReward(Fixed([1.0, 0.0]), Fixed([0.5, 1.0]), band,
                              RewardWeights(correctness=2.0, helpfulness=0.4, length=0.3))
    out = reward.score_many([rec("a"), rec("b")], ["x", "y"], [45, band.high + 5.0])
    assert out[0].total == pytest.approx(2.0 * 1.0 + 0.4 * 0.5 + 0.3 * 1.0)
    assert out[1].total == pytest.approx(2.0 * 0.0 + 0.4 * 1.0 + 0.3 * 0.5)
    assert (out[1].correctness, out[1].helpfulness, out[1].length) == (0.0, 1.0,
                                                                        pytest.approx(0.5))
    assert set(out[0].reasons) == {"correctness", "helpfulness", "length"}
    no_band = LivestreamReward(Fixed([1.0]), Fixed([1.0]), None, RewardWeights(length=5.0))
    (only,) = no_band.score_many([rec("a")], ["x"], [10_000])
    assert only.total == pytest.approx(1.0 + 0.5) and only.length == 0.0
    with pytest.raises(ValueError, match="lengths"):
        no_band.score_many([rec("a")], ["x"], [])
    with pytest.raises(ValueError, match="RewardWeights.helpfulness"):
        RewardWeights(helpfulness=-1.0)


def test_rule_reward_end_to_end():
    reward = LivestreamReward(CORRECT, HELPFUL, LengthBand(l_ref=50, epsilon=10))
    good, bad = reward.score_many([rec("What color is it?")] * 2,
                                  ["<think>red</think> It's red.", "<think>x</think> Blue."],
                                  [20, 20])
    assert good.total == pytest.approx(1.0 + 0.5 + 0.5)
    assert bad.total == pytest.approx(0.0 + 0.5 * 0.75 + 0.5)


def test_is_accepted():
    ok, half = Verdict(1.0, ""), Verdict(0.5, "")
    assert is_accepted(ok, ok)
    assert is_accepted(ok, Verdict(0.75, ""))
    assert not is_accepted(ok, half)
    assert not is_accepted(Verdict(0.0, ""), ok)
    assert is_accepted(half, half, correctness_threshold=0.5, helpfulness_threshold=0.5)


# --- LLM judge ---------------------------------------------------------------------------

def test_parse_verdict():
    assert parse_verdict('{"score": 1, "reason": "fine"}') == Verdict(1.0, "fine")
    assert parse_verdict('Sure.\n```json\n{"score": "no", "reason": "x"}\n```') == Verdict(0.0, "x")
    assert parse_verdict('I think {"score": 0.8, "reason": "ok"} overall').score == 0.8
    assert parse_verdict("Looks wrong.\nVERDICT: no").score == 0.0
    assert parse_verdict("**Score:** 0.8\nmostly fine").score == 0.8
    assert parse_verdict("Score: 7/10").score == pytest.approx(0.7)
    assert parse_verdict("<think>score: 0</think> VERDICT: yes").score == 1.0
    assert parse_verdict('{"score": 7}') is None
    assert parse_verdict("no idea") is None
    assert parse_verdict("") is None


# Each request's question carries "CASE:<name>"; the server replies with the case's
# script entry for that attempt (the last entry repeats). An int is an HTTP error status;
# ("sleep", s, reply) waits s seconds first.
GOOD = '{"score": 1, "reason": "matches the document"}'
SCRIPTS = {
    "json": [GOOD],
    "fenced": ['Here it is:\n```json\n{"score": "no", "reason": "wrong color"}\n```'],
    "verdict": ["The answer invents a warranty.\nVERDICT: no"],
    "garbage_then_good": ["I cannot decide.", GOOD],
    "error_then_good": [500, GOOD],
    "always_garbage": ["blah"],
    "always_error": [503],
    "slow": [("gather", 4.0, GOOD)],  # held until server.gather requests are in flight
    "timeout_then_good": [("sleep", 1.5, GOOD), GOOD],
}


class FakeServer:
    def __init__(self):
        self.lock = threading.Lock()
        self.attempts, self.prompts = {}, {}
        self.in_flight, self.max_in_flight = {}, {}  # per case
        self.arrived = threading.Condition(self.lock)
        self.gather = 1  # requests a "gather" reply waits to see in flight
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                case = prompt.split("CASE:", 1)[1].split()[0].strip("?")
                with server.lock:
                    n = server.attempts.get(case, 0)
                    server.attempts[case] = n + 1
                    server.prompts[case] = prompt
                    now = server.in_flight[case] = server.in_flight.get(case, 0) + 1
                    server.max_in_flight[case] = max(server.max_in_flight.get(case, 0), now)
                try:
                    script = SCRIPTS[case]
                    reply = script[min(n, len(script) - 1)]
                    if isinstance(reply, tuple) and reply[0] == "gather":
                        with server.arrived:  # a concurrent client gets them all in at once
                            server.arrived.notify_all()
                            server.arrived.wait_for(
                                lambda: server.in_flight[case] >= server.gather, reply[1])
                        reply = reply[2]
                    elif isinstance(reply, tuple):
                        time.sleep(reply[1])
                        reply = reply[2]
                    if isinstance(reply, int):
                        self._send(reply, {"error": {"message": "scripted failure"}})
                    else:
                        self._send(200, {
                            "id": "c1", "object": "chat.completion", "created": 0,
                            "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                      "total_tokens": 2}})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with server.lock:
                        server.in_flight[case] -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self):
        with self.lock:
            self.attempts.clear()
            self.prompts.clear()
            self.max_in_flight.clear()


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def case(name, **kwargs):
    history = [Turn(role="user", content="Is it heavy?"),
               Turn(role="assistant", content="It weighs 1 kilogram.")]
    return rec(f"CASE:{name} What color is it?", history=history, **kwargs)


def judge_for(server, **kwargs):
    server.reset()
    kwargs = {"retries": 2, "backoff": 0.01, "timeout": 5.0, **kwargs}
    return LLMJudge(server.url, "judge-model", **kwargs)


def test_llm_judge_parses_replies_and_sends_the_answer(server):
    judge = judge_for(server)
    names = ["json", "fenced", "verdict"]
    verdicts = judge.judge_many([case(n) for n in names],
                                ["<think>secret plan</think> It comes in red."] * 3)
    assert verdicts == [Verdict(1.0, "matches the document"), Verdict(0.0, "wrong color"),
                        Verdict(0.0, "The answer invents a warranty.")]
    assert judge.num_failures == 0
    assert server.attempts == {"json": 1, "fenced": 1, "verdict": 1}
    prompt = server.prompts["json"]
    for part in ("# Product: Nimbus Kettle", "user: Is it heavy?",
                 "assistant: It weighs 1 kilogram.", "CASE:json What color is it?",
                 "It comes in red."):
        assert part in prompt
    assert "secret plan" not in prompt  # the judge sees the answer, not the reasoning


def test_llm_judge_retries(server):
    judge = judge_for(server)
    out = judge.judge_many([case("garbage_then_good"), case("error_then_good")], ["x", "y"])
    assert [v.score for v in out] == [1.0, 1.0]
    assert server.attempts == {"garbage_then_good": 2, "error_then_good": 2}
    assert judge.num_failures == 0


def test_llm_judge_retries_after_a_timeout(server):
    judge = judge_for(server, timeout=0.5)
    assert judge.judge(case("timeout_then_good"), "x").score == 1.0
    assert server.attempts["timeout_then_good"] == 2


def test_llm_judge_gives_up_without_crashing(server):
    judge = judge_for(server, retries=2)
    garbage, error = judge.judge_many([case("always_garbage"), case("always_error")],
                                      ["x", "y"])
    assert garbage.score == 0.0 and garbage.reason.startswith("unparseable:")
    assert error.score == 0.0 and error.reason.startswith("error:")
    assert server.attempts == {"always_garbage": 3, "always_error": 3}
    assert judge.num_failures == 2


def test_llm_judge_runs_requests_concurrently(server):
    judge = judge_for(server, concurrency=8)
    server.gather = 8  # each reply waits (up to 4 s) until all 8 requests are in flight
    start = time.perf_counter()
    out = judge.judge_many([case("slow")] * 8, ["x"] * 8)
    elapsed = time.perf_counter() - start
    assert [v.score for v in out] == [1.0] * 8
    assert server.max_in_flight["slow"] == 8
    assert elapsed < 12.0  # a serial client would wait out the 4 s for each of the 8
    judge = judge_for(server, concurrency=2)
    server.gather = 2  # a client sending more than 2 at once would show max_in_flight > 2
    judge.judge_many([case("slow")] * 4, ["x"] * 4)
    assert server.max_in_flight["slow"] == 2


def test_llm_judge_rejects_bad_config(server):
    with pytest.raises(ValueError, match="kind"):
        LLMJudge(server.url, "m", kind="style")
    with pytest.raises(ValueError, match="rubric"):
        LLMJudge(server.url, "m", rubric="Doc {product_doc} {missing}")
    with pytest.raises(ValueError, match="concurrency"):
        LLMJudge(server.url, "m", concurrency=0)
    helpful = LLMJudge(server.url, "m", kind="helpfulness")
    assert "helpful" in helpful.prompt(case("json"), "It is red.")


def test_length_reward_can_require_a_correct_answer():
    from livethinking.data import LivestreamRecord
    from livethinking.rewards import LengthBand, LivestreamReward, RewardWeights, Verdict

    class Fixed:
        def __init__(self, score):
            self.score = score

        def judge_many(self, records, responses):
            return [Verdict(self.score, "fixed") for _ in responses]

    record = LivestreamRecord(id="r", product_doc="# Product: X\ncolor: red", question="What color?")
    band = LengthBand(l_ref=10.0, lambda_lo=0.5, lambda_hi=1.0, epsilon=5.0)
    weights = RewardWeights(correctness=1.0, helpfulness=0.0, length=2.0)
    for correct, gated, expected in [(0.0, False, 2.0), (0.0, True, 0.0), (1.0, True, 3.0)]:
        reward = LivestreamReward(Fixed(correct), Fixed(0.0), band, weights,
                                  length_needs_correct=gated)
        (out,) = reward.score_many([record], ["x"], [7])
        assert out.total == expected and out.length == 1.0
