"""Time to first token and decode tokens/s of the inference engine (``LLMEngine``).

    python benchmarks/bench_ttft.py --model tiny --quick --markdown        # CPU smoke, < 2 min
    python benchmarks/bench_ttft.py --model 30b-a3b --layers 48 --out-csv ttft.csv --markdown

Random weights (std 0.02, norms 1) built on the meta device and materialised on the target
device in the target dtype, so no CPU copy. ``tiny``: Qwen3-MoE H=256, 4 layers, 16 experts
top-4, I=128, V=4096 (fp32 on CPU). ``30b-a3b``: Qwen3-30B-A3B shapes (H=2048, 32/4 heads,
head_dim 128, 128 experts top-8, I=768, V=151936; bf16 on CUDA), ``--layers`` of them.
Prompts are random token ids; sampling is greedy with ``ignore_eos``.

Scenarios (each run once untimed first: Triton compiles, allocator, then ``--repeats`` timed):
- prompt: one request of L prompt tokens, ``--new-tokens`` out, for each L;
- concurrency: N requests of ``--conc-prompt`` tokens added with one common arrival time;
- prefix: a shared context of C tokens + a 64-token question. After ``reset_prefix_cache``
  one cold request, then ``--warm-requests`` requests (one at a time) with other questions
  over the same context; hit tokens = growth of ``stats().prefix_cache_hit_tokens``;
- decode: one request of 128 prompt tokens, ``--decode-tokens`` out (single stream).
TTFT = ``first_token_time - arrival_time``, the engine's own ``perf_counter`` stamps (the
first token is copied to the host in that step, so the GPU work is done by then). Decode
tokens/s = tokens of the decode-only engine steps / their wall time (a step ends with the
host copy of the sampled tokens: no extra synchronisation is needed), summed over requests.
p99 of a handful of samples is their maximum; ``n`` says how many there were.

Roofline (decode, batch 1): bytes read per token = every weight but the embedding table
(attention, norms, router, lm_head) + top_k / E of the expert weights + the KV of the
context; tokens/s ≤ HBM bandwidth (3.35 TB/s, H100 SXM) / those bytes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

from livethinking.engine import EngineConfig, LLMEngine, SamplingParams
from livethinking.model import CausalLM, ModelConfig
from harness import DTYPES, MODELS, random_model, run_header, sync

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
COLUMNS = ["scenario", "prompt", "concurrency", "n", "ttft_p50_ms", "ttft_p99_ms",
           "decode_tok_s", "cached_tokens"]


def build_model(name: str, layers: int | None, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A random-weight model of preset ``name`` (``layers`` overrides its depth), eval mode."""
    shape = dict(MODELS[name], **({"num_hidden_layers": layers} if layers else {}))
    return random_model(ModelConfig(**shape), device, dtype).eval()


def roofline(model: CausalLM, context: int) -> tuple[float, float]:
    """(bytes read per decoded token at batch 1, HBM-bound tokens/s) as in the docstring."""
    mc, total = model.config, 0.0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if name == "model.embed_tokens.weight":
            nbytes = mc.hidden_size * param.element_size()  # one row
        elif ".experts." in name:
            nbytes *= mc.num_experts_per_tok / mc.num_experts
        total += nbytes
    itemsize = next(model.parameters()).element_size()
    total += 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize * context
    return total, HBM_BYTES_PER_S / total


class Bench:
    def __init__(self, engine: LLMEngine, vocab: int, device: torch.device, seed: int = 1):
        self.engine, self.vocab, self.device = engine, vocab, device
        self.gen = torch.Generator().manual_seed(seed)
        self.ids = 0

    def tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()

    def run(self, prompts: list[list[int]], max_tokens: int):
        """Add every prompt with one arrival time, step to completion: (outputs, decode
        tokens, decode seconds)."""
        engine = self.engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=False)
        sync(self.device)
        arrival, names = time.perf_counter(), []
        for prompt in prompts:
            names.append(f"bench-{self.ids}")
            self.ids += 1
            engine.add_request(names[-1], prompt, params, arrival_time=arrival)
        finished, dec_tokens, dec_seconds = {}, 0, 0.0
        while engine.has_unfinished_requests():
            before, start = engine.decode_tokens, time.perf_counter()
            outputs = engine.step()
            if engine.decode_tokens > before:
                dec_seconds += time.perf_counter() - start
                dec_tokens += engine.decode_tokens - before
            finished.update((o.request_id, o) for o in outputs if o.finished)
        return [finished[n] for n in names], dec_tokens, dec_seconds


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def row(scenario, prompt, concurrency, ttfts, dec_tokens, dec_seconds, cached=""):
    return dict(scenario=scenario, prompt=prompt, concurrency=concurrency, n=len(ttfts),
                ttft_p50_ms=f"{1e3 * percentile(ttfts, 50):.1f}",
                ttft_p99_ms=f"{1e3 * percentile(ttfts, 99):.1f}",
                decode_tok_s=f"{dec_tokens / dec_seconds:.1f}" if dec_seconds else "-",
                cached_tokens=cached)


