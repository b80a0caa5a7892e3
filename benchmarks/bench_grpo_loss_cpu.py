"""The fused GRPO (DAPO) loss on the CPU, side by side in one run: ours, Liger-Kernel's
chunked loss, the naive math and the bare GEMMs, forward + backward, time and peak memory.

    python benchmarks/bench_grpo_loss_cpu.py --threads 1                    # N=4096, H=256 and 64, V=32768
    python benchmarks/bench_grpo_loss_cpu.py --tokens 4096 --hidden 256 --vocab 32768

Inputs as ``bench_grpo_loss.py`` makes them (fp32; completions of 1024 tokens masked after
a random length in [0.8·T, T]; old log-probs = the current ones + N(0, 0.1²); DAPO, ε =
(0.2, 0.28), β = 0). Implementations: ``livethinking`` (``fused_linear_grpo_loss``: the
three-GEMM path, gradients taken in the forward), ``liger`` (``LigerFusedLinearGRPOLoss``,
eager: torch.compile is off on the CPU), ``naive`` (full fp32 logits, log_softmax, gather,
the loss; autograd), ``gemm`` (the floor: hidden @ Wᵀ, then dZ @ W and dZᵀ @ hidden for a
random dZ — the three N·H·V GEMMs any exact method needs). Every implementation is first
held to the naive math (‖a − b‖ / ‖b‖ ≤ 1e-4 on loss, d hidden, d weight) and reported if
off. Time: the best of ``--repeats`` steps after one warm-up. Peak: the extra resident
memory of one step in a fresh child process (VmHWM − VmRSS before it, with
MALLOC_MMAP_THRESHOLD_ so that RSS follows live memory), less the two gradients.
Roofline: 3 · 2·N·H·V FLOPs over the gemm floor's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grpo_loss import BUDGET, build, make_case, mismatch, reference  # noqa: E402

IMPLS = ["livethinking", "liger", "naive", "gemm"]


def _gemm_step(case):
    x = case["hidden"].detach().flatten(0, 1)
    w = case["weight"].detach()
    dz = torch.randn(x.shape[0], w.shape[0])

    def step():
        z = x @ w.T
        del z
        return [None, dz @ w, dz.T @ x]
    return step


def _step(impl, case):
    return _gemm_step(case) if impl == "gemm" else build(impl, case)[1]


def child_peak(impl: str, tokens: int, hidden: int, vocab: int) -> int:
    """Peak resident bytes of one step above those before it, less the gradients."""
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status")
                    if line.startswith(field)) * 1024
    _step(impl, make_case(1024, hidden, vocab, "cpu", torch.float32)[0])()  # load code paths
    step = _step(impl, make_case(tokens, hidden, vocab, "cpu", torch.float32)[0])
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to VmRSS (Linux >= 4.0)
        f.write("5")
    before = status("VmRSS:")
    out = step()
    return status("VmHWM:") - before - 4 * (out[1].numel() + out[2].numel())


def peak(impl, tokens, hidden, vocab, threads) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, __file__, "--child", impl, str(tokens), str(hidden),
                             str(vocab)], env=env, capture_output=True, text=True, timeout=600,
                            check=True)
    return int(result.stdout.split()[-1])


def bench(tokens, hidden, vocab, impls, repeats, threads):
    case, logp = make_case(tokens, hidden, vocab, "cpu", torch.float32)
    expected = reference(case, logp)
    rows = {}
    for impl in impls:
        step = _step(impl, case)
        status = "ok"
        if impl != "gemm":
            err, bad = mismatch(step(), expected, BUDGET[torch.float32])
            status = "ok" if bad is None else f"MISMATCH vs the naive math: {bad}"
        step()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        rows[impl] = dict(s=best, mib=peak(impl, tokens, hidden, vocab, threads) / 2**20,
                          status=status)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 64])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        impl, *sizes = args.child
        print(child_peak(impl, *map(int, sizes)))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import run_header

    device, commit = run_header(torch.device("cpu"))
    print(f"# bench_grpo_loss_cpu: {device}, commit {commit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, V={args.vocab}, fp32, fwd+bwd, best of {args.repeats}")
    print("| N | H | impl | s | × gemm floor | × liger time | peak extra MiB | × liger memory | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for tokens in args.tokens:
        for hidden in args.hidden:
            rows = bench(tokens, hidden, args.vocab, args.impls, args.repeats, args.threads)
            floor, liger = rows.get("gemm"), rows.get("liger")
            for impl, r in rows.items():
                failed |= r["status"] != "ok" and impl == "livethinking"
                print(f"| {tokens} | {hidden} | {impl} | {r['s']:.3f} | "
                      f"{r['s'] / floor['s']:.2f} | " if floor else "- | ", end="")
                print(f"{r['s'] / liger['s']:.2f} | " if liger else "- | ", end="")
                print(f"{r['mib']:.0f} | " + (f"{r['mib'] / liger['mib']:.2f}" if liger else "-")
                      + f" | {r['status']} |", flush=True)
            if floor:
                flops = 3 * 2 * tokens * hidden * args.vocab
                print(f"<!-- roofline N={tokens} H={hidden}: the floor's 3 GEMMs run at "
                      f"{flops / floor['s'] / 1e9:.1f} GFLOP/s -->")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
