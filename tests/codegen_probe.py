"""Compile every Triton kernel of the project ahead of time for sm_90 (Hopper), no GPU
needed, in each variant its launcher can ask for (the constexpr switches, the weight
layouts, the tile tables' configs, bf16 and fp32), and report per variant: the shared
memory it needs, how many loads Triton's software pipeliner turned into asynchronous
copies, and how many dots became warp-group MMAs (wgmma) or stayed warp-level MMAs
(mma v2, the kind Hopper uses for tiles under 64 rows) — or the compile error.

The Triton interpreter that runs the kernels in the CPU tests never compiles them, so
compiled-mode-only errors (types of loop-carried values, unsupported ops, fp64 MMA,
shared memory over the limit) and lost pipelining show only here or on a GPU.

Run by tests/test_kernel_codegen.py in a subprocess without TRITON_INTERPRET (the
interpreter replaces the kernels' JIT functions). Prints one JSON object:
{variant: {"shared": bytes, "async_copies": n, "wgmma": m, "mma_v2": d} or {"error": text}},
or
{"unsupported": reason} where this Triton has another ahead-of-time compile API.

Signatures follow what the JIT specialises at a real launch: pointers and integers
divisible by 16, and unit strides as the constant 1.
"""

import itertools
import json
import os
import sys


class _Unsupported(Exception):
    pass


def _codegen(kernel, pointers: dict[str, str], constants: dict, num_warps: int,
             num_stages: int) -> dict:
    """Compile ``kernel`` for sm_90; arguments not in ``pointers`` (which also names the
    float scalars) or ``constants`` are int32."""
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
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as error:  # a compile error is a finding: report it
        lines = [line for line in str(error).splitlines() if line.strip()]
        return {"error": f"{type(error).__name__}: {' | '.join(lines[-3:])}"}
    ttgir = compiled.asm["ttgir"]
    return {"shared": compiled.metadata.shared,
            "async_copies": ttgir.count("async_copy_global_to_local"),
            "wgmma": ttgir.count("ttng.warp_group_dot "),
            "mma_v2": ttgir.count("tt.dot ")}  # tensor-core dots of the pre-Hopper kind


def _logprob_cases(dtype: str):
    from livethinking.kernels import fused_linear_logprobs as flp

    data, acc = "*" + dtype, "*fp32"
    logits, weight_grad = flp.CONFIGS[("default", "fp32" if dtype == "fp32" else "half")]
    precision = "ieee" if dtype == "fp32" else None
    tiles = dict(PRECISION=precision, BLOCK_M=logits.block_m, BLOCK_V=logits.block_v,
                 BLOCK_H=logits.block_h)
    stats = ["logp_ptr", "ent_ptr", "max_ptr", "logs_ptr", "part_m_ptr", "part_s_ptr",
             "part_t_ptr", "part_zt_ptr"]
    forward = {"x_ptr": data, "w_ptr": data, "b_ptr": data, "y_ptr": "*i64", "mask_ptr": "*u8",
               **{name: acc for name in stats}, "inv_temp": "fp32"}
    dz = {"x_ptr": data, "w_ptr": data, "b_ptr": data, "y_ptr": "*i64", "mask_ptr": "*u8",
          **{name: acc for name in ["max_ptr", "logs_ptr", "ent_ptr", "g_ptr", "e_ptr"]},
          "dz_ptr": data, "inv_temp": "fp32"}
    dw = {"dz_ptr": data, "x_ptr": data, "dw_ptr": acc, "mask_ptr": "*u8",
          "block_ids_ptr": "*i32", "num_blocks_ptr": "*i32"}
    unit = dict(stride_xh=1, stride_wh=1)
    for masked in (False, True):
        tag = "masked" if masked else "unmasked"
        yield (f"logprobs.forward/{tag}", flp._fused_linear_logprobs_forward_kernel, forward,
               dict(unit, HAS_BIAS=masked, HAS_MASK=masked, FINAL=True, **tiles), logits)
        yield (f"logprobs.forward_split/{tag}", flp._fused_linear_logprobs_forward_kernel,
               forward, dict(unit, HAS_BIAS=not masked, HAS_MASK=masked, FINAL=False, **tiles),
               logits)
        for upstream in ("logp", "entropy", "both"):
            yield (f"logprobs.dz/{tag}/{upstream}", flp._fused_linear_logprobs_dz_kernel, dz,
                   dict(unit, HAS_BIAS=masked, HAS_MASK=masked, HAS_G=upstream != "entropy",
                        HAS_E=upstream != "logp", **tiles), logits)
        yield (f"logprobs.weight_grad/{tag}", flp._weight_grad_accumulate_kernel, dw,
               dict(stride_xh=1, HAS_MASK=masked, PRECISION=precision,
                    BLOCK_M=weight_grad.block_m, BLOCK_V=weight_grad.block_v,
                    BLOCK_H=weight_grad.block_h), weight_grad)


