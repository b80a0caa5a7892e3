"""FSDP2 data parallelism under torchrun on CPU (gloo): 2 processes follow the same loss
trajectory as 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from livethinking.model import CausalLM


def _rft(tmp_path, demo_setup, name, nproc, extra="", resume=False,
         steps="max_steps: 4\nrows_per_step: 4\n", top=""):
    paths, _, student = demo_setup
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"model: {student}\ntrain_data: {paths.train}\nsystem_prompt: Answer from the document.\n"
        f"teacher: {{kind: demo, k: 2}}\n{steps}row_tokens: 256\n{top}"
        "optim: {lr: 0.003, warmup_steps: 1}\n"
        f"run: {{output_dir: {out}, seed: 1, progress: false, tensorboard: false, plots: false"
        f"{extra}}}\n")
    command = [sys.executable, "-m", "livethinking.train", "rft", "--config", str(config)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "livethinking.train", "rft",
                   "--config", str(config)]
    if resume:
        command.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, out / "final"


def test_rft_uneven_rows_per_rank_finishes_and_follows_one_process(tmp_path, demo_setup):
    """3 rows per step over 2 ranks (one rank runs a zero-weight filler row) and a last,
    partial batch: the 2-process run finishes (the subprocess timeout guards a hang; before
    the filler rows it hung), follows the 1-process run (with gradient checkpointing on
    the FSDP side), and rank 0 alone evaluates held-out prompts mid-run."""
    paths = demo_setup[0]
    steps = "epochs: 1\nrows_per_step: 3\n"
    top = f"eval_data: {paths.heldout}\n"
    extra = ", eval_every: 2, eval_max_tokens: 8"
    one, one_final = _rft(tmp_path, demo_setup, "one", 1, extra=extra, steps=steps, top=top)
    two, two_final = _rft(tmp_path, demo_setup, "two", 2, steps=steps, top=top,
                          extra=extra + ", gradient_checkpointing: true")  # under FSDP too
    train_one = [r for r in one if "loss" in r]
    train_two = [r for r in two if "loss" in r]
    sizes = [r["rows"] for r in train_one]
    assert 3 in sizes and sizes[-1] < 3, sizes  # odd steps and a last partial batch
    assert [r["step"] for r in train_one] == [r["step"] for r in train_two]
    for a, b in zip(train_one, train_two):
        assert b["tokens"] == a["tokens"] and b["rows"] == a["rows"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    last = train_one[-1]["step"]
    expected = sorted({0, last} | set(range(2, last, 2)))
    for rows in (one, two):
        evals = [r for r in rows if "eval/correct" in r]
        assert [r["step"] for r in evals] == expected
        assert all(r["eval/tokens_per_response"] > 0 and r["eval/ttft_ms"] > 0 for r in evals)
    a = CausalLM.from_pretrained(one_final).state_dict()
    b = CausalLM.from_pretrained(two_final).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_two_processes_follow_one_process(tmp_path, demo_setup):
    one, one_final = _rft(tmp_path, demo_setup, "one", 1)
    two, two_final = _rft(tmp_path, demo_setup, "two", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]  # the same global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert one[-1]["loss"] != one[0]["loss"]  # the weights did move
    a = CausalLM.from_pretrained(one_final).state_dict()
    b = CausalLM.from_pretrained(two_final).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def _grpo(tmp_path, demo_setup, name, nproc, loss="{}", top=""):
    paths, _, student = demo_setup
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    # no dynamic sampling and no aux loss: both are functions of each rank's own batch
    config.write_text(
        f"model: {student}\ntrain_data: {paths.train}\nsystem_prompt: Answer from the document.\n"
        f"steps: 3\nprompts_per_step: 4\ndynamic_sampling: false\naux_loss: false\n{top}"
        f"rollout: {{group_size: 4, max_tokens: 16}}\noptim: {{lr: 0.001}}\nloss: {loss}\n"
        f"run: {{output_dir: {out}, seed: 1, progress: false, tensorboard: false, plots: false}}\n")
    command = ["-m", "livethinking.train", "grpo", "--config", str(config)]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable] + command, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], out / "final"


@pytest.mark.parametrize("scale, micro, beta, offload", [
    ("group", None, 0.0, False), ("batch", None, 0.0, False), ("batch", 160, 0.0, False),
    ("batch", None, 0.05, False), ("batch", None, 0.05, True)])
def test_grpo_two_processes_follow_one_process(tmp_path, demo_setup, scale, micro, beta,
                                               offload):
    """``batch``: the advantages' std is over the global batch (rewards gathered from every
    rank first, as TRL), so the loss and gradients equal the 1-process run's. With a small
    ``micro_batch_tokens`` each rank runs its rows as several microbatches (as many on
    every rank: the one with fewer runs zero-weight fillers), and still follows. With a
    KL term the reference model is FSDP-sharded like the policy, and with
    ``reference_offload`` its shards (one process: its layers) live in CPU memory."""
    loss = (f"{{advantage_scale: {scale}, beta: {beta}, "
            f"reference_offload: {str(offload).lower()}}}")
    top = "" if micro is None else f"micro_batch_tokens: {micro}\n"
    one, one_final = _grpo(tmp_path, demo_setup, "one", 1, loss, top)
    two, two_final = _grpo(tmp_path, demo_setup, "two", 2, loss, top)
    if micro is not None:
        assert all(r["microbatches"] > 1 for r in one)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["response_tokens"] == pytest.approx(a["response_tokens"])  # the same rollouts
        assert b["reward/total"] == pytest.approx(a["reward/total"], rel=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a = CausalLM.from_pretrained(one_final).state_dict()
    b = CausalLM.from_pretrained(two_final).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_grpo_old_logprobs_under_fsdp_follow_one_process(tmp_path, demo_setup):
    """Two updates per batch: the old log-probs are no-grad forwards of the sharded policy
    that no backward follows (the modules are resharded after them); both updates' ratios
    and gradients equal the 1-process run's."""
    one, _ = _grpo(tmp_path, demo_setup, "one", 1, "{}", "updates_per_batch: 2\n")
    two, _ = _grpo(tmp_path, demo_setup, "two", 2, "{}", "updates_per_batch: 2\n")
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["ratio"] == pytest.approx(a["ratio"], rel=1e-5)


