"""GPU code generation checked without a GPU: every Triton GEMM kernel of the project,
compiled ahead of time for sm_90 (Hopper) in bf16, keeps its main loop software-pipelined
(operand loads become asynchronous copies issued stages ahead) and runs its dots as
warp-group MMAs. A row-mask branch inside the fused log-prob d W loop once stopped the
pipeliner (0 async copies); the loop now runs over a device-side list of active row
blocks instead."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = {
    *(f"logprobs.{k}/{m}" for k in ("forward", "dz", "weight_grad") for m in ("masked", "unmasked")),
    "fused_moe.gate_up", "fused_moe.down", "fused_moe.input_grad",
    "fused_moe.weight_grad/gather_c=False", "fused_moe.weight_grad/gather_c=True",
    "grouped_gemm.forward", "grouped_gemm.input_grad", "grouped_gemm.weight_grad",
}


def test_gemm_kernels_are_pipelined_tensor_core_loops_on_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).with_name("pipelining_probe.py")
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if "unsupported" in found:
        pytest.skip(f"this Triton cannot compile ahead of time here: {found['unsupported']}")
    assert set(found) == KERNELS
    for name, counts in found.items():
        # num_stages = 3, two operand loads per step: 2 steps' copies issued ahead of the
        # loop, then 2 per iteration (fused_moe.gate_up loads three: gate, up and x)
        assert counts["async_copies"] >= 6, (name, counts)
        assert counts["wgmma"] >= 1, (name, counts)
