"""Where RFT samples and GRPO rollouts come from: our engine in process, and external
OpenAI-compatible servers (two of our own servers on loopback stand in for a vLLM fleet)."""

import json
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from livethinking.data import load_records  # noqa: E402
from livethinking.engine import LLM  # noqa: E402
from livethinking.server import AsyncEngine, build_app  # noqa: E402
from livethinking.train import (GRPOConfig, LossConfig, OptimConfig, RolloutConfig,  # noqa: E402
                                RunConfig, TeacherConfig, run_grpo)
from livethinking.train.teacher import teacher_responses  # noqa: E402

SYSTEM = "Answer from the document."


class _Server:
    def __init__(self, checkpoint, name):
        llm = LLM(checkpoint, max_model_len=512)
        self.server = uvicorn.Server(uvicorn.Config(build_app(AsyncEngine(llm.engine), name),
                                                    host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def servers(demo_setup):
    _, _, student = demo_setup
    running = [_Server(student, "student"), _Server(student, "student")]
    yield running
    for server in running:
        server.close()


def test_engine_teacher_gives_k_samples(demo_setup):
    paths, _, student = demo_setup
    records = load_records(paths.train).items[:3]
    config = TeacherConfig(kind="engine", path=str(student), k=3, max_tokens=12)
    responses = teacher_responses(config, records, seed=0, system_prompt=SYSTEM)
    assert set(responses) == {r.id for r in records}
    assert all(len(v) == 3 and all(isinstance(t, str) for t in v) for v in responses.values())


def test_openai_teacher_gives_k_samples(demo_setup, servers):
    paths, _, _ = demo_setup
    records = load_records(paths.train).items[:3]
    config = TeacherConfig(kind="openai", base_url=servers[0].url, model="student", k=2,
                           max_tokens=12)
    responses = teacher_responses(config, records, seed=0, system_prompt=SYSTEM)
    assert all(len(v) == 2 for v in responses.values())


def test_grpo_with_rollouts_from_external_servers(tmp_path, demo_setup, servers):
    paths, _, student = demo_setup
    config = GRPOConfig(
        model=str(student), train_data=str(paths.train), system_prompt=SYSTEM, steps=1,
        prompts_per_step=2, dynamic_sampling=False,
        rollout=RolloutConfig(source="openai", base_urls=[s.url for s in servers],
                              served_model="student", group_size=3, max_tokens=16),
        loss=LossConfig(), optim=OptimConfig(lr=1e-4),
        run=RunConfig(output_dir=str(tmp_path), progress=False, tensorboard=False, plots=False))
    run_grpo(config, log=lambda *_: None)
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["response_tokens"] > 0 and "loss" in row and "ratio" in row
    assert (tmp_path / "final" / "config.json").is_file()
