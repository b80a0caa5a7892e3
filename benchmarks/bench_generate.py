"""Batched generation: our ``LLM.generate`` against transformers' ``generate``, same
weights, same greedy tokens, in one run.

    python benchmarks/bench_generate.py --threads 1            # CPU: demo model and H=512 MoE
    python benchmarks/bench_generate.py --models demo --batches 64 --new-tokens 64

For each model and batch N: N random prompts of ``--prompt`` tokens, ``--new-tokens``
generated greedily with ``ignore_eos`` (every sequence runs to the end, so both sides make
the same number of tokens) and, like ``generate``, no log-probs (``logprobs=False``), tokens/s = N · new / wall seconds (best of ``--repeats`` after
one warm-up). "cumulative outputs" is our engine driven as ``LLM.generate`` drove it before
``output_kind="final_only"``: every step reports every advanced request and detokenises
its new token (a byte-level BPE of the model's vocabulary). Ours also reports its decode-step host time: the wall time of decode steps
outside the model runner (scheduling, appending, detokenising, outputs) per decoded token,
µs (``EngineStats.decode_host_us_per_token``). Models: ``demo`` (the demo student:
Qwen3-MoE H=128, 2 layers, 4 experts top-2, V=1024) and ``h512`` (H=512, 4 layers, 8
experts top-2, V=4096), fp32 on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from livethinking.engine import LLM, SamplingParams
from livethinking.model import ModelConfig
from harness import random_model, run_header, sync

SHAPES = {
    "demo": dict(vocab_size=1024, hidden_size=128, intermediate_size=256,
                 moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                 norm_topk_prob=True),
    "h512": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                 moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True),
}


def _byte_bpe(vocab: int):
    """A byte-level BPE of exactly ``vocab`` ids (256 bytes + merges of a made-up corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    words = [f"word{i} thing{i % 97} part{i % 13}" for i in range(4000)]
    raw.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw


def _hf(model):
    import transformers

    config = transformers.AutoConfig.for_model(**model.config.to_dict())
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _cumulative(llm, prompts, params) -> None:
    """What ``LLM.generate`` did before ``final_only``: cumulative outputs every step (the
    text detokenised token by token), the finished ones kept."""
    from dataclasses import replace

    engine, params = llm.engine, replace(params, output_kind="cumulative")
    pending = [(f"c{i}", p) for i, p in enumerate(prompts)]
    done = 0
    while done < len(prompts):
        while pending and engine.has_room():
            engine.add_request(*pending.pop(0), params)
        done += sum(o.finished for o in engine.step())


def bench(name: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    device = torch.device("cpu")
    model = random_model(ModelConfig(**SHAPES[name], max_position_embeddings=1024), device,
                         torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(  # a real detokeniser's cost: byte BPE
        tokenizer_object=_byte_bpe(model.config.vocab_size))
    llm = LLM(model, tokenizer, max_num_seqs=max(64, batch), enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, logprobs=False)
    prompts = ids.tolist()
    with torch.no_grad():
        ours = _best(lambda: llm.generate(prompts, params), repeats)
        cumulative = _best(lambda: _cumulative(llm, prompts, params), repeats)
        before = llm.engine.stats()
        llm.generate(prompts, params)
        after = llm.engine.stats()
        hf = _hf(model)
        mask = torch.ones_like(ids)  # no padding: no token is masked as a pad
        theirs = _best(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False,
                                           pad_token_id=0), repeats)
        mine = llm.generate(prompts[:2], params)
        peer = hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=new,
                           min_new_tokens=new, do_sample=False,
                           pad_token_id=0)[:, prompt:].tolist()
    sync(device)
    steps = after.decode_step_seconds - before.decode_step_seconds
    inside = after.decode_model_seconds - before.decode_model_seconds
    tokens = after.decode_tokens - before.decode_tokens
    same = sum(a.outputs[0].token_ids == b for a, b in zip(mine, peer))
    return {"model": name, "batch": batch, "ours_tok_s": batch * new / ours,
            "cumulative_tok_s": batch * new / cumulative,
            "hf_tok_s": batch * new / theirs, "ratio": theirs / ours,
            "host_us_per_token": 1e6 * (steps - inside) / max(tokens, 1),
            "host_share": (steps - inside) / max(steps, 1e-12), "same_greedy": f"{same}/{len(peer)}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["demo", "h512"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, commit = run_header(torch.device("cpu"))
    print(f"# bench_generate: {device}, commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt}, {args.new_tokens} new "
          f"tokens, greedy")
    print("| model | sequences | ours tok/s | ours, cumulative outputs | transformers tok/s | "
          "ratio | host µs/token | host share | same greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, args.prompt, args.new_tokens, args.repeats)
            print(f"| {name} | {batch} | {r['ours_tok_s']:.0f} | {r['cumulative_tok_s']:.0f} | "
                  f"{r['hf_tok_s']:.0f} | "
                  f"{r['ratio']:.2f}× | {r['host_us_per_token']:.0f} | {r['host_share']:.0%} | "
                  f"{r['same_greedy']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
