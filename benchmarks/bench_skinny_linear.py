"""Decode-shaped GEMMs on the CPU, side by side in one run: the C++ skinny GEMM
(``torch.ops.livethinking.skinny_linear``) against ``F.linear`` (MKL's sgemm), float32.

    python benchmarks/bench_skinny_linear.py --threads 1
    python benchmarks/bench_skinny_linear.py --shapes 1024x512 --rows 1 4 16 64

For each weight shape (out N × in K) and row count M: the median time of one product over a
rotation of distinct weights that together exceed the last-level cache (``--pool-mib``), so
each product streams its weight from memory as at decode. Roofline, per product: the
memory floor is the weight's bytes over the bandwidth of reading the same rotation with one
``sum`` per weight (measured in this run); the compute floor is 2·M·N·K FLOPs over the
skinny kernel's own in-cache rate at M = 64 (measured here too). Every result is first held
to the float64 product (max |error| / (Σ|x||w| · 2^-24) printed).
Shapes: the H=512 model of ``bench_generate.py`` (q/o 512×512, k/v 256×512, expert
gate_up 1024×512 and down 512×512, lm_head 4096×512) and the demo model (H=128).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import livethinking.ops  # noqa: F401  (loads the C++ ops)
from harness import run_header

SHAPES = ["512x512", "256x512", "1024x512", "4096x512", "256x128", "1024x128"]


def _median_time(fn, weights, repeats: int) -> float:
    for w in weights[:2]:
        fn(w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times)


def bench(n: int, k: int, rows: list[int], pool_mib: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    count = max(4, pool_mib * 2**20 // (n * k * 4))
    weights = [torch.randn(n, k, generator=gen) for _ in range(count)]
    read = _median_time(lambda w: w.sum(), weights, repeats)  # s per weight
    bandwidth = n * k * 4 / read
    hot = weights[0]
    x64 = torch.randn(64, k, generator=gen)
    in_cache = _median_time(lambda w: torch.ops.livethinking.skinny_linear(x64, w), [hot] * 20,
                            repeats)
    peak = 2 * 64 * n * k / in_cache  # FLOP/s
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        got = torch.ops.livethinking.skinny_linear(x, hot)
        scale = (x.double().abs() @ hot.double().abs().T) * 2.0**-24
        ulps = ((got.double() - x.double() @ hot.double().T).abs() / scale).max().item()
        ours = _median_time(lambda w: torch.ops.livethinking.skinny_linear(x, w), weights, repeats)
        mkl = _median_time(lambda w: F.linear(x, w), weights, repeats)
        floor = max(n * k * 4 / bandwidth, 2 * m * n * k / peak)
        out.append(dict(shape=f"{n}x{k}", rows=m, ours_us=ours * 1e6, mkl_us=mkl * 1e6,
                        speedup=mkl / ours, floor_us=floor * 1e6, ours_of_floor=floor / ours,
                        mkl_of_floor=floor / mkl, bandwidth=bandwidth / 1e9, peak=peak / 1e9,
                        ulps=ulps))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK weight shapes")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--pool-mib", type=int, default=96, help="weights rotated per shape, MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, commit = run_header(torch.device("cpu"))
    print(f"# bench_skinny_linear: {device}, commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, weights streamed from memory")
    print("| weight N×K | rows | skinny µs | F.linear (MKL) µs | speedup | floor µs | skinny / "
          "floor | MKL / floor | read GB/s | kernel GFLOP/s | max err (ulp of Σ|xw|) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for shape in args.shapes:
            n, k = (int(v) for v in shape.lower().split("x"))
            for r in bench(n, k, args.rows, args.pool_mib, args.repeats):
                print(f"| {r['shape']} | {r['rows']} | {r['ours_us']:.0f} | {r['mkl_us']:.0f} | "
                      f"{r['speedup']:.2f}× | {r['floor_us']:.0f} | {r['ours_of_floor']:.0%} | "
                      f"{r['mkl_of_floor']:.0%} | {r['bandwidth']:.1f} | {r['peak']:.0f} | "
                      f"{r['ulps']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
