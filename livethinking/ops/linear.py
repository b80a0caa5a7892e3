"""Linear layers of the engine's steps: few rows against a large weight.

At decode a projection multiplies a few rows (the running sequences, or an expert's share
of them) by a weight read from memory once per step. On the CPU, MKL's sgemm runs such
products at 26-49 % of the memory floor on 1-4 rows (it packs the weight on every call);
the C++ ``skinny_linear`` / ``grouped_skinny_linear`` ops stream the weight once, a cached
tile against every row (72-88 % of the floor), and fall back to MKL past 64 rows, where it
is as fast (``csrc/cpu/skinny_gemm_cpu.cpp``; measured 1.37-3.36× MKL on 1-16 rows,
0.99-1.20× on 64: ``benchmarks/bench_skinny_linear.py``, ``benchmarks/RESULTS.md``).
Inference only (no autograd formula); float32; the products use fused multiply-adds, so
the last bits differ from ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from livethinking import _extension

__all__ = ["grouped_linear", "linear"]

_NATIVE = _extension.compiled_library is not None  # the C++ ops exist


def _native_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The C++ op applies: CPU, float32 throughout, no autograd asked of it."""
    return (_NATIVE and x.device.type == "cpu" and x.dtype == torch.float32
            and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)
            and not (torch.is_grad_enabled()
                     and any(t.requires_grad for t in (x, *weights))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           fast: bool = False) -> torch.Tensor:
    """y = x Wᵀ + b over x's last dimension: x (..., K), weight (N, K), bias (N,) -> (..., N).

    ``fast`` (the engine's steps): on the CPU in float32 without autograd, the C++ skinny
    GEMM; otherwise (or with ``fast`` false, the trainer's numerics) ``F.linear``.
    """
    if not (fast and _native_ok(x, weight) and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1]):
        return F.linear(x, weight, bias)
    y = torch.ops.livethinking.skinny_linear(x.reshape(-1, x.shape[-1]), weight)
    y = y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)
    return y if bias is None else y + bias


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
    """out[t] = weight[g] rows[t] for the rows of group g, ends[g-1] <= t < ends[g]:
    rows (T, K), weight (G, N, K), ends (G,) int, the last equal to T -> (T, N), as
    ``torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)``. The C++ op on the CPU
    in float32 without autograd; None elsewhere (the caller picks another path)."""
    if not _native_ok(rows, weight):
        return None
    return torch.ops.livethinking.grouped_skinny_linear(rows, weight, ends)
