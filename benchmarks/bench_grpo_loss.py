"""The fused GRPO (DAPO) loss from hidden states against its peers: time and peak memory.

    pytest benchmarks/bench_grpo_loss.py                 # CPU fp32 cases; the CUDA cases where a GPU exists
    python benchmarks/bench_grpo_loss.py --out grpo.csv  # GPU: do_bench medians, peak memory, CSV rows

GPU: N tokens = B completions × T = 1024, each masked after a random length in [0.8·T, T]; H = 4096, V =
151936; bf16 hidden ~ N(0, 1), lm_head ~ N(0, 0.02²); old log-probs = the current ones + N(0, 0.1²);
DAPO, ε = (0.2, 0.28), β = 0. Ours: livethinking.ops.fused_linear_grpo_loss. Peers: naive (bf16 logits →
.float() → log_softmax → gather → dapo_loss), liger (LigerFusedLinearGRPOLoss, compiled on CUDA; its forward
runs the backward too), gemm (the floor, over all N rows: hidden @ Wᵀ, then dZ @ W and dZᵀ @ hidden for
a random dZ; fwd+bwd timed as two halves in script mode so that the (N, V) output and dZ never coexist).
Mode logp: fused_linear_logprobs under no_grad against the one GEMM. x_gemm = time / the floor's.
peak_extra = max_memory_allocated over one call after a reset − what was allocated before − the
gradients of hidden and weight (dZ counts as extra). Before timing every implementation is held to the
naive math (run 8 sequences at a time so that it fits at every N): ‖a − b‖ / ‖b‖ ≤ 1e-2 on loss, d
hidden, d weight. Ours off budget is reported loudly and not timed; a peer, loudly and timed. Naive is
skipped where its estimated peak (12·N·V bytes) exceeds free memory; out of memory is reported as "OOM".

CPU (pytest): N ∈ {1024, 4096}, H = 64, V = 32000, fp32, forward + backward, ours (chunked PyTorch) and
naive; extra_info gets the peak extra RSS of one step (VmHWM − VmRSS in a fresh child process,
MALLOC_MMAP_THRESHOLD_ so that RSS follows live memory; gradients subtracted).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HIDDEN, VOCAB, SEQ_LEN = 4096, 151936, 1024
TOKENS = [8192, 32768, 131072]
CPU_TOKENS, CPU_HIDDEN, CPU_VOCAB = [1024, 4096], 64, 32000
EPS_LOW, EPS_HIGH = 0.2, 0.28
IMPLS = ["livethinking", "naive", "liger"]
BUDGET = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
CASE_KEYS = ["hidden", "weight", "targets", "mask", "advantages", "old"]
REF_BLOCK = 8 * SEQ_LEN  # rows per block of the naive reference
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda"


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


# ----------------------------------------------------------------------------- the naive math


def naive_logprobs(hidden, weight, targets):
    """(N,) fp32 log-probs of targets: logits in the input dtype, then fp32 log_softmax."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def dapo_loss(logp, old, advantages, mask):
    """Σ_masked −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) / masked count, r = exp(logp − old)."""
    ratio = torch.exp(logp - old)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def naive_loss(hidden, weight, targets, mask, advantages, old):
    logp = naive_logprobs(hidden.flatten(0, 1), weight, targets.flatten()).view(targets.shape)
    return dapo_loss(logp, old, advantages, mask)


def reference(case, logp):
    """[loss, d hidden, d weight (fp32 sum over blocks)] of the naive math, REF_BLOCK rows at a time."""
    x2, targets = case["hidden"].detach().flatten(0, 1), case["targets"].flatten()
    w = case["weight"].detach().requires_grad_()
    lp = logp.clone().requires_grad_()
    loss = dapo_loss(lp, case["old"], case["advantages"], case["mask"])
    grad_logp = torch.autograd.grad(loss, lp)[0].flatten()
    dx, dw = torch.empty_like(x2), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for i in range(0, x2.shape[0], REF_BLOCK):
        xi = x2[i:i + REF_BLOCK].detach().requires_grad_()
        logp_i = naive_logprobs(xi, w, targets[i:i + REF_BLOCK])
        dx[i:i + REF_BLOCK], gw = torch.autograd.grad(logp_i, [xi, w], grad_logp[i:i + REF_BLOCK])
        dw += gw
    return [loss.detach(), dx.view(case["hidden"].shape), dw]


