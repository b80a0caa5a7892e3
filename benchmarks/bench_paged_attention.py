"""CPU decode attention over the paged KV pool, side by side in one run: the C++ op
(``torch.ops.livethinking.paged_decode_attention``, read in place) against PyTorch's gather
of each row's blocks + ``scaled_dot_product_attention`` (``use_kernel=False``), float32.

    python benchmarks/bench_paged_attention.py --threads 1
    python benchmarks/bench_paged_attention.py --shapes demo --rows 256 --context 64

For each head shape and row count: one query per row over ``--context`` tokens (each row
0-15 fewer), the rows' blocks scattered at random through the pool, the median time of one
call over a rotation of distinct pools that together exceed the last-level cache
(``--pool-mib``), so each call reads its keys and values from memory as a decode step
does (``warm``: one pool, in cache). Roofline: the keys' and values' bytes over the read
bandwidth of one ``sum`` per pool of the same rotation (measured in this run). Each result
is first held to a float64 reference (max |error| printed).
Shapes: ``demo`` (4 query / 2 kv heads, head_dim 32), ``h512`` (8 / 4, 64), the H=512 model
of ``bench_generate.py``; ``30b`` (32 / 4, 128), Qwen3-30B-A3B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from livethinking import ops
from harness import run_header

SHAPES = {"demo": (4, 2, 32), "h512": (8, 4, 64), "30b": (32, 4, 128)}
BLOCK = 16


def _inputs(rows: int, heads: int, kv: int, dim: int, context: int, pools: int, gen):
    per = -(-context // BLOCK)
    blocks = rows * per + 1
    kv_pools = [(torch.randn(blocks, BLOCK, kv, dim, generator=gen),
                 torch.randn(blocks, BLOCK, kv, dim, generator=gen)) for _ in range(pools)]
    tables = torch.randperm(blocks, generator=gen)[:rows * per].view(rows, per)
    lens = context - torch.randint(0, min(BLOCK, context), (rows,), generator=gen)
    q = torch.randn(rows, heads, dim, generator=gen)
    return q, kv_pools, tables, lens


def _reference(q, k_pool, v_pool, tables, lens) -> torch.Tensor:
    rows, heads, dim = q.shape
    kv = k_pool.shape[2]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        slots = [int(tables[r, s // BLOCK]) * BLOCK + s % BLOCK for s in range(int(lens[r]))]
        k = k_pool.reshape(-1, kv, dim)[slots].double().repeat_interleave(heads // kv, 1)
        v = v_pool.reshape(-1, kv, dim)[slots].double().repeat_interleave(heads // kv, 1)
        scores = torch.einsum("hd,shd->hs", q[r].double(), k) * dim ** -0.5
        out[r] = torch.einsum("hs,shd->hd", scores.softmax(-1), v)
    return out


def _median(fn, kv_pools, repeats: int) -> float:
    for k, v in kv_pools[:2]:
        fn(k, v)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in kv_pools:
            fn(k, v)
        times.append((time.perf_counter() - start) / len(kv_pools))
    return statistics.median(times)


def bench(shape: str, rows: int, context: int, pool_mib: int, repeats: int, warm: bool) -> dict:
    heads, kv, dim = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    one_pool = 2 * (rows * -(-context // BLOCK) + 1) * BLOCK * kv * dim * 4
    pools = 1 if warm else max(2, -(-pool_mib * 2 ** 20 // one_pool))
    q, kv_pools, tables, lens = _inputs(rows, heads, kv, dim, context, pools, gen)

    def ours(k, v):
        return ops.paged_decode_attention(q, k, v, tables, lens)

    def torch_path(k, v):
        return ops.paged_decode_attention(q, k, v, tables, lens, use_kernel=False)

    want = _reference(q, *kv_pools[0], tables, lens)
    errors = {name: float((fn(*kv_pools[0]).double() - want).abs().max())
              for name, fn in (("ours", ours), ("torch", torch_path))}
    t_ours = _median(ours, kv_pools, repeats)
    t_torch = _median(torch_path, kv_pools, repeats)
    t_read = _median(lambda k, v: (k.sum(), v.sum()), kv_pools, repeats)
    read_bw = 2 * kv_pools[0][0].numel() * 4 / t_read  # bytes/s of a plain read of a pool
    needed = 2 * float(lens.sum()) * kv * dim * 4  # the keys and values the rows attend to
    floor = needed / read_bw
    return {"shape": shape, "rows": rows, "context": context, "ours_us": 1e6 * t_ours,
            "torch_us": 1e6 * t_torch, "speedup": t_torch / t_ours, "floor_us": 1e6 * floor,
            "of_floor": floor / t_ours, "read_gb_s": read_bw / 1e9, **{f"err_{k}": v for k, v in errors.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "h512", "30b"])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[64, 512])
    p.add_argument("--pool-mib", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warm", action="store_true", help="one pool, read from cache")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, commit = run_header(torch.device("cpu"))
    print(f"# bench_paged_attention: {device}, commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, block {BLOCK}, "
          f"{'warm (one pool)' if args.warm else f'pools rotating through {args.pool_mib} MiB'}")
    print("| shape | rows | context | ours µs | gather + SDPA µs | speedup | floor µs | "
          "ours / floor | read GB/s | max err ours / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for context in args.context:
            for rows in args.rows:
                r = bench(shape, rows, context, args.pool_mib, args.repeats, args.warm)
                print(f"| {shape} | {rows} | {context} | {r['ours_us']:.0f} | {r['torch_us']:.0f} | "
                      f"{r['speedup']:.2f}× | {r['floor_us']:.0f} | {r['of_floor']:.0%} | "
                      f"{r['read_gb_s']:.1f} | {r['err_ours']:.1e} / {r['err_torch']:.1e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
