"""CUDA kernels against the CPU kernels (skipped without a GPU).

ids and alignments must be identical, float weights within 1e-6, permute bitwise
(a copy, or one product rounded once), unpermute bitwise too: both sum the k
products in ascending order with the same uncontracted multiply-then-add.
"""

import pytest
import torch

from livethinking.ops import moe_align, moe_permute, moe_topk_softmax, moe_unpermute
from livethinking.ops.reference import moe_align_reference

pytestmark = pytest.mark.gpu

FIELDS = ["sorted_ids", "expert_offsets", "block_experts", "num_rows_padded", "row_of_pair",
          "tokens_per_expert"]


def poisoned_cache():
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show."""
    torch.cuda.synchronize()
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97, 1025, 16384])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 8), (60, 2), (128, 8), (1024, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_softmax_matches_cpu(num_tokens, num_experts, top_k, dtype, generator):
    logits = (torch.randn(num_tokens, num_experts, generator=generator) * 3).to(dtype)
    for renormalize in (True, False):
        poisoned_cache()
        weights, ids = moe_topk_softmax(logits.cuda(), top_k, renormalize)
        cpu_weights, cpu_ids = moe_topk_softmax(logits, top_k, renormalize)
        assert torch.equal(ids.cpu(), cpu_ids)
        assert torch.all((weights.cpu() - cpu_weights).abs() <= 1e-6)


def test_topk_softmax_ties_match_cpu(generator):
    logits = torch.randint(-2, 3, (4097, 128), generator=generator).float()
    assert torch.equal(moe_topk_softmax(logits.cuda(), 8)[1].cpu(), moe_topk_softmax(logits, 8)[1])


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97, 1025, 16384, 70000])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (128, 8), (1024, 8)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_align_matches_cpu(num_tokens, num_experts, top_k, block_size, generator):
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    scores[:, num_experts // 3:] -= 2  # two thirds of the experts get no token
    ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    poisoned_cache()
    alignment = moe_align(ids.cuda(), num_experts, block_size)
    expected = moe_align_reference(ids, num_experts, block_size)
    for name in FIELDS:
        assert torch.equal(getattr(alignment, name).cpu(), expected[name]), name


@pytest.mark.parametrize("num_tokens,hidden", [(1, 2048), (97, 2048), (1025, 7), (4096, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_permute_unpermute_match_cpu(num_tokens, hidden, dtype, generator):
    weights, ids = moe_topk_softmax(torch.randn(num_tokens, 128, generator=generator), 8)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    if dtype == torch.float64:
        weights = weights.double()
    cpu_alignment = moe_align(ids, 128, 64)
    alignment = moe_align(ids.cuda(), 128, 64)
    for w in (None, weights):
        poisoned_cache()
        rows = moe_permute(x.cuda(), alignment, None if w is None else w.cuda())
        cpu_rows = moe_permute(x, cpu_alignment, w)
        assert torch.equal(rows.cpu(), cpu_rows)
        y = torch.randn(cpu_rows.shape, generator=generator).to(dtype)
        poisoned_cache()
        out = moe_unpermute(y.cuda(), alignment, None if w is None else w.cuda())
        assert torch.equal(out.cpu(), moe_unpermute(y, cpu_alignment, w))


def test_gradients_match_cpu(generator):
    weights, ids = moe_topk_softmax(torch.randn(300, 64, generator=generator), 4)
    x = torch.randn(300, 96, generator=generator)
    upstream = torch.randn(300, 96, generator=generator)
    grads = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        wd = weights.to(device).requires_grad_()
        alignment = moe_align(ids.to(device), 64, 16)
        moe_unpermute(moe_permute(xd, alignment).sin(), alignment, wd).backward(upstream.to(device))
        grads[device] = (xd.grad.cpu(), wd.grad.cpu())
    assert torch.allclose(grads["cuda"][0], grads["cpu"][0], rtol=1e-5, atol=1e-6)
    # pair_dot reduces in another order on the GPU: a float32 dot of 96 terms
    assert torch.allclose(grads["cuda"][1], grads["cpu"][1], rtol=1e-5, atol=1e-5)


def test_align_is_graph_capturable(generator):
    ids = torch.randint(0, 128, (512, 8), generator=generator, dtype=torch.int32).cuda()
    static_ids = ids.clone()
    alignment = moe_align(static_ids, 128, 64)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_align(static_ids, 128, 64)
    fresh = torch.randint(0, 128, (512, 8), generator=generator, dtype=torch.int32)
    static_ids.copy_(fresh)
    graph.replay()
    expected = moe_align_reference(fresh, 128, 64)
    for name in FIELDS:
        assert torch.equal(getattr(captured, name).cpu(), expected[name]), name
    del alignment


def test_opcheck_on_cuda(generator):
    logits = torch.randn(9, 24, generator=generator).cuda()
    torch.library.opcheck(torch.ops.livethinking.moe_topk_softmax.default, (logits, 3, True))
    ids = moe_topk_softmax(logits, 3)[1]
    torch.library.opcheck(torch.ops.livethinking.moe_align.default, (ids, 24, 16))
    alignment = moe_align(ids, 24, 16)
    x = torch.randn(9, 6, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.livethinking.moe_permute.default,
                          (x, alignment.sorted_ids, alignment.row_of_pair, None))
