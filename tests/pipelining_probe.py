"""Compile the project's Triton GEMM kernels for sm_90 (no GPU needed) and report, per
kernel variant, how many loads Triton's software pipeliner turned into asynchronous
copies (0 means the main loop's loads are not overlapped with its tensor-core work) and
how many dots became Hopper warp-group MMAs (wgmma).

Run by tests/test_kernel_pipelining.py in a subprocess without TRITON_INTERPRET (the
interpreter replaces the kernels' JIT functions). Prints one JSON object:
{variant: {"async_copies": n, "wgmma": m}}, or {"unsupported": reason} where this Triton has another
ahead-of-time compile API.

Signatures follow what the JIT specialises at a real launch of bf16 inputs: pointers
and integers divisible by 16, and unit strides as the constant 1.
"""

import json
import os
import sys


class _Unsupported(Exception):
    pass


def _codegen(kernel, pointers: dict[str, str], constants: dict) -> dict[str, int]:
    """Async copies and Hopper warp-group MMAs (wgmma) in the sm_90 TTGIR of ``kernel``;
    arguments not in ``pointers`` or ``constants`` are int32 (float ones named in
    ``pointers`` too)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32")
                 for name in kernel.arg_names}  # in the kernel's argument order
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, kind in enumerate(signature.values()) if kind not in ("constexpr", "fp32")}
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    except TypeError as error:  # another Triton's ahead-of-time API
        raise _Unsupported(f"ASTSource: {error}") from error
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8, "num_stages": 3})
    ttgir = compiled.asm["ttgir"]
    return {"async_copies": ttgir.count("async_copy_global_to_local"),
            "wgmma": ttgir.count("ttng.warp_group_dot ")}


def _logprob_cases():
    from livethinking.kernels import fused_linear_logprobs as flp

    tiles = {"PRECISION": None, "BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_H": 64}
    half, f32 = "*bf16", "*fp32"
    forward = {"x_ptr": half, "w_ptr": half, "b_ptr": half, "y_ptr": "*i64", "mask_ptr": "*u8",
               "logp_ptr": f32, "ent_ptr": f32, "max_ptr": f32, "logs_ptr": f32,
               "part_m_ptr": f32, "part_s_ptr": f32, "part_t_ptr": f32, "part_zt_ptr": f32,
               "inv_temp": "fp32"}
    dz = {"x_ptr": half, "w_ptr": half, "b_ptr": half, "y_ptr": "*i64", "mask_ptr": "*u8",
          "max_ptr": f32, "logs_ptr": f32, "ent_ptr": f32, "g_ptr": f32, "e_ptr": f32,
          "dz_ptr": half, "inv_temp": "fp32"}
    weight_grad = {"dz_ptr": half, "x_ptr": half, "dw_ptr": f32, "mask_ptr": "*u8",
                   "block_ids_ptr": "*i32", "num_blocks_ptr": "*i32"}
    for has_mask in (False, True):
        tag = "masked" if has_mask else "unmasked"
        yield (f"logprobs.forward/{tag}", flp._fused_linear_logprobs_forward_kernel, forward,
               dict(stride_xh=1, stride_wh=1, HAS_BIAS=False, HAS_MASK=has_mask, FINAL=True,
                    **tiles))
        yield (f"logprobs.dz/{tag}", flp._fused_linear_logprobs_dz_kernel, dz,
               dict(stride_xh=1, stride_wh=1, HAS_BIAS=False, HAS_MASK=has_mask, HAS_G=True,
                    HAS_E=True, **tiles))
        yield (f"logprobs.weight_grad/{tag}", flp._weight_grad_accumulate_kernel, weight_grad,
               dict(stride_xh=1, HAS_MASK=has_mask, **dict(tiles, BLOCK_H=128)))


def _moe_cases():
    from livethinking.kernels import fused_moe

    tiles = {"PRECISION": None, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    gemm = {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "sorted_ptr": "*i32",
            "offsets_ptr": "*i32", "tile_end_ptr": "*i32"}
    yield ("fused_moe.gate_up", fused_moe._expert_gemm_kernel, gemm,
           dict(stride_wk=1, GATHER=True, SILU_MUL=True, BLOCK_E=128, **tiles))
    yield ("fused_moe.down", fused_moe._expert_gemm_kernel, gemm,
           dict(stride_wk=1, GATHER=False, SILU_MUL=False, BLOCK_E=128, **tiles))
    yield ("fused_moe.input_grad", fused_moe._expert_gemm_kernel, gemm,  # W read transposed
           dict(stride_wn=1, GATHER=False, SILU_MUL=False, BLOCK_E=128, **tiles))
    weight_grad = {"c_ptr": "*bf16", "a_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16",
                   "sorted_ptr": "*i32", "offsets_ptr": "*i32"}
    for gather_c, gather_a, scale in ((False, True, False), (True, False, True)):
        yield (f"fused_moe.weight_grad/gather_c={gather_c}", fused_moe._expert_weight_grad_kernel,
               weight_grad, dict(GATHER_C=gather_c, GATHER_A=gather_a, SCALE=scale, **tiles))


def _grouped_gemm_cases():
    from livethinking.kernels import grouped_gemm

    tiles = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "FP32_IEEE": False}
    rows = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "group_offsets_ptr": "*i32",
            "tile_offsets_ptr": "*i32"}
    yield ("grouped_gemm.forward", grouped_gemm._grouped_gemm_rows_kernel, rows,
           dict(stride_ak=1, stride_bk=1, stride_cn=1, **tiles))
    yield ("grouped_gemm.input_grad", grouped_gemm._grouped_gemm_rows_kernel, rows,
           dict(stride_ak=1, stride_bn=1, stride_cn=1, **tiles))
    yield ("grouped_gemm.weight_grad", grouped_gemm._grouped_gemm_weight_grad_kernel,
           {"dc_ptr": "*bf16", "a_ptr": "*bf16", "db_ptr": "*bf16", "group_offsets_ptr": "*i32"},
           dict(stride_dcn=1, stride_ak=1, stride_dbk=1, **tiles))


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton.compiler  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        print(json.dumps({"unsupported": str(error)}))
        return
    results = {}
    try:
        for cases in (_logprob_cases, _moe_cases, _grouped_gemm_cases):
            for name, kernel, pointers, constants in cases():
                results[name] = _codegen(kernel, pointers, constants)
    except _Unsupported as error:
        results = {"unsupported": str(error)}
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
