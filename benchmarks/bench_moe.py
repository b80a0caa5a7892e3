"""The fused MoE expert layer against its peers: forward, and training (forward + backward).

    pytest benchmarks/bench_moe.py                 # CPU tiny fp32 cases; the CUDA cases where a GPU exists
    python benchmarks/bench_moe.py --out moe.csv   # GPU: do_bench medians, a table, CSV rows keyed by GPU

Qwen3-30B-A3B experts (H=2048, I=768, E=128, k=8), bf16, weights ~ N(0, 0.02²), routing =
softmax of random logits → top-k → renormalised → bf16 (as transformers' router). Peers:
grouped_mm (sort pairs by expert, gather, torch._grouped_mm, silu·mul, torch._grouped_mm,
unsort, weighted sum over k), transformers (Qwen3MoeExperts with the implementation a
transformers model picks by default, `config._experts_implementation` = "grouped_mm" in
5.x), transformers_eager (its own expert loop, what a bare config gets), naive (a loop
over experts, fp32 combine), vllm (fused_experts, only where `import vllm` works).

Before timing, ours is held to the fp32 loop `fused_moe_reference`, and every peer's
output (training: every gradient too) to ours: ‖a − b‖ / ‖b‖ ≤ 1e-2. A mismatch is
reported and not timed. Each timed call takes the next of N_SETS random input sets.
Cost per forward (training: 3× both): FLOPs = 2·T·k·3·I·H; bytes = experts touched ·
3·I·H·2 + x read + out written + T·k·(2·I·2 for h written and read + 8 for id, weight).
% roof = max(FLOPs / peak FLOP/s, bytes / peak B/s) / time, peaks measured at start
(bf16 8192³ torch.matmul; a 1 GiB device copy, read + write counted).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
TOKENS = [1, 8, 64, 512, 4096, 8192, 32768]
TRAIN_TOKENS = [4096, 16384]
CPU_SHAPE = dict(tokens=64, hidden=64, inter=32, experts=8, top_k=2)
IMPLS = ["livethinking", "grouped_mm", "transformers", "transformers_eager", "naive", "vllm"]
TRAIN_IMPLS = ["livethinking", "grouped_mm", "transformers"]
BUDGET = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
N_SETS = 4
HAS_CUDA = torch.cuda.is_available()
DEVICE, DTYPE = "cuda", torch.bfloat16
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


@functools.cache
def kernel():
    """livethinking.kernels.fused_moe, or kernels/fused_moe.py loaded on its own if not installed."""
    try:
        from livethinking.kernels import fused_moe as module
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "kernels" / "fused_moe.py"
        spec = importlib.util.spec_from_file_location("_bench_fused_moe", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- inputs


def make_weights(device, dtype, hidden, inter, experts, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype)
    w_down = torch.randn(experts, hidden, inter, generator=gen, device=device, dtype=dtype)
    return w_gate_up.mul_(0.02), w_down.mul_(0.02)


def make_tokens(device, dtype, tokens, hidden, experts, top_k, seed):
    """(x, topk_weights, topk_ids): random activations, routing from random logits."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    weights, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
    return x, (weights / weights.sum(dim=-1, keepdim=True)).to(dtype), ids


# ----------------------------------------------------------------------------- peers


def naive_moe(x, w_gate_up, w_down, topk_weights, topk_ids):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(w_gate_up.shape[0]):
        token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert]) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.float())
    return out.to(x.dtype)


