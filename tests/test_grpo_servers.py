"""GRPO with rollouts from two ``livethinking serve`` processes that follow the policy:
after every push the servers hold the trainer's weights bit for bit (weights checksum),
for ``weight_sync: distributed`` (gloo on loopback) and ``disk``; the final policy's greedy
answers through ``/generate`` equal the in-process engine's on the saved model; a server
killed mid-run leaves the run going on the other one."""

import json

import httpx2
import pytest

from livethinking.engine import LLM, SamplingParams
from livethinking.engine.weight_update import weights_checksum
from livethinking.train.config import (GRPOConfig, LossConfig, OptimConfig, RolloutConfig,
                                       RunConfig)
from livethinking.train.grpo import GRPOTrainer, run_grpo
from serving import server_processes

SYSTEM = "Answer the viewer from the product document."
KEY = "trainer-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def two_servers(demo_setup):
    with server_processes(demo_setup[2], 2, api_key=KEY) as procs:
        yield procs


def _config(tmp_path, student, paths, servers, **rollout):
    return GRPOConfig(
        model=str(student), train_data=str(paths.train), system_prompt=SYSTEM, steps=3,
        prompts_per_step=4, updates_per_batch=1,
        rollout=RolloutConfig(**{"source": "servers", "servers": [s.url for s in servers],
                                 "api_key": KEY, "group_size": 4, "max_tokens": 16,
                                 "bucket_mb": 0.05, **rollout}),
        loss=LossConfig(beta=0.0), optim=OptimConfig(lr=1e-2),
        run=RunConfig(output_dir=str(tmp_path / "grpo"), seed=0, progress=False,
                      tensorboard=False, plots=False))


def _checksums(servers):
    return [httpx2.get(f"{s.url}/get_weights_checksum", headers=AUTH, timeout=30).json()
            for s in servers if s.process.poll() is None]


@pytest.fixture
def pushes(monkeypatch):
    """Every push of the run: (the trainer's checksum and version, the servers' answers)."""
    seen = []
    original = GRPOTrainer.push_weights

    def checked(self):
        stats = original(self)
        seen.append((weights_checksum(self.run.model), self.weight_version,
                     _checksums(self.pool_servers), stats))
        return stats

    monkeypatch.setattr(GRPOTrainer, "push_weights", checked)
    return seen


@pytest.mark.parametrize("weight_sync", ["distributed", "disk"])
def test_servers_follow_the_policy_bit_for_bit(tmp_path, demo_setup, two_servers, pushes,
                                               monkeypatch, weight_sync):
    paths, _, student = demo_setup
    monkeypatch.setattr(GRPOTrainer, "pool_servers", two_servers, raising=False)
    final = run_grpo(_config(tmp_path, student, paths, two_servers, weight_sync=weight_sync),
                     log=lambda *_: None)
    assert [version for _, version, _, _ in pushes] == ["0", "1", "2", "3"]
    for trainer_sum, version, answers, stats in pushes:
        assert answers == [{"checksum": trainer_sum, "weight_version": version}] * 2
        assert stats["push_servers"] == 2 and stats["push_gb"] > 0
    assert len({s for s, _, _, _ in pushes}) == 4  # every step moved the weights
    prompt = [5, 17, 29, 41]
    fresh = LLM(final, device="cpu").generate([prompt], [SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True)])[0].outputs[0].token_ids
    for server in two_servers:
        out = server.post("/generate", {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}}).json()
        assert out["output_ids"] == fresh and out["meta_info"]["weight_version"] == "3"
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    steps = [r for r in rows if "push_s" in r]
    assert len(steps) == 3 and all(r["servers_healthy"] == 2 for r in steps)


def test_a_killed_server_leaves_the_run_on_the_other(tmp_path, demo_setup, two_servers,
                                                     pushes, monkeypatch):
    paths, _, student = demo_setup
    monkeypatch.setattr(GRPOTrainer, "pool_servers", two_servers, raising=False)
    original = GRPOTrainer.rollouts

    def rollouts_then_kill(self, picks):
        groups = original(self, picks)
        if self.weight_version == "1" and two_servers[1].process.poll() is None:
            two_servers[1].process.kill()  # gone between its answers and the next push
            two_servers[1].process.wait(30)
        return groups

    monkeypatch.setattr(GRPOTrainer, "rollouts", rollouts_then_kill)
    run_grpo(_config(tmp_path, student, paths, two_servers), log=lambda *_: None)
    assert [v for _, v, _, _ in pushes] == ["0", "1", "2", "3"]
    assert [len(answers) for _, _, answers, _ in pushes] == [2, 2, 1, 1]
    for trainer_sum, version, answers, stats in pushes:
        assert all(a == {"checksum": trainer_sum, "weight_version": version} for a in answers)
    assert [stats["push_servers"] for *_, stats in pushes] == [2, 2, 1, 1]
    assert pushes[-1][3]["server_failures"] >= 1 and pushes[-1][3]["servers_healthy"] == 1