def test_grpo_microbatched_old_and_reference_logprobs_under_fsdp(tmp_path, demo_setup):
    """Old-policy and reference log-probs in microbatches under FSDP: the ranks forward as
    often as each other (fillers), so a run with two updates per batch and a KL term
    finishes (the subprocess timeout guards a hang)."""
    rows, _ = _grpo(tmp_path, demo_setup, "two", 2, "{beta: 0.05}",
                    "micro_batch_tokens: 160\nupdates_per_batch: 2\n")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["microbatches"] >= 1 and r["kl"] >= 0 for r in steps)


def test_two_process_checkpoint_resumes_exactly(tmp_path, demo_setup):
    whole, whole_final = _rft(tmp_path, demo_setup, "fsdp", 2, extra=", save_every: 2")
    assert (tmp_path / "fsdp" / "checkpoints" / "LATEST").read_text() == "step-00000002"
    uninterrupted = {k: v.clone() for k, v in CausalLM.from_pretrained(whole_final).state_dict().items()}
    resumed, resumed_final = _rft(tmp_path, demo_setup, "fsdp", 2, extra=", save_every: 2",
                                  resume=True)  # from step 2, as if interrupted there
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    b = CausalLM.from_pretrained(resumed_final).state_dict()
    assert all(torch.equal(uninterrupted[k], b[k]) for k in uninterrupted)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_sharded_optimizer_checkpoint_resumes_on_another_number_of_ranks(
        tmp_path, demo_setup, first, then):
    """The optimizer state is saved with torch.distributed.checkpoint, each rank writing
    its own shards (no rank gathers the fp32 state); a run saved by ``first`` processes
    resumes on ``then`` and its losses continue as the uninterrupted run's."""
    whole, whole_final = _rft(tmp_path, demo_setup, "run", first, extra=", save_every: 2")
    saved = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (saved / "optimizer" / ".metadata").is_file()
    shards = sorted(p.name for p in (saved / "optimizer").glob("*.distcp"))
    assert len(shards) == first, shards  # one file per writing rank
    state = torch.load(saved / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["format"] == "dcp"
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 1
                   for v in state["optimizer"].values())  # no gathered tensors in it
    uninterrupted = {k: v.clone() for k, v in
                     CausalLM.from_pretrained(whole_final).state_dict().items()}
    resumed, final = _rft(tmp_path, demo_setup, "run", then, extra=", save_every: 2",
                          resume=True)  # from step 2, on the other number of ranks
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    assert whole[3]["loss"] != whole[1]["loss"]  # the steps after the resume did train
    b = CausalLM.from_pretrained(final).state_dict()
    for key in uninterrupted:
        assert torch.allclose(uninterrupted[key], b[key], atol=1e-5, rtol=1e-4), key