def grouped_mm_moe(x, w_gate_up, w_down, topk_weights, topk_ids):
    tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # row r of the grouped GEMMs holds pair order[r]
    offsets = torch.cumsum(torch.bincount(flat, minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    # weights as (E, K, N) views: column-major per expert, strides 16-byte aligned
    gate, up = torch._grouped_mm(x[order // top_k], w_gate_up.transpose(1, 2), offs=offsets).chunk(2, -1)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)  # (T·k, H)
    y_pairs = y.new_empty(y.shape).index_copy(0, order, y).view(tokens, top_k, -1)
    return torch.bmm(topk_weights.to(y.dtype).unsqueeze(1), y_pairs).squeeze(1)  # fp32 accumulate


@functools.cache
def transformers_default() -> str:
    """The experts implementation a transformers Qwen3-MoE model selects when none is asked for."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeModel
    tiny = Qwen3MoeConfig(hidden_size=16, intermediate_size=8, moe_intermediate_size=8, num_experts=4,
                          num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=16)
    return getattr(Qwen3MoeModel(tiny).config, "_experts_implementation", None) or "eager"


def transformers_experts(w_gate_up, w_down, top_k, implementation, train):
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
        if implementation is None:
            implementation = transformers_default()
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"transformers Qwen3MoeExperts: {exc!r}") from exc
    experts, two_inter, hidden = w_gate_up.shape
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=two_inter // 2,
                            num_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w_gate_up.detach().clone(), requires_grad=train)
    module.down_proj = torch.nn.Parameter(w_down.detach().clone(), requires_grad=train)
    return (lambda x, w, ids: module(x, ids, w)), [module.gate_up_proj, module.down_proj]


def build(impl, w_gate_up, w_down, top_k, train=False, cpu_ours=None):
    """(fn(x, topk_weights, topk_ids) → out, the weight tensors to differentiate)."""
    wgu, wd = (w.detach().requires_grad_(train) for w in (w_gate_up, w_down))
    if impl == "livethinking":
        fused = cpu_ours if cpu_ours is not None else kernel().fused_moe
        return (lambda x, w, ids: fused(x, wgu, wd, w, ids)), [wgu, wd]
    if impl == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
        return (lambda x, w, ids: grouped_mm_moe(x, wgu, wd, w, ids)), [wgu, wd]
    if impl in ("transformers", "transformers_eager"):
        return transformers_experts(w_gate_up, w_down, top_k, None if impl == "transformers" else "eager", train)
    if impl == "naive":
        return (lambda x, w, ids: naive_moe(x, wgu, wd, w, ids)), [wgu, wd]
    if impl == "vllm":
        try:
            from vllm.model_executor.layers.fused_moe import fused_experts
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"vllm not importable: {exc!r}") from exc
        return (lambda x, w, ids: fused_experts(x, wgu, wd, w.float(), ids.to(torch.int32))), [wgu, wd]
    raise ValueError(f"unknown implementation {impl!r}")


# ----------------------------------------------------------------------------- checks and costs


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_once(fn, params, x, w, ids, grad_out=None):
    """Forward output, or (output, grads of x, w and params) when grad_out is given."""
    if grad_out is None:
        with torch.no_grad():
            return [fn(x, w, ids)]
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(x, w, ids)
    return [out.detach(), *torch.autograd.grad(out, [x, w, *params], grad_out)]


def mismatch(got, expected, budget) -> str | None:
    """None if every tensor is within budget of its expected one, else what is off."""
    names = ["out", "d_x", "d_topk_weights", "d_w_gate_up", "d_w_down"]
    errors = {name: rel_err(a, b) for name, a, b in zip(names, got, expected)}
    bad = {name: err for name, err in errors.items() if not err <= budget}  # NaN fails too
    return None if not bad else ", ".join(f"{n}: {e:.2e}" for n, e in bad.items()) + f" > {budget:g}"


def cost(tokens, experts_touched, train):
    """(FLOPs, bytes) of the model in the module docstring."""
    elem = DTYPE.itemsize
    flops = 2 * tokens * TOP_K * 3 * INTER * HIDDEN
    moved = experts_touched * 3 * INTER * HIDDEN * elem + 2 * tokens * HIDDEN * elem
    moved += tokens * TOP_K * (2 * INTER * elem + 8)
    return (3 * flops, 3 * moved) if train else (flops, moved)


def rotating(fn, params, sets, grad_out=None):
    """A call that takes the next input set each time; with grad_out, forward + every gradient."""
    cycle = itertools.cycle(sets)
    if grad_out is None:
        return lambda: fn(*next(cycle))

    def step():
        x, w, ids = next(cycle)
        return torch.autograd.grad(fn(x, w, ids), [x, w, *params], grad_out)
    return step


# ----------------------------------------------------------------------------- GPU cases


@functools.lru_cache(maxsize=1)
def gpu_weights():
    return make_weights(DEVICE, DTYPE, HIDDEN, INTER, EXPERTS)


@functools.lru_cache(maxsize=1)
def gpu_case(tokens, train):
    """Rotating input sets, ours' results on set 0 (checked against fp32), experts touched."""
    w_gate_up, w_down = gpu_weights()
    sets = [make_tokens(DEVICE, DTYPE, tokens, HIDDEN, EXPERTS, TOP_K, seed=1 + i) for i in range(N_SETS)]
    sets = [(x.requires_grad_(train), w.requires_grad_(train), ids) for x, w, ids in sets]
    grad_out = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE) if train else None
    fn, params = build("livethinking", w_gate_up, w_down, TOP_K, train)
    ours = run_once(fn, params, *sets[0], grad_out)
    err = rel_err(ours[0], kernel().fused_moe_reference(sets[0][0].detach(), w_gate_up, w_down,
                                                         sets[0][1].detach(), sets[0][2]))
    touched = sum(ids.unique().numel() for _, _, ids in sets) / len(sets)
    return sets, grad_out, ours, err, touched


def prepare(impl, tokens, train):
    """(timed callable, rel. error vs ours, experts touched); raises Unavailable or AssertionError."""
    sets, grad_out, ours, ours_err, touched = gpu_case(tokens, train)
    if not ours_err <= BUDGET[DTYPE]:
        raise AssertionError(f"livethinking vs fp32 reference: {ours_err:.2e} > {BUDGET[DTYPE]:g}")
    fn, params = build(impl, *gpu_weights(), TOP_K, train)
    try:
        got = run_once(fn, params, *sets[0], grad_out)
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run this shape here)
        raise Unavailable(f"{impl} failed: {type(exc).__name__}: {exc}") from exc
    bad = mismatch(got, ours, BUDGET[DTYPE])
    if bad:
        raise AssertionError(f"MISMATCH {impl} vs livethinking at T={tokens}: {bad}")
    err = ours_err if impl == "livethinking" else rel_err(got[0], ours[0])
    return rotating(fn, params, sets, grad_out), err, touched


def plan(tokens=TOKENS, train_tokens=TRAIN_TOKENS, impls=IMPLS):
    """(train, tokens, impl) of every GPU case, forward first."""
    return ([(False, t, i) for t in tokens for i in impls]
            + [(True, t, i) for t in train_tokens for i in TRAIN_IMPLS if i in impls])


@gpu
@pytest.mark.parametrize("train,tokens,impl", [
    pytest.param(*case, id=f"{'train' if case[0] else 'forward'}-T{case[1]}-{case[2]}") for case in plan()])
def test_cuda(benchmark, train, tokens, impl):
    try:
        call = prepare(impl, tokens, train)[0]
    except Unavailable as exc:
        pytest.skip(str(exc))
    except AssertionError as exc:
        pytest.fail(str(exc))
    mode = "forward+backward" if train else "forward"
    benchmark.group = f"fused_moe {mode} cuda T={tokens} H={HIDDEN} I={INTER} E={EXPERTS} k={TOP_K} bf16"
    benchmark(lambda: (call(), torch.cuda.synchronize()))  # wall time = device time


# ----------------------------------------------------------------------------- CPU cases


def cpu_ours():
    try:
        import livethinking.ops as ops
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"livethinking.ops not importable: {exc!r}")
    if not hasattr(ops, "fused_moe"):
        pytest.skip("livethinking.ops has no fused_moe yet")
    return ops.fused_moe


@pytest.mark.parametrize("impl", ["livethinking", "grouped_mm", "transformers", "naive"])
def test_forward_cpu(benchmark, impl):
    s = CPU_SHAPE
    w_gate_up, w_down = make_weights("cpu", torch.float32, s["hidden"], s["inter"], s["experts"])
    x, w, ids = make_tokens("cpu", torch.float32, s["tokens"], s["hidden"], s["experts"], s["top_k"], 1)
    ours = cpu_ours() if impl == "livethinking" else None
    try:
        fn, _ = build(impl, w_gate_up, w_down, s["top_k"], cpu_ours=ours)
        with torch.no_grad():
            out = fn(x, w, ids)
    except Unavailable as exc:
        pytest.skip(str(exc))
    except (NotImplementedError, RuntimeError) as exc:
        if impl == "livethinking":
            raise
        pytest.skip(f"{impl} does not run on the CPU here: {exc}")
    bad = mismatch([out], [kernel().fused_moe_reference(x, w_gate_up, w_down, w, ids)], BUDGET[torch.float32])
    assert bad is None, f"{impl} vs fused_moe_reference: {bad}"
    benchmark.group = "fused_moe forward cpu fp32 " + " ".join(f"{k}={v}" for k, v in s.items())
    benchmark(torch.no_grad()(lambda: fn(x, w, ids)))


# ----------------------------------------------------------------------------- script mode


def measure_peaks(warmup, rep):
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * 8192**3 / (do_bench(lambda: a @ b, warmup, rep, return_mode="median") * 1e-3)
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), warmup, rep, return_mode="median") * 1e-3)
    return flops, bw


