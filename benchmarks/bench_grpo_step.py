"""GRPO step time and completion tokens/s: ``livethinking.train.run_grpo`` vs TRL's GRPOTrainer.

    python benchmarks/bench_grpo_step.py                      # CPU, defaults, a few minutes
    python benchmarks/bench_grpo_step.py --device cuda --steps 8 --out-csv grpo_step.csv

Both sides train the same tiny random Qwen3-MoE student (``DemoSize(hidden=64, layers=2,
experts=4)``: ``build_student``'s checkpoint, which ``AutoModelForCausalLM`` loads with the
same weights) on the same demo records (``make_demo(num_products=8, questions_per_product=4,
seed=0)``), same chat prompts (``build_messages`` with ``SYSTEM_PROMPT``, the ChatML template;
the token ids are checked equal) and the same reward: the rule correctness + helpfulness
judges and the length band, weights (1, 0.5, 0.5), L_ref given explicitly (= max tokens).
Per step: P prompts × G samples (temperature 1, top-p 1, no top-k, at most M new tokens),
group-normalised advantages, loss "dapo", β = 0 (no reference model), ε = 0.2, one optimizer
step per generation batch (on-policy, so no old-log-prob pass on either side), AdamW lr 1e-5
constant, betas (0.9, 0.95), no weight decay, grad clip 1.0, MoE balance loss at the model's
coefficient (0.01). Ours: dynamic sampling off. TRL: per_device_train_batch_size = P·G,
gradient accumulation 1, generation_batch_size = P·G.

Measured: wall time of each step (ours: ``rollout_s + train_s`` from metrics.jsonl; TRL: a
TrainerCallback from on_step_begin to on_step_end), split into generation (ours
``generate_s``; TRL ``_generate_and_score_completions`` less the two below), reward scoring
(ours ``reward_s``; TRL ``_calculate_rewards``), old log-probs (TRL's
``_get_per_token_logps_and_entropies`` inside the scoring, which this on-policy setup skips
on both sides: 0) and training (the rest);
completion tokens per step (EOS included on both sides). Step 1 is a warm-up and is left out;
the table gives medians of the others. tokens/s = completion tokens / step time.

What differs: we generate with our engine (paged KV cache, continuous batching, the prompt
prefilled once per group, shared weights) and train through ``fused_linear_grpo_loss`` with
fp32 master weights; TRL generates with transformers' ``generate`` (no paged KV cache, each
prompt repeated G times) and trains the HF model with torch AdamW on its parameters (on CUDA
both sides hold bf16 weights; TRL has no fp32 master copy). Prompt order differs (each side's
own seeded sampler), so samples and lengths differ: compare tokens/s, not only step time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import run_header

COLUMNS = ["side", "device", "threads", "steps", "prompts", "group", "max_tokens", "step_s",
           "gen_s", "reward_s", "old_logp_s", "train_s", "completion_tokens", "tokens_per_s",
           "gen_tokens_per_s"]


def make_reward(l_ref: float):
    from livethinking import rewards

    band = rewards.LengthBand(l_ref=l_ref, lambda_lo=0.3, lambda_hi=0.6, epsilon=0.5 * l_ref)
    return rewards.LivestreamReward(rewards.RuleCorrectnessJudge(), rewards.RuleHelpfulnessJudge(),
                                    band, rewards.RewardWeights(correctness=1.0, helpfulness=0.5,
                                                                length=0.5))


def summarise(side: str, steps: list[dict]) -> dict:
    """Medians over the steps after the warm-up one."""
    timed = steps[1:] or steps
    med = (lambda key: statistics.median(s[key] for s in timed))
    return {"side": side, "step_s": med("step_s"), "gen_s": med("gen_s"),
            "reward_s": med("reward_s"), "old_logp_s": med("old_logp_s"),
            "train_s": med("train_s"), "completion_tokens": med("tokens"),
            "tokens_per_s": statistics.median(s["tokens"] / s["step_s"] for s in timed),
            "gen_tokens_per_s": statistics.median(s["tokens"] / s["gen_s"] for s in timed)}


def run_ours(args, model_dir: Path, train: Path, out: Path) -> list[dict]:
    from livethinking.train import (GRPOConfig, LossConfig, OptimConfig, RewardConfig,
                                    RolloutConfig, RunConfig, run_grpo)
    from livethinking.train.demo import SYSTEM_PROMPT
    from livethinking.train.metrics import read_metrics

    config = GRPOConfig(
        model=str(model_dir), train_data=str(train), system_prompt=SYSTEM_PROMPT,
        steps=args.steps, prompts_per_step=args.prompts, dynamic_sampling=False,
        rollout=RolloutConfig(group_size=args.group, temperature=1.0, max_tokens=args.max_tokens),
        reward=RewardConfig(w_correctness=1.0, w_helpfulness=0.5, w_length=0.5,
                            l_ref=float(args.max_tokens), lambda_lo=0.3, lambda_hi=0.6),
        loss=LossConfig(loss_type="dapo", beta=0.0, epsilon_low=0.2),
        optim=OptimConfig(lr=1e-5, betas=(0.9, 0.95), warmup_steps=0, min_lr_ratio=1.0,
                          grad_clip=1.0),
        run=RunConfig(output_dir=str(out), seed=args.seed, device=args.device, progress=False,
                      tensorboard=False, plots=False))
    run_grpo(config, log=lambda *a: None)
    rows = read_metrics(out / "metrics.jsonl")
    n = args.prompts * args.group
    # on-policy: no old-log-prob pass (the loss detaches the current log-probs)
    return [{"step_s": r["rollout_s"] + r["train_s"], "gen_s": r["generate_s"],
             "reward_s": r["reward_s"], "old_logp_s": 0.0, "train_s": r["train_s"],
             "tokens": r["response_tokens"] * n} for r in rows]


def run_trl(args, model_dir: Path, records, out: Path, dtype: torch.dtype) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from livethinking.model.prompt import build_messages
    from livethinking.train.common import prompt_ids
    from livethinking.train.demo import SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    by_id = {r.id: r for r in records}
    rows = []
    for r in records:
        messages = build_messages(r.product_doc, [{"role": t.role, "content": t.content}
                                                  for t in r.history], r.question,
                                  system_prompt=SYSTEM_PROMPT)
        rows.append({"prompt": messages, "record_id": r.id})
    ours = prompt_ids(tokenizer, records[0], SYSTEM_PROMPT)
    theirs = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    if list(ours) != list(theirs):
        print("warning: the two sides' prompt token ids differ")
    reward = make_reward(float(args.max_tokens))

    def livestream_reward(prompts, completions, completion_ids, record_id, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [b.total for b in reward.score_many([by_id[i] for i in record_id], texts,
                                                   [len(ids) for ids in completion_ids])]

    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(out), use_cpu=args.device == "cpu", bf16=dtype == torch.bfloat16,
        report_to="none", logging_steps=1, save_strategy="no", max_steps=args.steps,
        seed=args.seed, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, generation_batch_size=n,
        num_generations=args.group, max_completion_length=args.max_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        num_iterations=1, dataloader_num_workers=0, disable_tqdm=True)
    steps: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            began = time.perf_counter()
            steps[-1].update(reward_s=0.0, old_logp_s=0.0, scoring=True)
            output = super()._generate_and_score_completions(inputs)
            s = steps[-1]
            s["scoring"] = False
            s["gen_s"] = time.perf_counter() - began - s["reward_s"] - s["old_logp_s"]
            s["tokens"] = float(output["completion_mask"].sum())
            return output

        def _calculate_rewards(self, *args, **kwargs):
            began = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            steps[-1]["reward_s"] += time.perf_counter() - began
            return out

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            began = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if steps[-1].get("scoring"):  # the old (or reference) log-prob pass
                steps[-1]["old_logp_s"] += time.perf_counter() - began
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append({"began": time.perf_counter()})

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            s = steps[-1]
            s["step_s"] = time.perf_counter() - s.pop("began")
            s["train_s"] = s["step_s"] - s["gen_s"] - s["reward_s"] - s["old_logp_s"]

    trainer = Timed(model=model, reward_funcs=livestream_reward, args=config,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                    callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    trainer.train()
    return steps


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per side (step 1 untimed)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=48, help="max completion tokens (M)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="ours,trl", help="comma list of: ours, trl")
    p.add_argument("--out-csv", type=Path, help="CSV file to append rows to")
    p.add_argument("--json", action="store_true", help="also print the per-step numbers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from livethinking.data import load_records
    from livethinking.tasks.livestream import make_demo
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer

    results, per_step = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        tmp = Path(tmp)
        paths = make_demo(tmp / "data", num_products=8, questions_per_product=4, seed=args.seed)
        tokenizer = build_tokenizer(paths.corpus, tmp / "tokenizer")
        model_dir = build_student(tokenizer, DemoSize(hidden=64, layers=2, experts=4),
                                  tmp / "student", args.seed)
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        if "ours" in sides:
            per_step["ours"] = run_ours(args, model_dir, paths.train, tmp / "ours")
            results.append(summarise("livethinking", per_step["ours"]))
        if "trl" in sides:
            try:
                import trl
            except ImportError as exc:
                print(f"TRL side skipped: {exc} (pip install -e '.[bench]')")
            else:
                records = load_records(paths.train).items
                per_step["trl"] = run_trl(args, model_dir, records, tmp / "trl", dtype)
                results.append(summarise(f"TRL {trl.__version__}", per_step["trl"]))

    name, commit = run_header(device)
    print(f"\n### GRPO step, {datetime.date.today()}, {name}, commit {commit}, torch "
          f"{torch.__version__}\n\nP={args.prompts} prompts × G={args.group}, max {args.max_tokens} "
          f"new tokens, {args.steps} steps (first one untimed), medians, {dtype}\n")
    print("| side | step (s) | generation (s) | reward (s) | old log-probs (s) | training (s) "
          "| completion tokens / step | tokens/s | generation tokens/s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {r['step_s']:.3f} | {r['gen_s']:.3f} | {r['reward_s']:.3f} | "
              f"{r['old_logp_s']:.3f} | {r['train_s']:.3f} | "
              f"{r['completion_tokens']:.0f} | {r['tokens_per_s']:.1f} | "
              f"{r['gen_tokens_per_s']:.1f} |")
    if len(results) == 2:
        a, b = results
        print(f"\nours / TRL: tokens/s ×{a['tokens_per_s'] / b['tokens_per_s']:.2f}, step time "
              f"×{b['step_s'] / a['step_s']:.2f} faster, generation tokens/s "
              f"×{a['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f}")
    if args.json:
        print(json.dumps(per_step, indent=1))
    if args.out_csv:
        new = not args.out_csv.exists()
        with args.out_csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            for r in results:
                writer.writerow({**r, "device": name, "threads": args.threads, "steps": args.steps,
                                 "prompts": args.prompts, "group": args.group,
                                 "max_tokens": args.max_tokens})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