def test_bf16_under_fsdp_keeps_fp32_shards_and_follows_one_process(tmp_path, demo_setup):
    """A bf16 run under FSDP2 holds fp32 parameter shards (the optimizer's masters),
    computes in bf16 and reduces gradients in fp32 (MixedPrecisionPolicy, as torchtitan):
    its losses follow the 1-process bf16 run (bf16 weights + fp32 masters) within bf16's
    rounding, it resumes from its sharded checkpoint bit for bit, and it exports bf16."""
    extra = ", dtype: bfloat16, save_every: 2"
    one, _ = _rft(tmp_path, demo_setup, "one", 1, extra=extra)
    two, two_final = _rft(tmp_path, demo_setup, "two", 2, extra=extra)
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    assert two[-1]["loss"] < two[0]["loss"]
    model = CausalLM.from_pretrained(two_final)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    resumed, resumed_final = _rft(tmp_path, demo_setup, "two", 2, extra=extra, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in two]  # the fp32 masters came back
    again = CausalLM.from_pretrained(resumed_final).state_dict()
    assert all(torch.equal(whole[k], again[k]) for k in whole)


_MIXED_PRECISION_SCRIPT = """
import torch
from livethinking.model import CausalLM
from livethinking.train.distributed import (copy_into_unsharded, end_distributed,
                                            init_distributed, shard_model)
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.config import OptimConfig

context = init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = CausalLM.from_pretrained(STUDENT, dtype=torch.bfloat16).train()
copy = CausalLM.from_pretrained(STUDENT, dtype=torch.bfloat16).eval()
shard_model(model, context, param_dtype=torch.bfloat16)
params = dict(model.named_parameters())
assert all(p.dtype == torch.float32 and hasattr(p, "placements") for p in params.values())
optimizer = MasterWeightAdamW(model.named_parameters(), OptimConfig(lr=1e-2), 4)
assert all(m is p for m, p in zip(optimizer.master, optimizer.params))  # shards are masters
seen = {}

def record(module, args, out):
    seen["dtype"] = (out[0] if isinstance(out, tuple) else out).dtype  # returns None


model.model.layers[0].register_forward_hook(record)
ids = torch.randint(3, 200, (2, 12))
hidden = model.forward_hidden(ids).hidden_states
assert seen["dtype"] == torch.bfloat16, seen  # compute in bf16
model.compute_logits(hidden).float().square().mean().backward()
grads = [p.grad for p in params.values() if p.grad is not None]
assert grads and all(g.dtype == torch.float32 for g in grads)  # reduced in fp32
optimizer.step()
from livethinking.train.config import RFTConfig, TeacherConfig
from livethinking.train.memory_plan import plan_memory

plan = plan_memory(RFTConfig(model="m", train_data="t", teacher=TeacherConfig(kind="demo")),
                   model.config, gpus=2, gpu_memory=2**36).per_rank
local = lambda tensors: sum(t.to_local().numel() * t.element_size() for t in tensors)
measured = {"parameters": local(params.values()), "gradients": local(grads),
            "adam_moments": local(t for s in optimizer.optimizer.state.values()
                                  for t in (s["exp_avg"], s["exp_avg_sq"]))}
for key, value in measured.items():  # FSDP2 pads uneven shards: within 10%
    assert abs(plan[key] - value) <= 0.1 * value, (key, plan[key], value)
assert plan["fp32_masters"] == plan["master_gradients"] == 0
copy_into_unsharded(model, copy)
for name, p in copy.named_parameters():
    assert torch.equal(p, params[name].full_tensor().to(torch.bfloat16)), name
end_distributed(context)
print("mixed precision ok", context.rank)
"""


def test_mixed_precision_policy_and_tensor_at_a_time_copy(tmp_path, demo_setup):
    """``shard_model(param_dtype=bf16)``: fp32 DTensor shards that are the optimizer's
    masters, bf16 activations, fp32 gradients, each rank's state as the planner counts it
    (16 bytes per parameter over the ranks); `copy_into_unsharded` leaves the engine's bf16
    copy equal to the gathered shards, one tensor at a time."""
    stdout = _torchrun_script(tmp_path / "mixed.py", f"STUDENT = {str(demo_setup[2])!r}\n"
                              + _MIXED_PRECISION_SCRIPT)
    assert "mixed precision ok 0" in stdout and "mixed precision ok 1" in stdout