COLUMNS = [("mode", 8), ("tokens", 7), ("impl", 19), ("us", 10), ("tflops", 8), ("gbs", 7),
           ("pct_roofline", 13), ("experts_touched", 16), ("rel_err", 9)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="CSV file to append rows to")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--train-tokens", type=int, nargs="+", default=TRAIN_TOKENS)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    args = parser.parse_args(argv)
    if not HAS_CUDA:
        parser.exit(2, "bench_moe.py: no CUDA device; the script mode times on a GPU only "
                       "(`pytest benchmarks/bench_moe.py` runs the CPU cases)\n")
    from triton.testing import do_bench
    import triton
    peak_flops, peak_bw = measure_peaks(args.warmup, args.rep)
    device = torch.cuda.get_device_name()
    print(f"{device}: torch {torch.__version__}, triton {triton.__version__}; measured peaks "
          f"{peak_flops / 1e12:.0f} TFLOP/s bf16 matmul, {peak_bw / 1e9:.0f} GB/s copy")
    with contextlib.suppress(Exception):
        print(f"transformers' default experts implementation: {transformers_default()!r}")
    rows, failed = [], False
    for train, tokens, impl in plan(args.tokens, args.train_tokens, args.impls):
        row = dict(device=device, torch=torch.__version__, date=datetime.date.today().isoformat(),
                   mode="fwd+bwd" if train else "fwd", tokens=tokens, impl=impl)
        try:
            call, err, touched = prepare(impl, tokens, train)
            ms = do_bench(call, args.warmup, args.rep, return_mode="median")
        except Unavailable as exc:
            rows.append(dict(row, status=f"skipped: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001  (a mismatch; out of memory, a launch error)
            status = str(exc) if isinstance(exc, AssertionError) else f"error: {type(exc).__name__}: {exc}"
            print(f"\n!!!!! {status}: not timed !!!!!\n", file=sys.stderr)
            rows.append(dict(row, status=status[:300]))
            failed = True
            continue
        flops, moved = cost(tokens, touched, train)
        roof = max(flops / peak_flops, moved / peak_bw)
        rows.append(dict(row, us=f"{ms * 1e3:.1f}", tflops=f"{flops / ms / 1e9:.1f}",
                         gbs=f"{moved / ms / 1e6:.0f}", pct_roofline=f"{100 * roof / (ms * 1e-3):.1f}",
                         experts_touched=f"{touched:.1f}", rel_err=f"{err:.1e}", status="ok"))
        torch.cuda.empty_cache()
    print("\nrel_err: ours vs the fp32 reference, every other implementation vs ours")
    print("".join(f"{name:>{width}}" for name, width in COLUMNS) + "  status")
    for r in rows:
        print("".join(f"{r.get(name, '-'):>{width}}" for name, width in COLUMNS) + f"  {r['status']}")
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