def test_max_staleness_one_samples_ahead_and_stays_in_bounds(tmp_path, demo_setup, two_servers,
                                                             pushes, monkeypatch):
    paths, _, student = demo_setup
    monkeypatch.setattr(GRPOTrainer, "pool_servers", two_servers, raising=False)
    config = _config(tmp_path, student, paths, two_servers, max_staleness=1)
    config.steps = 4
    run_grpo(config, log=lambda *_: None)
    assert [v for _, v, _, _ in pushes] == ["0", "1", "2", "3", "4"]
    for trainer_sum, version, answers, _ in pushes:  # pushed while sampling went on
        assert answers == [{"checksum": trainer_sum, "weight_version": version}] * 2
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    steps = [r for r in rows if "push_s" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["staleness/0"] + r["staleness/1"] == pytest.approx(1.0)
        assert r["trainer_idle_s"] >= 0 and r["rollout_busy_s"] > 0
    # the batch of step k + 1 was begun on the weights of step k - 1 while step k trained
    assert max(r["staleness/1"] for r in steps[1:]) > 0
    assert steps[0]["staleness/0"] == 1.0
    assert len({s for s, _, _, _ in pushes}) == 5


@pytest.mark.parametrize("kwargs, fragment", [
    ({"source": "servers"}, "needs rollout.servers"),
    ({"source": "servers", "servers": ["http://h:1/v1"]}, "root URLs"),
    ({"source": "servers", "servers": ["h:1"]}, "root URLs"),
    ({"source": "engine", "max_staleness": 1}, "needs rollout.source servers"),
    ({"source": "servers", "servers": ["http://h:1"], "max_staleness": -1}, "max_staleness"),
    ({"source": "servers", "servers": ["http://h:1"], "bucket_mb": 0}, "bucket_mb"),
    ({"source": "servers", "servers": ["http://h:1"], "master_port": 70000}, "master_port"),
])
def test_server_rollout_settings_are_checked(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        RolloutConfig(**kwargs)


@pytest.fixture(scope="module")
def rft_student(tmp_path_factory, demo_setup):
    """The demo student after a short RFT: its answers end, so a length reward can act."""
    from livethinking.train.config import RFTConfig, TeacherConfig
    from livethinking.train.rft import run_rft

    paths, _, student = demo_setup
    out = tmp_path_factory.mktemp("rft")
    return run_rft(RFTConfig(
        model=str(student), train_data=str(paths.train), system_prompt=SYSTEM,
        teacher=TeacherConfig(kind="demo", k=2), epochs=6, row_tokens=384, rows_per_step=2,
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        run=RunConfig(output_dir=str(out), seed=1, progress=False, tensorboard=False,
                      plots=False)), log=lambda *_: None)


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_reward_rises_with_and_without_staleness(tmp_path, demo_setup, rft_student,
                                                 two_servers, max_staleness):
    """The servers start from the untrained student: the first push gives them the RFT
    policy. A length reward (shorter than the band's top is better) then rises over 10
    steps, sampled ahead or not."""
    from livethinking.train.config import RewardConfig

    paths, _, _ = demo_setup
    config = _config(tmp_path, rft_student, paths, two_servers, max_staleness=max_staleness,
                     max_tokens=96)
    config.rollout.group_size = 8
    config.steps, config.dynamic_sampling = 10, False
    config.optim = OptimConfig(lr=3e-3, warmup_steps=0)
    config.reward = RewardConfig(w_correctness=0.0, w_helpfulness=0.0, w_length=1.0,
                                 lambda_lo=0.2, lambda_hi=0.45, length_needs_correct=False)
    run_grpo(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    reward = [r["reward/total"] for r in rows if "reward/total" in r]
    tokens = [r["response_tokens"] for r in rows if "response_tokens" in r]
    assert len(reward) == 10
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.04, reward
    assert sum(tokens[-3:]) / 3 < sum(tokens[:3]) / 3 - 5, tokens


@pytest.mark.parametrize("weight_sync, staleness", [("distributed", 0), ("disk", 0),
                                                    ("distributed", 1)])
def test_two_trainer_processes_drive_the_servers(tmp_path, demo_setup, two_servers,
                                                 weight_sync, staleness):
    """Under torchrun (2 ranks, FSDP2 on gloo) both ranks sample from the servers (with
    ``max_staleness: 1`` ahead of training, each rank its share) and rank 0 pushes the
    gathered weights after every step: the servers end on the saved final policy bit for
    bit, and each step's metrics count both servers."""
    import os
    import subprocess
    import sys

    from livethinking.model import CausalLM

    paths, _, student = demo_setup
    out = tmp_path / "grpo"
    servers = ",".join(s.url for s in two_servers)
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"model: {student}\ntrain_data: {paths.train}\nsystem_prompt: {SYSTEM}\n"
        f"steps: {2 + staleness}\nprompts_per_step: 4\ndynamic_sampling: false\n"
        f"rollout: {{source: servers, servers: [{servers}], weight_sync: {weight_sync}, "
        f"max_staleness: {staleness}, "
        "group_size: 4, max_tokens: 16, bucket_mb: 0.05}\n"
        "optim: {lr: 0.01}\nloss: {beta: 0.0}\n"
        f"run: {{output_dir: {out}, seed: 1, progress: false, tensorboard: false, plots: false}}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", LIVETHINKING_API_KEY=KEY)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "livethinking.train", "grpo", "--config", str(config)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in rows if "push_s" in r]
    assert [r["step"] for r in steps] == list(range(1, 3 + staleness))
    assert all(r["push_servers"] == 2 and r["servers_healthy"] == 2 for r in steps)
    if staleness:  # a batch was begun on older weights while the step before it trained
        assert all(f"staleness/{d}" in r for r in steps for d in (0, 1))
        assert max(r["staleness/1"] for r in steps) > 0
    final = weights_checksum(CausalLM.from_pretrained(out / "final"))
    assert _checksums(two_servers) == [{"checksum": final,
                                        "weight_version": str(2 + staleness)}] * 2
