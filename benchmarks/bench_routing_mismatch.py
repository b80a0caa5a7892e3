"""Train–inference mismatch of an MoE student, and what routing replay (R3) removes.

    python benchmarks/bench_routing_mismatch.py                   # CPU, a couple of minutes
    python benchmarks/bench_routing_mismatch.py --device cuda --prompts 64 --out-json m.json

A tiny random Qwen3-MoE with many experts (default 64 experts, top-8, 4 layers, hidden
64, weights N(0, 0.3²) so routing and logits are far from flat) samples P prompts × G
completions of M tokens from the engine (``enable_return_routed_experts``), and the
trainer scores the same sequences in fp32 (``forward_hidden`` + ``fused_linear_logprobs``,
as GRPO does). Rows of the table (one run, the same sequences):

- ``engine bf16 -> trainer fp32``: the usual production split;
- ``... with R3``: the trainer replays the engine's experts;
- ``engine fp32 batched -> trainer fp32``: only batching/kernels differ;
- ``engine fp32 one at a time`` (the engine's deterministic mode): the control.

Columns: router disagreement = the fraction of (token, MoE layer) pairs whose top-k set
differs between sampler and trainer (for R3 rows: between the trainer's own router and
the replayed experts, i.e. what replay overrides); then over the sampled tokens, the
trainer log-prob o minus the sampler's s: mean and max |o − s|, and the k3 estimate of
KL(sampler ‖ trainer), mean(e^(o−s) − 1 − (o−s)).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livethinking import ops  # noqa: E402
from livethinking.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from livethinking.model import CausalLM, ModelConfig  # noqa: E402


def tiny_moe(experts: int, top_k: int, layers: int, hidden: int, vocab: int, seed: int):
    config = ModelConfig(model_type="qwen3_moe", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=1024, moe_intermediate_size=hidden // 2,
                         num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                         eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = CausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def sample(model, dtype, device, prompts, args, *, deterministic=False):
    engine_model = copy.deepcopy(model).to(device=device, dtype=dtype)
    llm = LLM(engine_model, config=EngineConfig(
        enable_return_routed_experts=True, deterministic=deterministic,
        max_num_seqs=max(64, args.samples)))
    params = [SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.max_tokens,
                             seed=i, ignore_eos=True, return_routed_experts=True)
              for i in range(len(prompts))]
    out = []
    for prompt, result in zip(prompts, llm.generate(prompts, params)):
        for c in result.outputs:
            out.append((prompt, list(c.token_ids), torch.tensor(c.logprobs), c.routed_experts))
    return out


@torch.no_grad()
def measure(trainer, samples, *, replay: bool) -> dict[str, float]:
    disagree = pairs = 0
    diffs, k3 = [], []
    for prompt, completion, sampler_lp, routes in samples:
        ids = torch.tensor([prompt + completion], device=next(trainer.parameters()).device)
        full = torch.cat([routes, routes[-1:]]).int()[None].to(ids.device)  # (1, T, L, k)
        out = trainer.forward_hidden(ids, routed_experts=full if replay else None)
        own = torch.stack([logits.float().topk(routes.shape[-1], dim=-1).indices
                           for logits in out.router_logits], 1)  # (T, L, k)
        differs = (own[:-1].sort(-1).values.cpu() != routes.long().sort(-1).values).any(-1)
        disagree, pairs = disagree + int(differs.sum()), pairs + differs.numel()
        hidden = out.hidden_states[0, len(prompt) - 1:-1]
        lp = ops.fused_linear_logprobs(hidden, trainer.lm_head.weight,
                                       ids[0, len(prompt):]).cpu()
        d = (lp - sampler_lp).double()
        diffs.append(d.abs())
        k3.append(d.exp() - 1 - d)
    diffs, k3 = torch.cat(diffs), torch.cat(k3)
    return {"router_disagreement": disagree / pairs, "abs_diff_mean": float(diffs.mean()),
            "abs_diff_max": float(diffs.max()), "kl_k3": float(k3.mean()),
            "tokens": int(diffs.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = tiny_moe(args.experts, args.top_k, args.layers, args.hidden, args.vocab, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(2, args.vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    trainer = copy.deepcopy(model).to(device)
    rows = []
    bf16 = sample(model, torch.bfloat16, device, prompts, args)
    rows.append(("engine bf16 -> trainer fp32", measure(trainer, bf16, replay=False)))
    rows.append(("engine bf16 -> trainer fp32, R3", measure(trainer, bf16, replay=True)))
    fp32 = sample(model, torch.float32, device, prompts, args)
    rows.append(("engine fp32 batched -> trainer fp32", measure(trainer, fp32, replay=False)))
    rows.append(("engine fp32 batched -> trainer fp32, R3", measure(trainer, fp32, replay=True)))
    one = sample(model, torch.float32, device, prompts, args, deterministic=True)
    rows.append(("engine fp32 one at a time -> trainer fp32", measure(trainer, one,
                                                                      replay=False)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"{args.experts} experts top-{args.top_k}, {args.layers} MoE layers, hidden "
          f"{args.hidden}; {args.prompts}x{args.samples} sequences of {args.max_tokens} "
          f"tokens on {device}; commit {commit}, {datetime.date.today()}")
    print("| sampler -> trainer | router disagreement | mean abs dlogp | max abs dlogp "
          "| KL k3 |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {100 * r['router_disagreement']:.2f} % | {r['abs_diff_mean']:.2e} "
              f"| {r['abs_diff_max']:.2e} | {r['kl_k3']:.2e} |")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"args": vars(args), "commit": commit,
                                                   "rows": dict(rows)}, indent=2))


if __name__ == "__main__":
    main()
