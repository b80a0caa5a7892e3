"""A tiny Triton kernel that ``livethinking info`` runs in a child process to check that
Triton works here (under ``TRITON_INTERPRET=1`` on CPU tensors, or on a GPU)."""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # x, y, out: (n,)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * scale + y, mask=mask)


def main() -> int:
    device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
    n = 300
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    out = torch.full_like(x, float("nan"))
    _scaled_add_kernel[(triton.cdiv(n, 128),)](x, y, out, n, 0.5, BLOCK=128)
    if not torch.allclose(out, x * 0.5 + y, rtol=1e-6, atol=1e-6):
        print("kernel result differs from torch")
        return 1
    print(f"ran a kernel with triton {triton.__version__} on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