def _torchrun_script(path, text: str) -> str:
    """Run the script ``text`` (saved at ``path``) on 2 processes; its stdout."""
    path.write_text(text)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_run_ends_only_the_process_group_it_created(tmp_path, monkeypatch):
    """A run destroys the process group it created once its collectives are done (left to
    interpreter shutdown, gloo aborted a finished run now and then); a group the caller
    created stays."""
    import torch.distributed as dist

    from livethinking.train.distributed import end_distributed, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # "under torchrun", but the group already exists
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        context = init_distributed(torch.device("cpu"))
        assert (context.rank, context.world_size, context.owns_group) == (0, 1, False)
        end_distributed(context)
        assert dist.is_initialized()  # the caller's group is left alone
        end_distributed(type(context)(0, 1, context.mesh, owns_group=True))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_AGREEMENT_SCRIPT = """
import sys
import torch
from livethinking.data import LivestreamRecord
from livethinking.train import rft
from livethinking.train.distributed import (all_gather_rows, broadcast_from_main,
                                            end_distributed, init_distributed)
from livethinking.train.loop import TrainingRun

context = init_distributed(torch.device("cpu"))
rank = context.rank
assert broadcast_from_main({"from": rank}, context) == {"from": 0}
gathered = all_gather_rows(torch.tensor([10.0 * rank, 10.0 * rank + 1]), context)
assert gathered.tolist() == [0.0, 1.0, 10.0, 11.0], gathered
records = [LivestreamRecord(id=str(i), product_doc="d", question="q") for i in range(3)]
run = TrainingRun(None, torch.device("cpu"), torch.float32, context, None, None, None, None,
                  print)
calls = []

def accepted(config, records, out, reuse):  # each rank's teacher would say something else
    calls.append(rank)
    return [(records[rank], f"answer of rank {rank}")], {"accepted": 1}

rft._accepted = accepted
kept, stats = rft._agreed_accepted(None, records, run, reuse=False)
assert calls == ([0] if rank == 0 else []), calls  # only rank 0 samples and judges
assert [(r.id, text) for r, text in kept] == [("0", "answer of rank 0")]
assert stats == {"accepted": 1}

def failing(config, records, out, reuse):
    raise OSError("teacher unreachable")

rft._accepted = failing
try:
    rft._agreed_accepted(None, records, run, reuse=False)
except (OSError, RuntimeError) as error:  # every rank raises; none waits forever
    assert "teacher unreachable" in str(error), error
else:
    sys.exit("no error")
end_distributed(context)
print("agreed", rank)
"""


def test_ranks_agree_on_rank_zeros_accepted_set(tmp_path):
    """Under torchrun only rank 0 samples the teacher and judges; every rank trains on its
    accepted set (broadcast), and an error there is raised on every rank, not a hang."""
    stdout = _torchrun_script(tmp_path / "agree.py", _AGREEMENT_SCRIPT)
    assert "agreed 0" in stdout and "agreed 1" in stdout


def test_grpo_online_difficulty_two_processes_follow_one_process(tmp_path, demo_setup):
    """Difficulty-aware sampling under FSDP: each rank's group accuracies are gathered, so
    both ranks' filters stay equal, draw the same picks and follow the 1-process run."""
    paths = demo_setup[0]
    from livethinking.data import load_records

    accuracy = tmp_path / "acc.jsonl"
    accuracy.write_text("".join(json.dumps({"id": r.id, "accuracy": 0.5}) + "\n"
                                for r in load_records(paths.train).items))
    top = f"difficulty: {{enabled: true, accuracy_file: {accuracy}, online: true}}\n"
    one, _ = _grpo(tmp_path, demo_setup, "one", 1, "{}", top)
    two, _ = _grpo(tmp_path, demo_setup, "two", 2, "{}", top)
    assert one[-1]["difficulty/kept_fraction"] < 1.0  # the online estimates moved
    for a, b in zip(one, two):
        for key in ("difficulty/kept_fraction", "difficulty/acc_0.0-0.2", "reward/total",
                    "response_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)


def _dpo(tmp_path, demo_setup, name, nproc):
    paths, _, student = demo_setup
    from livethinking.data import load_records

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": r.id, "chosen": r.reference,
                                         "rejected": "Sorry, I cannot say."}) + "\n"
                             for r in load_records(paths.train).items))
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"model: {student}\ntrain_data: {paths.train}\npairs: {pairs}\nbeta: 0.5\n"
        "sft_weight: 0.3\naux_loss: false\npairs_per_step: 3\nmax_steps: 3\n"
        "micro_batch_tokens: 200\noptim: {lr: 0.003}\n"
        f"run: {{output_dir: {out}, seed: 1, progress: false, tensorboard: false, plots: false}}\n")
    command = ["-m", "livethinking.train", "dpo", "--config", str(config)]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + command
    result = subprocess.run([sys.executable] + command, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], out / "final"


def test_dpo_two_processes_follow_one_process(tmp_path, demo_setup):
    """DPO under FSDP: 3 pairs a step over 2 ranks (one rank has one pair fewer, so fewer
    microbatches: it runs zero-weight fillers), reference log-probs computed by every rank
    before the optimizer exists (resharded after: else the optimizer held the unsharded
    root tensors and the grad norm was 1.65 for 6.97); the loss, the implicit rewards and
    the weights follow the 1-process run."""
    one, one_final = _dpo(tmp_path, demo_setup, "one", 1)
    two, two_final = _dpo(tmp_path, demo_setup, "two", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "dpo_loss", "nll", "rewards/margins", "rewards/accuracies",
                    "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    a = CausalLM.from_pretrained(one_final).state_dict()
    b = CausalLM.from_pretrained(two_final).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