def repeated(bench: Bench, repeats: int, make_prompts, max_tokens: int):
    """One untimed run, then ``repeats`` timed: (TTFTs, decode tokens, decode seconds)."""
    ttfts, tokens, seconds = [], 0, 0.0
    for r in range(repeats + 1):
        outputs, t, s = bench.run(make_prompts(), max_tokens)
        if r:
            ttfts += [o.ttft for o in outputs]
            tokens, seconds = tokens + t, seconds + s
    return ttfts, tokens, seconds


def prefix_scenario(bench: Bench, repeats: int, context: int, question: int, warm: int):
    """Cold vs warm TTFT over a shared context; rows for both."""
    engine, cold, hot, hits, cached, cold_cached = bench.engine, [], [], 0, [], 0
    for r in range(repeats + 1):
        ctx = bench.tokens(context)
        engine.reset_prefix_cache()
        (first,), _, _ = bench.run([ctx + bench.tokens(question)], 1)
        before = engine.stats().prefix_cache_hit_tokens
        later = [bench.run([ctx + bench.tokens(question)], 1)[0][0] for _ in range(warm)]
        if r:
            cold.append(first.ttft)
            cold_cached = max(cold_cached, first.num_cached_tokens)
            hot += [o.ttft for o in later]
            hits += engine.stats().prefix_cache_hit_tokens - before
            cached += [o.num_cached_tokens for o in later]
    per_req = hits / max(1, len(cached))
    return [row("prefix cold", context + question, 1, cold, 0, 0.0, str(cold_cached)),
            row("prefix warm", context + question, 1, hot, 0, 0.0,
                f"{per_req:.0f}/req (stats), min {min(cached)} (output)")]