def _moe_cases(dtype: str):
    from livethinking.kernels import fused_moe

    data = "*" + dtype
    precision = "ieee" if dtype == "fp32" else None

    def table(regime):
        config = fused_moe.TILE_CONFIGS[("default", regime)]
        return config, (config["num_warps"], config["num_stages"])

    prefill, prefill_launch = table("prefill")
    decode, decode_launch = table("decode")
    weight_grad, weight_grad_launch = table("weight_grad")
    gemm = {"a_ptr": data, "w_ptr": data, "out_ptr": data, "sorted_ptr": "*i32",
            "offsets_ptr": "*i32", "tile_end_ptr": "*i32"}
    gemm_tiles = dict(PRECISION=precision, BLOCK_M=prefill["BLOCK_M"], BLOCK_N=prefill["BLOCK_N"],
                      BLOCK_K=prefill["BLOCK_K"], BLOCK_E=128)
    # (name, GATHER, SILU_MUL, unit stride), the five launches of _FusedMoe: forward
    # gate_up and down (W[e, n, k], k contiguous), the backward's recomputed gate/up
    # pre-activations, dh = dout W_down and dx rows = d_pre W_gate_up (W read transposed,
    # n contiguous); each as the tiled GEMM (prefill) and the GEMV (decode)
    for name, gather, silu_mul, unit in (("gate_up", True, True, "stride_wk"),
                                         ("down", False, False, "stride_wk"),
                                         ("gate_up_recompute", True, False, "stride_wk"),
                                         ("down_input_grad", True, False, "stride_wn"),
                                         ("gate_up_input_grad", False, False, "stride_wn")):
        yield (f"fused_moe.{name}", fused_moe._expert_gemm_kernel, gemm,
               dict(gemm_tiles, **{unit: 1}, GATHER=gather, SILU_MUL=silu_mul), prefill_launch)
        yield (f"fused_moe.{name}_decode", fused_moe._expert_gemv_kernel, gemm,
               {unit: 1, "GATHER": gather, "SILU_MUL": silu_mul, "BLOCK_N": decode["BLOCK_N"],
                "BLOCK_K": decode["BLOCK_K"], "BLOCK_E": 128}, decode_launch)
    grad = {"c_ptr": data, "a_ptr": data, "scale_ptr": "*fp32", "out_ptr": data,
            "sorted_ptr": "*i32", "offsets_ptr": "*i32"}
    for gather_c, gather_a, scale in itertools.product((False, True), repeat=3):
        yield (f"fused_moe.weight_grad/c={gather_c},a={gather_a},scale={scale}",
               fused_moe._expert_weight_grad_kernel, grad,
               dict(GATHER_C=gather_c, GATHER_A=gather_a, SCALE=scale, PRECISION=precision,
                    BLOCK_M=weight_grad["BLOCK_M"], BLOCK_N=weight_grad["BLOCK_N"],
                    BLOCK_K=weight_grad["BLOCK_K"]), weight_grad_launch)
    for weighted in (False, True):
        yield (f"fused_moe.combine/weighted={weighted}", fused_moe._combine_kernel,
               {"y_ptr": data, "row_of_pair_ptr": "*i32", "weight_ptr": "*fp32", "out_ptr": data},
               dict(WEIGHTED=weighted, BLOCK_H=1024), (4, 3))
    yield ("fused_moe.silu_mul_backward", fused_moe._silu_mul_backward_kernel,
           {"pre_ptr": data, "dh_ptr": data, "sorted_ptr": "*i32", "weight_ptr": "*fp32",
            "h_ptr": data, "d_pre_ptr": data, "dot_ptr": "*fp32"}, dict(BLOCK_I=1024), (4, 3))


def _grouped_gemm_cases(dtype: str):
    from livethinking.kernels import grouped_gemm

    data = "*" + dtype
    rows_args = {"a_ptr": data, "b_ptr": data, "c_ptr": data, "group_offsets_ptr": "*i32",
                 "tile_offsets_ptr": "*i32"}
    for regime in ("decode", "medium", "prefill"):
        rows, weight_grad = grouped_gemm.CONFIGS[regime]
        tiles = dict(BLOCK_M=rows.block_m, BLOCK_N=rows.block_n, BLOCK_K=rows.block_k,
                     FP32_IEEE=dtype == "fp32")
        yield (f"grouped_gemm.forward/{regime}", grouped_gemm._grouped_gemm_rows_kernel,
               rows_args, dict(tiles, stride_ak=1, stride_bk=1, stride_cn=1), rows)
        yield (f"grouped_gemm.input_grad/{regime}", grouped_gemm._grouped_gemm_rows_kernel,
               rows_args, dict(tiles, stride_ak=1, stride_bn=1, stride_cn=1), rows)
        yield (f"grouped_gemm.weight_grad/{regime}", grouped_gemm._grouped_gemm_weight_grad_kernel,
               {"dc_ptr": data, "a_ptr": data, "db_ptr": data, "group_offsets_ptr": "*i32"},
               dict(stride_dcn=1, stride_ak=1, stride_dbk=1, BLOCK_M=weight_grad.block_m,
                    BLOCK_N=weight_grad.block_n, BLOCK_K=weight_grad.block_k,
                    FP32_IEEE=dtype == "fp32"), weight_grad)


def _paged_attention_cases(dtype: str):
    from livethinking.kernels import paged_attention

    data = "*" + dtype
    for group in (1, 8):  # Qwen3-30B-A3B: 32 query heads over 4 KV heads
        yield (f"paged_attention.decode/group={group}", paged_attention._paged_decode_kernel,
               {"q_ptr": data, "k_ptr": data, "v_ptr": data, "tables_ptr": "*i32",
                "ctx_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
                "scale": "fp32"},
               dict(GROUP=group, GROUP_PAD=max(2, group), BS=16, D=128, D_PAD=128), (4, 3))


def _launch(config) -> tuple[int, int]:
    """(num_warps, num_stages) of a tile config (a NamedTuple) or a plain pair."""
    if isinstance(config, tuple) and len(config) == 2:
        return config
    return config.num_warps, config.num_stages


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        print(json.dumps({"unsupported": str(error)}))
        return
    results = {}
    try:
        for dtype in ("bf16", "fp32"):
            for cases in (_logprob_cases, _moe_cases, _grouped_gemm_cases, _paged_attention_cases):
                for name, kernel, pointers, constants, config in cases(dtype):
                    results[f"{name}/{dtype}"] = _codegen(kernel, pointers, constants,
                                                          *_launch(config))
    except _Unsupported as error:
        results = {"unsupported": str(error)}
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
