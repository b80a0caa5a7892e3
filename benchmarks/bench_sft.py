"""RFT's SFT step: tokens/s, step time, peak memory and MFU (``sft_step`` + ``MasterWeightAdamW``).

    python benchmarks/bench_sft.py --model tiny --steps 2 --threads 1          # CPU smoke
    python benchmarks/bench_sft.py --model 30b-a3b --layers 4 --markdown --out-csv sft.csv

Random weights (std 0.02, norms 1) built on the meta device, materialised on the device in
the dtype. ``tiny``: Qwen3-MoE H=256, 4 layers, 16 experts top-4, I=128, V=4096.
``30b-a3b``: Qwen3-30B-A3B shapes (H=2048, 32/4 heads, head_dim 128, 128 experts top-8,
I=768, V=151936), ``--layers`` of them. Training state is ~20 bytes a parameter
(weight + grad in bf16, fp32 master + its grad + two AdamW moments), so all 48 layers
(~30.5B params, ~610 GB) do not fit one GPU: the script stops early and says how many do.
Examples: random ids, prompt 200–1000 and response 50–500 tokens (uniform; × row_tokens/4096
for shorter rows), packed by ``pack_examples``; each step takes ``--rows-per-step`` new rows.
One untimed warm-up step, then ``--steps`` timed optimizer steps: ``sft_step`` (forward +
backward per row, fused response log-probs, MoE aux loss) + ``optimizer.step()`` (clip,
AdamW on fp32 masters, write-back), synchronised on CUDA.

Model FLOPs of a step (MFU counts these, not gradient checkpointing's recomputation):
    6·N_body·tokens + 6·H·V·loss_tokens + 12·L·n_heads·d_head·Σ_docs D(D+1)/2
N_body = active matmul weights per token: attention projections + router + top_k / E of the
expert weights (+ dense MLPs); no embedding table, no norms. The lm_head (H·V) counts only
on the loss (response) tokens, the only rows ``fused_linear_logprobs`` multiplies. The last
term is QKᵀ and PV (4·n_heads·d_head per query-key pair forward, ×3 with backward) over the
document-causal mask: a document of D tokens has D(D+1)/2 pairs, the full D² halved. Per
token: 6·N_body + 6·H·V·loss_tokens/tokens + 12·L·n_heads·d_head·c, c = Σ D(D+1)/2 / Σ D
(the mean attended context); tokens = packed non-padding tokens. MFU = FLOPs/s ÷
``--peak-tflops`` (CUDA default 989: H100 SXM dense bf16; CPU: "n/a" unless given).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import random
import sys
import time
from pathlib import Path

import torch

from livethinking.model import CausalLM, ModelConfig
from harness import DTYPES, MODELS, random_model, run_header, sync
from livethinking.train.config import OptimConfig
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.packing import pack_examples
from livethinking.train.sft import sft_step

COLUMNS = ["model", "layers", "dtype", "row_tokens", "rows_per_step", "ckpt", "steps", "step_s",
           "resp_tok_s", "tok_s", "gflop_per_tok", "tflop_s", "mfu", "peak_mem_gib"]


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    return random_model(config, device, dtype).train()


def body_params(model: CausalLM) -> float:
    """N_body of the docstring: active matmul weights per token, no embedding / lm_head."""
    share = model.config.num_experts_per_tok / max(1, model.config.num_experts)
    return sum(q.numel() * (share if ".experts." in name else 1)
               for name, q in model.named_parameters()
               if q.dim() > 1 and name not in ("model.embed_tokens.weight", "lm_head.weight"))


def make_rows(vocab: int, row_tokens: int, count: int, seed: int = 0):
    """``count`` packed rows of random examples (ids >= 1: only the padding is 0); the
    emptiest first-fit rows, at the end, are left out."""
    rng, s = random.Random(seed), min(1.0, row_tokens / 4096)
    lo_p, hi_p, lo_r, hi_r = max(2, int(200 * s)), int(1000 * s), max(1, int(50 * s)), int(500 * s)
    examples, target, have = [], 1.3 * count * row_tokens, 0
    while True:
        while have < target:
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(lo_p, hi_p))]
            response = [rng.randrange(1, vocab) for _ in range(rng.randint(lo_r, hi_r))]
            examples.append((prompt, response))
            have += len(prompt) + len(response)
        rows, _ = pack_examples(examples, row_tokens, seed=seed)
        if len(rows) > count:
            return rows[:count]
        target *= 1.2


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="30b-a3b" if cuda else "tiny")
    p.add_argument("--layers", type=int, help="decoder layers (default the preset's: 30b-a3b 48)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--row-tokens", type=int, help="packed row length (GPU 4096, CPU 512)")
    p.add_argument("--rows-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 1 warm-up)")
    p.add_argument("--peak-tflops", type=float, help="peak (CUDA default 989: H100 SXM bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-aux-loss", action="store_true", help="leave out the MoE balance loss")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out-csv", type=Path, help="CSV file to append the row to")
    p.add_argument("--markdown", action="store_true", help="print a table for RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    row_tokens = args.row_tokens or (4096 if gpu else 512)
    peak = args.peak_tflops or (989.0 if gpu else None)
    config = ModelConfig(**MODELS[args.model] | ({"num_hidden_layers": args.layers}
                                                  if args.layers else {}))
    with torch.device("meta"):
        meta = CausalLM(config)
    n_params = sum(q.numel() for q in meta.parameters())
    per_param = 16 + (2 * dtype.itemsize if dtype != torch.float32 else 0)  # bytes, see above
    mem = torch.cuda.get_device_properties(device).total_memory if gpu else float("inf")
    if n_params * per_param > mem:
        layer = sum(q.numel() for q in meta.model.layers[0].parameters()) * per_param
        fit = int((0.85 * mem - (n_params * per_param - layer * config.num_hidden_layers)) // layer)
        sys.exit(f"{n_params / 1e9:.1f}B params need ~{n_params * per_param / 1e9:.0f} GB of "
                 f"weights, grads and AdamW state (> this GPU): try --layers {max(1, fit)}")

    model = build_model(config, device, dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    optimizer = MasterWeightAdamW(model.parameters(), OptimConfig(lr=1e-5), args.steps + 1)
    rows = make_rows(config.vocab_size, row_tokens, (args.steps + 1) * args.rows_per_step)
    batches = [rows[i:i + args.rows_per_step] for i in range(0, len(rows), args.rows_per_step)]
    n_body, head = body_params(model), config.hidden_size * config.vocab_size
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    tokens = loss_tokens = pairs = seconds = 0
    losses = []  # of the timed steps
    for i, batch in enumerate(batches):  # batch 0: the warm-up
        sync(device)
        start = time.perf_counter()
        stats = sft_step(model, batch, device, aux_loss=not args.no_aux_loss)
        optimizer.step()
        sync(device)
        if i:
            seconds += time.perf_counter() - start
            losses.append(stats["loss"])
            for r in batch:
                docs = (r.cu_seqlens[1:] - r.cu_seqlens[:-1]).tolist()
                if not r.input_ids[int(r.cu_seqlens[-2]):].any():
                    docs = docs[:-1]  # the padding "document" (ids 0) is not counted
                tokens += sum(docs)
                pairs += sum(d * (d + 1) // 2 for d in docs)
                loss_tokens += r.num_loss_tokens
    flops = 6 * n_body * tokens + 6 * head * loss_tokens + attn * pairs
    achieved = flops / seconds
    (name, commit), today = run_header(device), datetime.date.today().isoformat()
    print(f"# bench_sft: {name}; {today}; commit {commit}; torch {torch.__version__}")
    print(f"model {args.model}: {config.num_hidden_layers} layers, H={config.hidden_size}, "
          f"E={config.num_experts} top-{config.num_experts_per_tok}, "
          f"I={config.moe_intermediate_size}, V={config.vocab_size}, {str(dtype)[6:]}, "
          f"{n_params / 1e9:.3f}B params "
          f"({n_body / 1e6:.1f}M active body); {args.steps} timed steps after 1 warm-up; "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    fill = tokens / (args.steps * args.rows_per_step * row_tokens)
    print(f"FLOPs per token: 6*N_body {6 * n_body / 1e9:.4f} G + lm_head 6*H*V x loss share "
          f"{loss_tokens / tokens:.3f} = {6 * head * loss_tokens / tokens / 1e9:.4f} G + attention "
          f"12*L*heads*d*c (c = {pairs / tokens:.1f}) {attn * pairs / tokens / 1e9:.4f} G = "
          f"{flops / tokens / 1e9:.4f} GFLOP/token; rows {fill:.1%} non-padding")
    result = dict(model=args.model, layers=config.num_hidden_layers, dtype=str(dtype)[6:],
                  row_tokens=row_tokens, rows_per_step=args.rows_per_step,
                  ckpt="on" if args.gradient_checkpointing else "off", steps=args.steps,
                  step_s=f"{seconds / args.steps:.3f}", resp_tok_s=f"{loss_tokens / seconds:.0f}",
                  tok_s=f"{tokens / seconds:.0f}", gflop_per_tok=f"{flops / tokens / 1e9:.4f}",
                  tflop_s=f"{achieved / 1e12:.3f}",
                  mfu=f"{100 * achieved / (peak * 1e12):.1f}% of {peak:g}" if peak else "n/a",
                  peak_mem_gib=f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                  if gpu else "n/a")
    print("  " + "  ".join(f"{c}={result[c]}" for c in COLUMNS))
    if args.markdown:
        print(f"\n| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}")
        print(f"| {' | '.join(str(result[c]) for c in COLUMNS)} |\n")
    if args.out_csv:
        new_file = not args.out_csv.exists()
        with args.out_csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["device", "date", "commit", "torch", *COLUMNS])
            if new_file:
                writer.writeheader()
            writer.writerow(dict(result, device=name, date=today, commit=commit,
                                 torch=torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