def transformers_rows(model: CausalLM, lens: list[int], decode_new: int, repeats: int,
                      device: torch.device) -> list[dict]:
    """The peer on the same weights: transformers' ``generate`` (greedy, static cache off).
    TTFT = one call with max_new_tokens=1; decode tok/s = (N − 1) / (t(N) − t(1))."""
    import transformers

    config = transformers.AutoConfig.for_model(**model.config.to_dict())
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(2)

    def timed(length: int, new: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(device)
        sync(device)
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        for length in lens:
            timed(length, 1)  # warm-up
            rows.append(row("prompt (transformers)", length, 1,
                            [timed(length, 1) for _ in range(repeats)], 0, 0.0))
        timed(128, decode_new)
        firsts = [timed(128, 1) for _ in range(repeats)]
        full = [timed(128, decode_new) for _ in range(repeats)]
        rows.append(row("decode (transformers)", 128, 1, firsts, (decode_new - 1) * repeats,
                        sum(full) - sum(firsts)))
    return rows


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="30b-a3b" if cuda else "tiny")
    p.add_argument("--layers", type=int, help="decoder layers (30b-a3b: 48; fewer if memory demands)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (--quick: 2)")
    p.add_argument("--quick", action="store_true", help="short lists, few tokens (smoke test)")
    p.add_argument("--prompt-lens", type=int, nargs="+")
    p.add_argument("--concurrency", type=int, nargs="+")
    p.add_argument("--conc-prompt", type=int, help="prompt tokens per concurrent request")
    p.add_argument("--context", type=int, help="shared prefix tokens (GPU 2048, CPU 512)")
    p.add_argument("--question", type=int, default=64)
    p.add_argument("--warm-requests", type=int, default=4)
    p.add_argument("--new-tokens", type=int, help="output tokens per request, prompt/concurrency")
    p.add_argument("--decode-tokens", type=int, help="output tokens of the single-stream run")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--out-csv", type=Path, help="CSV file to append rows to (keyed by device)")
    p.add_argument("--markdown", action="store_true", help="print a table for RESULTS.md")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time transformers' generate on the same weights (the peer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    q = args.quick
    lens = args.prompt_lens or ([128, 512] if q else [128, 512, 1024, 2048, 4096, 8192] if gpu
                                else [128, 512, 1024, 2048])
    concs = args.concurrency or ([1, 4, 16] if q and not gpu else [1, 4, 16, 64])
    conc_prompt = args.conc_prompt or (512 if gpu and not q else 128)
    context = args.context or (2048 if gpu else 512)
    new = args.new_tokens or (8 if q else 32)
    decode_new = args.decode_tokens or (32 if q else 128)
    repeats = 2 if q and args.repeats == 3 else args.repeats

    model = build_model(args.model, args.layers, device, dtype)
    longest = max(lens + [conc_prompt, context + args.question, 128]) + max(new, decode_new)
    max_len = -(-(longest + 1) // args.block_size) * args.block_size
    # GPU: the engine sizes the pool from free memory; CPU: room for the widest batch plus
    # three longest sequences (the prompt, the cached prefix), not the 1 GiB default
    per_conc = -(-(conc_prompt + new) // args.block_size) + 1
    cpu_blocks = max(concs) * per_conc + 3 * max_len // args.block_size
    cfg = EngineConfig(block_size=args.block_size, max_num_seqs=max(64, *concs),
                       max_num_batched_tokens=args.max_batched_tokens, max_model_len=max_len,
                       enforce_eager=args.enforce_eager, num_kv_blocks=None if gpu else cpu_blocks)
    t0 = time.perf_counter()
    engine = LLMEngine(model, None, cfg)
    sync(device)
    setup_s = time.perf_counter() - t0
    bench = Bench(engine, model.config.vocab_size, device)
    name, commit = run_header(device)
    mc = model.config
    print(f"# bench_ttft: {name}; {datetime.date.today().isoformat()}; commit {commit}; "
          f"torch {torch.__version__}")
    print(f"model {args.model}: {mc.num_hidden_layers} layers, H={mc.hidden_size}, "
          f"E={mc.num_experts} top-{mc.num_experts_per_tok}, I={mc.moe_intermediate_size}, "
          f"V={mc.vocab_size}, {str(dtype).removeprefix('torch.')}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params; engine: block "
          f"{args.block_size}, {engine.runner.cache.num_blocks} KV blocks, max_model_len "
          f"{max_len}, CUDA graphs {sorted(engine.runner.graphs) or 'off'} "
          f"(set-up {setup_s:.1f} s); repeats {repeats} after 1 warm-up", flush=True)

    rows = []

    def add(*new_rows):
        for r in new_rows:
            rows.append(r)
            print("  " + "  ".join(f"{c}={r[c]}" for c in COLUMNS), flush=True)

    for length in lens:
        add(row("prompt", length, 1, *repeated(bench, repeats, lambda: [bench.tokens(length)], new)))
    for n in concs:
        add(row("concurrency", conc_prompt, n, *repeated(
            bench, repeats, lambda: [bench.tokens(conc_prompt) for _ in range(n)], new)))
    add(*prefix_scenario(bench, repeats, context, args.question, args.warm_requests))
    add(row("decode", 128, 1, *repeated(bench, repeats, lambda: [bench.tokens(128)], decode_new)))
    if args.vs_transformers:
        add(*transformers_rows(model, lens, decode_new, repeats, device))
    stats = engine.stats()
    print(f"engine stats: prefill {stats.prefill_tokens} tokens, decode {stats.decode_tokens}, "
          f"prefix hit rate {stats.prefix_cache_hit_rate:.1%}, preemptions {stats.num_preemptions}")

    per_token, bound = roofline(model, 128 + decode_new // 2)
    measured = float(next(r for r in rows if r["scenario"] == "decode")["decode_tok_s"])
    note = (f"Decode roofline (batch 1, context ~{128 + decode_new // 2}): "
            f"{per_token / 1e9:.3f} GB read per token (attention, norms, router, lm_head, "
            f"{mc.num_experts_per_tok}/{mc.num_experts} of the experts, KV) -> at most "
            f"{bound:,.0f} tok/s at {HBM_BYTES_PER_S / 1e12:.2f} TB/s (H100 HBM); measured "
            f"{measured:,.1f} tok/s = {100 * measured / bound:.2g}% of that bound"
            + ("" if gpu else " (CPU run: the H100 bound is for reference only)"))
    if args.markdown:
        print(f"\n| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}")
        for r in rows:
            print(f"| {' | '.join(str(r[c]) for c in COLUMNS)} |")
        print()
    print(note)
    if args.out_csv:
        fields = ["device", "date", "commit", "torch", "model", "layers", "dtype", *COLUMNS]
        new_file = not args.out_csv.exists()
        with args.out_csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new_file:
                writer.writeheader()
            for r in rows:
                writer.writerow(dict(r, device=name, date=datetime.date.today().isoformat(),
                                     commit=commit, torch=torch.__version__, model=args.model,
                                     layers=mc.num_hidden_layers, dtype=str(dtype)[6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
