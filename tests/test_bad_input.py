"""Bad input raises an error that names the argument and what was expected."""

import pytest
import torch

from livethinking.ops import moe_align, moe_permute, moe_topk_softmax, moe_unpermute


@pytest.fixture
def routed():
    logits = torch.randn(6, 8)
    weights, ids = moe_topk_softmax(logits, 2)
    return torch.randn(6, 4), weights, ids, moe_align(ids, 8, 4)


@pytest.mark.parametrize("call,error,words", [
    (lambda: moe_topk_softmax(torch.randn(4, 8), 9), ValueError, ["top_k", "[1, 8]", "9"]),
    (lambda: moe_topk_softmax(torch.randn(4, 8), 0), ValueError, ["top_k", "[1, 8]"]),
    (lambda: moe_topk_softmax(torch.randn(4, 8), 2.0), TypeError, ["top_k", "int"]),
    (lambda: moe_topk_softmax(torch.randn(4, 8).double(), 2), TypeError,
     ["router_logits", "float32, bfloat16 or float16", "torch.float64"]),
    (lambda: moe_topk_softmax(torch.randn(2, 4, 8), 2), ValueError,
     ["router_logits", "2-D", "(tokens, num_experts)", "(2, 4, 8)"]),
    (lambda: moe_topk_softmax([[0.0, 1.0]], 1), TypeError, ["router_logits", "torch.Tensor"]),
    (lambda: moe_align(torch.zeros(4, 9, dtype=torch.int32), 8), ValueError,
     ["top_k", "num_experts=8", "9"]),
    (lambda: moe_align(torch.zeros(4, 2), 8), TypeError, ["topk_ids", "int32 or int64", "float32"]),
    (lambda: moe_align(torch.zeros(8, dtype=torch.int32), 8), ValueError,
     ["topk_ids", "2-D", "(tokens, top_k)"]),
    (lambda: moe_align(torch.zeros(4, 2, dtype=torch.int32), 8, 0), ValueError,
     ["block_size", "[1, 2147483647]", "0"]),
    (lambda: moe_align(torch.zeros(4, 2, dtype=torch.int32), 8, -16), ValueError, ["block_size"]),
    (lambda: moe_align(torch.zeros(4, 2, dtype=torch.int32), 0), ValueError, ["num_experts"]),
])
def test_wrapper_errors_name_the_argument(call, error, words):
    with pytest.raises(error) as raised:
        call()
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_out_of_range_expert_id_is_reported():
    ids = torch.tensor([[0, 1], [2, 8]], dtype=torch.int32)
    # the C++ kernel's std::invalid_argument surfaces as ValueError
    with pytest.raises(ValueError, match=r"topk_ids\[1, 1\] = 8 is outside \[0, num_experts=8\)"):
        moe_align(ids, 8)
    with pytest.raises(ValueError, match=r"topk_ids\[0, 0\] = -1"):
        moe_align(torch.tensor([[-1]], dtype=torch.int32), 8)


def test_tensors_on_different_devices(routed):
    x, weights, _, alignment = routed
    with pytest.raises(ValueError, match=r"topk_weights is on meta but x is on cpu"):
        moe_permute(x, alignment, weights.to("meta"))
    with pytest.raises(ValueError, match=r"alignment.sorted_ids is on cpu but x is on meta"):
        moe_permute(x.to("meta"), alignment)
    with pytest.raises(ValueError, match=r"alignment.sorted_ids is on cpu but y is on meta"):
        moe_unpermute(torch.empty(alignment.sorted_ids.numel(), 4, device="meta"), alignment)


def test_permute_shape_and_type_errors(routed):
    x, weights, ids, alignment = routed
    with pytest.raises(ValueError, match=r"x has 5 tokens but the alignment was made for 6"):
        moe_permute(x[:5], alignment)
    with pytest.raises(ValueError, match=r"x must be 2-D \(tokens, hidden\), got shape \(6,\)"):
        moe_permute(x[:, 0], alignment)
    with pytest.raises(TypeError, match=r"x must be float32, float16, bfloat16 or float64"):
        moe_permute(x.int(), alignment)
    with pytest.raises(ValueError, match=r"topk_weights must have shape \(6, 2\)"):
        moe_permute(x, alignment, weights[:, :1])
    with pytest.raises(TypeError, match=r"topk_weights must be a floating-point tensor"):
        moe_permute(x, alignment, ids)
    with pytest.raises(TypeError, match=r"alignment must be the MoeAlignment"):
        moe_permute(x, tuple(alignment))
    with pytest.raises(ValueError, match=r"y must have one row per routed row of the alignment"):
        moe_unpermute(x, alignment)


def test_direct_op_calls_are_checked_too(routed):
    x, weights, ids, alignment = routed
    ops = torch.ops.livethinking
    with pytest.raises(RuntimeError, match=r"top_k must be in \[1, num_experts=8\], got 9"):
        ops.moe_topk_softmax(torch.randn(2, 8), 9)
    with pytest.raises(RuntimeError, match=r"topk_ids must be int32, got Long"):
        ops.moe_align(ids.long(), 8, 4)
    with pytest.raises(RuntimeError, match=r"block_size must be in \[1, 2\^31 - 1\], got 0"):
        ops.moe_align(ids, 8, 0)
    with pytest.raises(RuntimeError, match=r"topk_weights must be Float for Float data, got Double"):
        ops.moe_permute(x, alignment.sorted_ids, alignment.row_of_pair, weights.double())
    bad_rows = alignment.sorted_ids.clone()
    bad_rows[0] = 10_000
    with pytest.raises(ValueError, match=r"sorted_ids\[0\] = 10000 is outside \[0, 12\]"):
        ops.moe_permute(x, bad_rows, alignment.row_of_pair, None)
    bad_pairs = alignment.row_of_pair.clone()
    bad_pairs[2, 1] = -3
    with pytest.raises(ValueError, match=r"row_of_pair\[5\] = -3 is outside"):
        ops.moe_unpermute(torch.randn(alignment.sorted_ids.numel(), 4), alignment.sorted_ids,
                          bad_pairs, None)
