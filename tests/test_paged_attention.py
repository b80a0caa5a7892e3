"""The Triton paged decode-attention kernel (interpreted on CPU) and its op
``livethinking.ops.paged_decode_attention`` (the kernel, the C++ CPU op, or PyTorch's gather
+ SDPA) against a float64 gather."""

import pytest
import torch

from livethinking import ops

from livethinking.kernels.paged_attention import (paged_decode_attention,
                                                  paged_decode_attention_reference)

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
       torch.float64: 2.0**-53}


def _inputs(generator, batch, heads, kv_heads, dim, block_size, contexts, dtype,
            num_blocks=48, device="cpu"):
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    q = torch.randn(batch, heads, dim, generator=generator)
    width = max(-(-c // block_size) for c in contexts) + 2  # tables longer than needed
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:width]
                          for _ in range(batch)])
    # entries past each row's context point at a block full of huge values: must not be read
    poison = num_blocks - 1
    for b, c in enumerate(contexts):
        tables[b][tables[b] == poison] = tables[b][0] if tables[b][0] != poison else 0
        tables[b, -(-c // block_size):] = poison
    k_pool[poison] = 1e4
    v_pool[poison] = float("nan")
    to = dict(dtype=dtype, device=device)
    return (q.to(**to), k_pool.to(**to), v_pool.to(**to), tables.to(device),
            torch.tensor(contexts, device=device))


def _plain(q, k_pool, v_pool, tables, contexts):
    """The gather + softmax in the inputs' own dtype: the error yardstick."""
    out = torch.empty_like(q)
    bs, kv_heads, dim = k_pool.shape[1], k_pool.shape[2], q.shape[2]
    for b, c in enumerate(contexts.tolist()):
        blocks = tables[b, :-(-c // bs)].long()
        k = k_pool[blocks].reshape(-1, kv_heads, dim)[:c].repeat_interleave(q.shape[1] // kv_heads, 1)
        v = v_pool[blocks].reshape(-1, kv_heads, dim)[:c].repeat_interleave(q.shape[1] // kv_heads, 1)
        probs = torch.softmax(torch.einsum("hd,shd->hs", q[b] * dim**-0.5, k), dim=-1)
        out[b] = torch.einsum("hs,shd->hd", probs, v)
    return out


def _assert_within_plain_budget(out, q, k_pool, v_pool, tables, ctx):
    """out within 2× the plain gather's own error (in the inputs' dtype) of the float64
    reference, plus 8 units of roundoff; finite (the NaN poison past the context unread).

    In float64 the plain gather *is* the reference (its error reads 0), so its error is
    measured in float32 on the same values (exact there: the inputs are float32 draws) and
    scaled by the ratio of unit roundoffs, 2^-53 / 2^-24 (first-order roundoff is linear in
    it). 8 units alone failed ~1 case in 400 (the online softmax rounds a little more)."""
    exact = paged_decode_attention_reference(q, k_pool, v_pool, tables, ctx)
    assert out.dtype == q.dtype and out.shape == q.shape and torch.isfinite(out).all()
    ours_error = (out.double() - exact).abs().max().item()
    if q.dtype == torch.float64:
        plain = _plain(q.float(), k_pool.float(), v_pool.float(), tables, ctx)
        plain_error = (plain.double() - exact).abs().max().item() * EPS[torch.float64] / EPS[torch.float32]
    else:
        plain = _plain(q, k_pool, v_pool, tables, ctx)
        plain_error = (plain.double() - exact).abs().max().item()
    floor = 8 * EPS[q.dtype] * exact.abs().max().item()
    assert ours_error <= 2 * plain_error + floor, (ours_error, plain_error, floor)


CASES = [  # batch, heads, kv_heads, dim, block_size, contexts, num_splits
    (1, 1, 1, 8, 4, [1], None),
    (3, 4, 2, 8, 4, [1, 5, 9], None),
    (2, 3, 1, 12, 16, [17, 33], 3),  # group of 3 (padded), head dim 12 (padded)
    (1, 8, 4, 16, 4, [31], None),
    (4, 6, 6, 8, 4, [4, 8, 1, 2], 16),  # more splits than blocks: empty splits merge away
    (2, 4, 2, 24, 8, [40, 7], 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])) + f"-ctx{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_within_the_plain_budget(case, dtype, generator):
    batch, heads, kv_heads, dim, bs, contexts, splits = case
    q, k_pool, v_pool, tables, ctx = _inputs(generator, batch, heads, kv_heads, dim, bs, contexts, dtype)
    out = paged_decode_attention(q, k_pool, v_pool, tables, ctx, num_splits=splits)
    _assert_within_plain_budget(out, q, k_pool, v_pool, tables, ctx)


def test_splits_do_not_change_the_result_beyond_roundoff(generator):
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 2, 4, 2, 16, 4, [37, 21], torch.float32)
    one = paged_decode_attention(q, k_pool, v_pool, tables, ctx, num_splits=1)
    many = paged_decode_attention(q, k_pool, v_pool, tables, ctx, num_splits=7)
    assert torch.allclose(one, many, rtol=0, atol=1e-5)


def test_empty_batch():
    q = torch.randn(0, 4, 8)
    pool = torch.randn(3, 4, 2, 8)
    out = paged_decode_attention(q, pool, pool, torch.zeros(0, 2, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.randn(2, 4)), "q must be"),
    (dict(v_pool=torch.randn(5, 4, 2, 4)), "k_pool and v_pool"),
    (dict(q=torch.randn(2, 3, 8)), "multiple of Hkv"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.long)), "block_tables must be"),
    (dict(context_lens=torch.ones(3, dtype=torch.long)), "context_lens must be"),
])
def test_bad_input_names_the_argument(change, match):
    args = dict(q=torch.randn(2, 4, 8), k_pool=torch.randn(5, 4, 2, 8), v_pool=torch.randn(5, 4, 2, 8),
                block_tables=torch.zeros(2, 2, dtype=torch.long), context_lens=torch.ones(2, dtype=torch.long))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_float64(dtype, generator):
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 5, 32, 4, 128, 16, [1, 17, 300, 2048, 4095],
                                             dtype, num_blocks=700, device="cuda")
    out = paged_decode_attention(q, k_pool, v_pool, tables, ctx)
    exact = paged_decode_attention_reference(q, k_pool, v_pool, tables, ctx)
    plain = _plain(q, k_pool, v_pool, tables, ctx)
    ours_error = (out.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    assert ours_error <= 2 * plain_error + 8 * EPS[dtype] * exact.abs().max().item()



# ------------------------------------------------------------------ the op (livethinking.ops)
@pytest.mark.parametrize("use_kernel", [None, False, True], ids=["cpp", "torch", "kernel"])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_matches_float64_and_never_reads_past_the_context(case, dtype, use_kernel, generator):
    batch, heads, kv_heads, dim, bs, contexts, _ = case
    q, k_pool, v_pool, tables, ctx = _inputs(generator, batch, heads, kv_heads, dim, bs, contexts, dtype)
    out = ops.paged_decode_attention(q, k_pool, v_pool, tables, ctx, use_kernel=use_kernel)
    exact = paged_decode_attention_reference(q, k_pool, v_pool, tables, ctx)
    plain = _plain(q, k_pool, v_pool, tables, ctx)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()  # no NaN block
    ours_error = (out.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    assert ours_error <= 2 * plain_error + 8 * EPS[dtype] * exact.abs().max().item()


CPP_CASES = CASES + [
    (3, 6, 2, 33, 16, [1, 97, 200], None),  # head dim 33: the 8-lane sums' tail
    (7, 2, 2, 8, 1, [7, 1, 3, 2, 5, 6, 4], None),  # block size 1
]


@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: "-".join(map(str, c[:5])) + f"-ctx{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpp_op_matches_float64_within_the_plain_budget(case, dtype, generator):
    batch, heads, kv_heads, dim, bs, contexts, _ = case
    q, k_pool, v_pool, tables, ctx = _inputs(generator, batch, heads, kv_heads, dim, bs, contexts,
                                             dtype, num_blocks=max(48, 2 + batch * (-(-200 // bs))))
    out = torch.ops.livethinking.paged_decode_attention(q, k_pool, v_pool, tables, ctx, dim**-0.5)
    _assert_within_plain_budget(out, q, k_pool, v_pool, tables, ctx)


def test_cpp_op_does_not_depend_on_the_thread_count(generator):
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 9, 8, 2, 16, 4, [1, 5, 9, 40, 3, 17, 2, 8, 30],
                                             torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.paged_decode_attention(q, k_pool, v_pool, tables, ctx)
        torch.set_num_threads(2)
        two = ops.paged_decode_attention(q, k_pool, v_pool, tables, ctx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_cpp_op_empty_batch_and_q_of_another_dtype(generator):
    pool = torch.randn(3, 4, 2, 8)
    out = ops.paged_decode_attention(torch.randn(0, 4, 8), pool, pool,
                                     torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 8)
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 2, 4, 2, 8, 4, [6, 11], torch.float32)
    out = ops.paged_decode_attention(q.double(), k_pool, v_pool, tables, ctx)  # q cast to the pools'
    assert out.dtype == torch.float64
    exact = paged_decode_attention_reference(q, k_pool, v_pool, tables, ctx)
    assert (out - exact).abs().max() <= 8 * EPS[torch.float32] * exact.abs().max()


def test_op_scale_and_int32_tables(generator):
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 2, 4, 2, 8, 4, [6, 11], torch.float32)
    out = ops.paged_decode_attention(q, k_pool, v_pool, tables.int(), ctx.int(), scale=0.5)
    exact = paged_decode_attention_reference(q, k_pool, v_pool, tables, ctx, scale=0.5)
    assert torch.allclose(out.double(), exact, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(context_lens=torch.tensor([0, 3])), ValueError, r"context_lens.* must lie in \[1, max_blocks \* block_size = 8\]"),
    (dict(context_lens=torch.tensor([9, 3])), ValueError, r"context_lens\[0\] = 9 must lie"),
    (dict(block_tables=torch.tensor([[0, 7], [1, 0]])), ValueError, r"block_tables\[0, 1\] = 7 must lie in \[0, 5\)"),
    (dict(block_tables=torch.zeros(2, 2)), TypeError, "block_tables must be int32 or int64"),
    (dict(v_pool=torch.randn(5, 4, 2, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(q=[[0.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(scale=0.0), ValueError, "scale must be > 0"),
])
def test_op_bad_input_names_the_argument(change, error, match):
    args = dict(q=torch.randn(2, 4, 8), k_pool=torch.randn(5, 4, 2, 8), v_pool=torch.randn(5, 4, 2, 8),
                block_tables=torch.tensor([[0, 1], [2, 9]]),  # row 1's second entry is past ctx 3
                context_lens=torch.tensor([8, 3]))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.paged_decode_attention(**args)


def test_op_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pool = torch.randn(3, 4, 2, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.paged_decode_attention(torch.randn(1, 2, 8), pool, pool, torch.zeros(1, 1, dtype=torch.long),
                                   torch.ones(1, dtype=torch.long), use_kernel=True)


@pytest.mark.gpu
def test_gpu_op_runs_the_kernel(generator):
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 3, 8, 2, 64, 16, [5, 100, 33], torch.bfloat16,
                                             num_blocks=64, device="cuda")
    assert torch.equal(ops.paged_decode_attention(q, k_pool, v_pool, tables, ctx),
                       paged_decode_attention(q, k_pool, v_pool, tables, ctx))


def test_cpp_op_opcheck(generator):
    """Schema, fake kernel and dispatch of the C++ op agree (torch.library.opcheck)."""
    q, k_pool, v_pool, tables, ctx = _inputs(generator, 3, 4, 2, 8, 4, [5, 1, 9], torch.float32)
    torch.library.opcheck(torch.ops.livethinking.paged_decode_attention.default,
                          (q, k_pool, v_pool, tables, ctx, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
