"""GPU code generation checked without a GPU (tests/codegen_probe.py compiles every
Triton kernel variant ahead of time for sm_90, in bf16 and fp32): the interpreter that
runs the kernels in the other CPU tests never compiles them, so this is where
compiled-mode-only failures show before a GPU is lent.

* every variant compiles and fits Hopper's shared memory;
* every bf16 GEMM main loop is software-pipelined (loads issued as asynchronous copies
  stages ahead: a row-mask branch inside the fused log-prob d W loop once stopped that,
  0 async copies) and runs its dots on the tensor cores: warp-group MMAs (wgmma), or
  warp-level MMAs for the 16-row decode tiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_MEMORY = 227 * 1024  # bytes a block may use on an H100/H200
GEMM_KERNELS = ("logprobs.forward", "logprobs.dz", "logprobs.weight_grad", "fused_moe.gate_up/",
                "fused_moe.down/", "fused_moe.gate_up_recompute/", "fused_moe.down_input_grad/",
                "fused_moe.gate_up_input_grad/", "fused_moe.weight_grad", "grouped_gemm.")
# grouped GEMM's decode tiles are 16 rows high (a few rows per expert): warp-level MMAs
SIXTEEN_ROW_TILES = ("grouped_gemm.forward/decode", "grouped_gemm.input_grad/decode")


@pytest.fixture(scope="module")
def codegen():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).with_name("codegen_probe.py")
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                            timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if "unsupported" in found:
        pytest.skip(f"this Triton cannot compile ahead of time here: {found['unsupported']}")
    return found


def test_every_kernel_variant_compiles_for_hopper(codegen):
    assert len(codegen) == 2 * 44  # bf16 and fp32 of every variant listed in the probe
    errors = {name: r["error"] for name, r in codegen.items() if "error" in r}
    assert not errors, errors
    over = {name: r["shared"] for name, r in codegen.items()
            if r["shared"] > HOPPER_SHARED_MEMORY}
    assert not over, over


def test_bf16_gemm_loops_are_pipelined_on_tensor_cores(codegen):
    gemms = {name: r for name, r in codegen.items()
             if name.endswith("/bf16") and name.startswith(GEMM_KERNELS)}
    # log-probs (forward, split forward, dZ x 3 upstreams, d W; masked or not), the fused
    # MoE's five expert GEMM launches and eight weight-gradient variants, grouped GEMM
    # 3 x 3 regimes
    assert len(gemms) == 12 + 5 + 8 + 9
    for name, r in gemms.items():
        # num_stages >= 3 with two operand loads per step: 2 steps' copies issued ahead of
        # the loop, then 2 per iteration (gate_up loads three: gate, up and x)
        assert r["async_copies"] >= 6, (name, r)
        if name.startswith(SIXTEEN_ROW_TILES):  # below wgmma's 64-row warp-group tile
            assert r["mma_v2"] >= 1 and r["wgmma"] == 0, (name, r)
        else:
            assert r["wgmma"] >= 1 and r["mma_v2"] == 0, (name, r)