def make_case(tokens, hidden, vocab, device, dtype, seed=0):
    """(inputs of the loss, the naive log-probs (B, T)); hidden and weight require grad."""
    gen = torch.Generator(device).manual_seed(seed)
    batch = tokens // SEQ_LEN
    x = torch.randn(batch, SEQ_LEN, hidden, generator=gen, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype).mul_(0.02)
    targets = torch.randint(0, vocab, (batch, SEQ_LEN), generator=gen, device=device)
    lengths = torch.randint(int(0.8 * SEQ_LEN), SEQ_LEN + 1, (batch, 1), generator=gen, device=device)
    x2, flat = x.flatten(0, 1), targets.flatten()
    with torch.no_grad():
        logp = torch.cat([naive_logprobs(x2[i:i + REF_BLOCK], w, flat[i:i + REF_BLOCK])
                          for i in range(0, tokens, REF_BLOCK)]).view(batch, SEQ_LEN)
    return dict(hidden=x.requires_grad_(), weight=w.requires_grad_(), targets=targets,
                mask=torch.arange(SEQ_LEN, device=device) < lengths,
                advantages=torch.randn(batch, generator=gen, device=device),
                old=logp + 0.1 * torch.randn(batch, SEQ_LEN, generator=gen, device=device)), logp


def build(impl, case):
    """(forward() → loss, step() → [loss, d hidden, d weight]) of one implementation."""
    x, w, targets, mask, adv, old = (case[k] for k in CASE_KEYS)
    if impl == "livethinking":
        from livethinking.ops import fused_linear_grpo_loss
        forward = lambda: fused_linear_grpo_loss(  # noqa: E731
            x, w, targets, mask, adv, old_logprobs=old, beta=0.0, epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH, loss_type="dapo")[0]
    elif impl == "naive":
        forward = lambda: naive_loss(x, w, targets, mask, adv, old)  # noqa: E731
    elif impl == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"liger_kernel not importable: {exc!r}") from exc
        module = LigerFusedLinearGRPOLoss(beta=0.0, compiled=x.is_cuda, use_ref_model=False, loss_type="dapo",
                                          epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
        mask_f = mask.float()
        forward = lambda: module(x, w, targets, mask_f, adv, old_per_token_logps=old)[0]  # noqa: E731
    else:
        raise ValueError(f"unknown implementation {impl!r}")

    def step():
        loss = forward()
        return [loss.detach(), *torch.autograd.grad(loss, [x, w])]
    return forward, step


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def mismatch(got, expected, budget):
    """(largest relative error, None or what is over budget)."""
    errors = dict(zip(["loss", "d_hidden", "d_weight"], (rel_err(a, b) for a, b in zip(got, expected))))
    bad = ", ".join(f"{k}: {e:.2e}" for k, e in errors.items() if not e <= budget)  # NaN fails too
    return max(errors.values()), (f"{bad} > {budget:g}" if bad else None)


# ----------------------------------------------------------------------------- GPU cases


@functools.lru_cache(maxsize=1)
def gpu_case(tokens):
    torch.cuda.empty_cache()
    case, logp = make_case(tokens, HIDDEN, VOCAB, DEVICE, torch.bfloat16)
    return case, logp, reference(case, logp)


def peak_extra(fn, held=0):
    """Peak bytes allocated during one fn() above those allocated before, less `held` (kept outputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base - held


def prepare(mode, tokens, impl, split_floor=False):
    """(timed callable, bytes it keeps that are not extra, rel. error, None or what is off budget).
    split_floor: the floor's fwd+bwd callable runs the backward GEMMs only (the caller adds the forward)."""
    case, logp, ref = gpu_case(tokens)
    torch.cuda.empty_cache()
    x2, targets, w = case["hidden"].detach().flatten(0, 1), case["targets"].flatten(), case["weight"].detach()
    grads = 2 * (x2.numel() + w.numel())  # bf16 d hidden and d weight
    if impl == "gemm":
        if mode != "fwd+bwd":
            return (lambda: x2 @ w.T), 0, None, None
        dz = torch.randn(tokens, VOCAB, device=DEVICE, dtype=torch.bfloat16)
        backward = lambda: (dz @ w, dz.T @ x2)  # noqa: E731
        call = backward if split_floor else lambda: (x2 @ w.T, *backward())
        return call, grads - dz.nbytes, None, None  # dZ, the logits' gradient, counts as extra
    if mode == "logp":
        if impl != "livethinking":
            raise Unavailable(f"forward-only log-probs: livethinking and gemm only, not {impl}")
        from livethinking.ops import fused_linear_logprobs
        fn = torch.no_grad()(lambda: fused_linear_logprobs(x2, w, targets))
        err = rel_err(fn(), logp.flatten())
        return fn, 0, err, None if err <= BUDGET[torch.bfloat16] else f"logp: {err:.2e} > 1e-2"
    need, free = 12 * tokens * VOCAB, torch.cuda.mem_get_info()[0]
    if impl == "naive" and need > free:
        raise Unavailable(f"naive needs ~{need / 2**30:.0f} GiB (12·N·V bytes), {free / 2**30:.0f} GiB free")
    forward, step = build(impl, case)
    try:
        got = step()
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run here)
        if impl == "livethinking" or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        raise Unavailable(f"{impl} failed: {type(exc).__name__}: {exc}") from exc
    err, bad = mismatch(got, ref, BUDGET[torch.bfloat16])
    del got
    return (forward, 0, err, bad) if mode == "fwd" else (step, grads, err, bad)


def plan(impls=IMPLS):
    """(mode, impl) of one N, the floor first."""
    return ([("fwd", "gemm"), ("fwd+bwd", "gemm")] + [(m, i) for i in impls for m in ("fwd", "fwd+bwd")]
            + [("logp", "gemm"), ("logp", "livethinking")])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode,tokens,impl", [pytest.param(m, n, i, id=f"{m}-N{n}-{i}")
                                              for n in TOKENS for m, i in plan()])
def test_cuda(benchmark, mode, tokens, impl):
    try:
        call, held, err, bad = prepare(mode, tokens, impl)
        memory = peak_extra(call, held)
    except Unavailable as exc:
        pytest.skip(str(exc))
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"OOM ({impl} {mode} N={tokens})")
    if bad and impl == "livethinking":
        pytest.fail(f"MISMATCH livethinking vs the naive math at N={tokens}: {bad}")
    benchmark.extra_info.update(peak_extra_gib=round(memory / 2**30, 3), rel_err=err, mismatch=bad)
    benchmark.group = f"grpo_loss {mode} cuda N={tokens} H={HIDDEN} V={VOCAB} bf16"
    benchmark(lambda: (call(), torch.cuda.synchronize()))


# ----------------------------------------------------------------------------- CPU cases


@functools.lru_cache(maxsize=2)
def cpu_case(tokens):
    case, logp = make_case(tokens, CPU_HIDDEN, CPU_VOCAB, "cpu", torch.float32)
    return case, reference(case, logp)


def cpu_peak_child(impl, tokens) -> int:
    """Peak resident bytes of one step above those before it, less the gradients (run in a fresh process)."""
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024
    build(impl, make_case(SEQ_LEN, CPU_HIDDEN, CPU_VOCAB, "cpu", torch.float32)[0])[1]()  # load code paths
    step = build(impl, make_case(tokens, CPU_HIDDEN, CPU_VOCAB, "cpu", torch.float32)[0])[1]
    try:  # reset VmHWM to VmRSS (Linux ≥ 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS:")
    out = step()
    return status("VmHWM:") - before - 4 * (out[1].numel() + out[2].numel())


def cpu_peak_extra(impl, tokens) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks ≥ 128 KiB go back to the OS
    result = subprocess.run([sys.executable, __file__, "--cpu-peak", impl, str(tokens)], env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.parametrize("tokens", CPU_TOKENS)
@pytest.mark.parametrize("impl", ["livethinking", "naive"])
def test_cpu(benchmark, impl, tokens):
    step = build(impl, cpu_case(tokens)[0])[1]
    if impl != "naive":  # naive is the reference's own math
        err, bad = mismatch(step(), cpu_case(tokens)[1], BUDGET[torch.float32])
        assert bad is None, f"MISMATCH {impl} vs the naive math at N={tokens}: {bad}"
        benchmark.extra_info["rel_err"] = err
    benchmark.extra_info["peak_extra_mib"] = round(cpu_peak_extra(impl, tokens) / 2**20, 1)
    benchmark.group = f"grpo_loss fwd+bwd cpu N={tokens} H={CPU_HIDDEN} V={CPU_VOCAB} fp32"
    benchmark.pedantic(step, rounds=3)


# ----------------------------------------------------------------------------- script mode

COLUMNS = [("mode", 8), ("tokens", 7), ("impl", 13), ("ms", 9), ("x_gemm", 7), ("peak_extra_gib", 15),
           ("rel_err", 9)]


def measure(mode, tokens, impl, floor, warmup, rep):
    """One row's fields; floor[mode] = (ms, bytes) of the GEMM floor, filled by its own rows."""
    from triton.testing import do_bench
    try:
        call, held, err, bad = prepare(mode, tokens, impl, split_floor=True)
        if bad and impl == "livethinking":
            return dict(status=f"MISMATCH vs the naive math: {bad}; not timed", failed=True)
        ms, memory = do_bench(call, warmup=warmup, rep=rep, return_mode="median"), peak_extra(call, held)
    except Unavailable as exc:
        return dict(status=f"skipped: {exc}")
    except torch.cuda.OutOfMemoryError:
        return dict(status="OOM")
    except Exception as exc:  # noqa: BLE001
        return dict(status=f"error: {type(exc).__name__}: {exc}"[:300], failed=impl == "livethinking")
    if impl == "gemm" and mode == "fwd+bwd":  # the backward GEMMs, plus the forward row
        if "fwd" not in floor:
            return dict(status="skipped: the forward GEMM was not timed")
        ms, memory = ms + floor["fwd"][0], max(memory, floor["fwd"][1])
    if impl == "gemm" and mode != "logp":
        floor[mode] = (ms, memory)
    base = floor.get("fwd+bwd" if mode == "fwd+bwd" else "fwd")
    return dict(ms=f"{ms:.2f}", x_gemm=f"{ms / base[0]:.2f}" if base else "-",
                rel_err="-" if err is None else f"{err:.1e}", peak_extra_gib=f"{memory / 2**30:.2f}",
                status="ok" if bad is None else f"MISMATCH vs the naive math: {bad}; timed anyway")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="CSV file to append rows to")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--cpu-peak", nargs=2, help=argparse.SUPPRESS)  # the child of cpu_peak_extra
    args = parser.parse_args(argv)
    if args.cpu_peak:
        print(cpu_peak_child(args.cpu_peak[0], int(args.cpu_peak[1])))
        return 0
    if not HAS_CUDA:
        parser.exit(2, "bench_grpo_loss.py: no CUDA device; the script mode times on a GPU only "
                       "(`pytest benchmarks/bench_grpo_loss.py` runs the CPU cases)\n")
    import triton
    device = torch.cuda.get_device_name()
    print(f"{device}: torch {torch.__version__}, triton {triton.__version__}\n"
          "x_gemm: time / the bare lm_head GEMMs'; peak_extra: beyond inputs, parameters and gradients\n"
          + "".join(f"{name:>{width}}" for name, width in COLUMNS) + "  status")
    rows, failed = [], False
    for tokens in args.tokens:
        gpu_case.cache_clear()
        floor = {}
        for mode, impl in plan(args.impls):
            row = dict(device=device, torch=torch.__version__, date=datetime.date.today().isoformat(),
                       mode=mode, tokens=tokens, impl=impl)
            row.update(measure(mode, tokens, impl, floor, args.warmup, args.rep))
            failed |= row.pop("failed", False)
            if not row["status"].startswith(("ok", "skipped")):  # a mismatch, OOM or error
                print(f"!!!!! N={tokens} {mode} {impl}: {row['status']} !!!!!", file=sys.stderr, flush=True)
            print("".join(f"{row.get(k, '-'):>{w}}" for k, w in COLUMNS) + f"  {row['status']}", flush=True)
            rows.append(row)
    if args.out:
        new = not args.out.exists()
        with args.out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["device", "torch", "date", *dict(COLUMNS), "status"])
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
